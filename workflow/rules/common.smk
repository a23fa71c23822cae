# Paths, wildcard constraints, input functions and the helpers every stage file may use (included first, so each
# rule file can reach them). The experiment design (which fits make which table rows, the manifest, each job's
# overrides and their validation) is nern/grid.py.
#
# Every path is derived from the preset (config): results/<preset>/<network>/... says what a file is. The
# templates below results/<preset>/<network>/ are spelled once, in nern/grid.py:
#   original/{orig}/                           the original network: orig = reg<factor> (pretrained) or imported
#   permutation/{orig}/{perm}.safetensors      coordinate permutation of that original
#   fit/{fit_recipe}/{orig}/{perm}/h{hidden}{seed}/  one NeRN fit of the main grid (also the regularisation table);
#                                              seed: "" for seed 0, -seed<s> for a grid's further seeds
#   ablation/{variant}/{fit_recipe}/{orig}/{perm}/h{hidden}{seed}/    an ablation fit
#   data-free/{fit_recipe}/{orig}/{perm}/h{hidden}{seed}/             a data-free fit
#   <fit dir>/{compress,importance}/           the application stages' outputs, beside the fit
# logs/<preset>/ and benchmarks/<preset>/ mirror them (one .log / .tsv per job).
# The per-job overrides are rule params, so changing one in the config reruns exactly the jobs it touches.

import os
import re
import shlex
import sys
from pathlib import Path

from nern import grid
from nern.tracking import default_tracking_uri
from nern.config import GRID_PERMUTATIONS, NETWORK_PERMUTATIONS, PERMUTATIONS

REPO = Path(workflow.basedir)
PRESET = config["name"]
RESULTS = grid.results_dir(PRESET)
TABLES = f"results/tables/{PRESET}"
FIGURES = f"results/figures/{PRESET}"
LOGS = f"logs/{PRESET}"
BENCHMARKS = f"benchmarks/{PRESET}"
# One network's results, logs and benchmarks ({net} is the wildcard) and the templates below them (nern/grid.py).
NET_RESULTS = f"{RESULTS}/{{net}}"
NET_LOGS = f"{LOGS}/{{net}}"
NET_BENCHMARKS = f"{BENCHMARKS}/{{net}}"
ORIGINAL_DIR = grid.ORIGINAL_DIR
PERMUTATION_STEM = grid.PERMUTATION_STEM
FIT_DIRS = grid.FIT_DIRS
# Jobs run the CLI with the interpreter that runs Snakemake (inside Slurm too), never whatever is on PATH.
# NERN, MLFLOW_URI, the device and COMPILE are used in shell commands directly, not as params: they do not change
# results, so a new virtualenv, tracking server or GPU must not rerun finished jobs.
NERN = f"{shlex.quote(sys.executable)} -m nern"
# torch.compile of each fit's iteration: the same method, fused; like the device it does not rerun fits.
COMPILE = "true" if config.get("compile", False) else "false"


# The configured MLflow store, else the environment's, else an embedded SQLite file under ./results (absolute:
# every job agrees on it).
MLFLOW_URI = shlex.quote(default_tracking_uri(config["mlflow"]["tracking_uri"]))
# Every job's MLflow run is a child of the preset's parent run (one expandable row per preset in the UI), and
# logs system metrics when the config asks; passed in the environment, so neither reruns finished jobs.
os.environ["NERN_MLFLOW_PARENT"] = PRESET
os.environ["NERN_MLFLOW_SYSTEM_METRICS"] = "1" if config["mlflow"]["system_metrics"] else "0"

# The design, checked when the DAG is built: a typo anywhere in the preset fails here, naming the key.
ROWS = grid.table_rows(config)
grid.check_resources(config)
grid.validate_jobs(config, REPO, ROWS)


wildcard_constraints:
    net="|".join(re.escape(network["name"]) for network in config["networks"]) or "[^/]+",
    orig=r"imported|reg[0-9.e+-]+",
    reg=r"[0-9.e+-]+",
    perm="|".join(GRID_PERMUTATIONS),
    hidden=r"[0-9]+",
    seed=grid.SEED_TAG,
    fit_recipe="|".join(map(re.escape, config["fit_recipes"])),
    variant=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",


# -- input functions and params ----------------------------------------------------------------------------


def network_of(wildcards):
    return grid.network(config, wildcards.net)


def fit_recipe_input(wildcards):
    return grid.fit_recipe_file(config, REPO, wildcards.fit_recipe)


def original_model(wildcards):
    return f"{grid.original_dir(PRESET, wildcards.net, wildcards.orig)}/model.safetensors"


def network_permuted_model(net, orig, perm):
    """symmetry: the original permuted along its weight-space symmetries (written by rule permute_network)."""
    return f"{RESULTS}/{net}/{PERMUTATION_STEM.format(orig=orig, perm=perm)}.model.safetensors"


def fitted_model(wildcards):
    """The network a fit reconstructs: the original, or its permuted equivalent for a network permutation."""
    if wildcards.perm in NETWORK_PERMUTATIONS:
        return network_permuted_model(wildcards.net, wildcards.orig, wildcards.perm)
    return original_model(wildcards)


def original_sources(wildcards):
    """A user factory's .py file is an input of the original network (an edited network reruns everything), and a
    fine-tuned original's imported model is the input of its training."""
    start = grid.finetune_start(PRESET, network_of(wildcards))
    return grid.model_sources(network_of(wildcards)) + ([start] if start else [])


def import_inputs(wildcards):
    """A checkpoint file is an input (a new file reruns the import); torchvision:<WEIGHTS> is downloaded by the job."""
    weights = network_of(wildcards)["original"]["checkpoint"]
    sources = grid.model_sources(network_of(wildcards))
    return sources + ([] if weights.startswith("torchvision:") else [weights])


def import_overrides(wildcards):
    return grid.set_args(grid.original_trees(network_of(wildcards)))


def pretrain_overrides(wildcards):
    net = network_of(wildcards)
    return grid.set_args(grid.original_trees(net, wildcards.reg, grid.finetune_start(PRESET, net)))


def represent_overrides(wildcards):
    return grid.set_args(grid.represent_trees(network_of(wildcards)))


def permutation_input(wildcards):
    stem = PERMUTATION_STEM.format(orig=wildcards.orig, perm=wildcards.perm)
    return f"{RESULTS}/{wildcards.net}/{stem}.safetensors"


def fit_of(wildcards, stage):
    variant = wildcards.variant if stage == "ablation" else ""
    return grid.Fit(PRESET, stage, wildcards.net, wildcards.fit_recipe, wildcards.orig, wildcards.perm,
                    int(wildcards.hidden), variant, grid.seed_of_tag(wildcards.seed))


def fit_params(stage, rule_name, variant=None):
    """A fit rule's params: the result-changing overrides (grid.fit_trees), MLflow tags and run name;
    `variant` names the run (default: the ablation variant of the wildcards, none for the main grid)."""

    def name(wildcards):
        return variant or (wildcards.variant if stage == "ablation" else "")

    return {
        "overrides": lambda wildcards: grid.set_args(grid.fit_trees(network_of(wildcards), fit_of(wildcards, stage))),
        "tags": lambda wildcards: grid.fit_tags(fit_of(wildcards, stage), network_of(wildcards)["task"], rule_name,
                                                name(wildcards) or "default"),
        "run_name": lambda wildcards: grid.fit_run_name(fit_of(wildcards, stage), name(wildcards)),
        "out": lambda wildcards, output: os.path.dirname(output.metrics),
    }


def rule_threads(rule_name):
    return config["threads"][rule_name]


def rule_resources(rule_name, per_network=True):
    """The preset's resources of a rule, each value overridable per network (as a wildcard-dependent callable)."""
    base = dict(config["resources"].get(rule_name, {}))
    if not per_network:
        return base

    def value(key):
        return lambda wildcards: grid.network_resource(config, wildcards.net, rule_name, key)

    return {key: value(key) for key in base}


# -- the application stages (compress.smk, importance.smk): one job per fit directory, outputs beside it ------

# A fit directory below results/<preset>/<network>/ (FIT_DIRS): fit/..., data-free/... or ablation/<variant>/...
FIT_DIR_PATTERN = (r"(fit|data-free|ablation/[A-Za-z0-9][A-Za-z0-9_.+-]*)/[^/]+/(imported|reg[0-9.e+-]+)/("
                   + "|".join(GRID_PERMUTATIONS) + r")/h[0-9]+" + grid.SEED_TAG)


def application_path(stage, name):
    """An output of an application stage for the fit directory {fitpoint}: <fit dir>/<stage>/<name>."""
    return f"{NET_RESULTS}/{{fitpoint}}/{stage}/{name}"


def application_outputs(stage, files):
    return [f"{fit_dir}/{stage}/{name}" for fit_dir in grid.application_dirs(config, ROWS, stage) for name in files]


def application_model(wildcards):
    """The network a fit directory's predictor was fitted to (its orig and perm are the third- and second-last
    parts): the original, or its permuted equivalent for a network permutation."""
    orig, perm = wildcards.fitpoint.split("/")[-3:-1]
    if perm in NETWORK_PERMUTATIONS:
        return network_permuted_model(wildcards.net, orig, perm)
    return f"{grid.original_dir(PRESET, wildcards.net, orig)}/model.safetensors"


def application_threads(stage):
    """The preset's threads for the stage, else the fit's (fine-tunes and evaluations run like a fit)."""
    return config["threads"].get(stage, config["threads"]["fit"])


def application_resources(stage):
    """The preset's resources for the stage, else the fit's (on a cluster: the GPU partition)."""
    return rule_resources(stage if stage in config["resources"] else "fit")


def application_data(wildcards):
    """The network's data settings (the fit's own are the base; the config's current ones win)."""
    network = network_of(wildcards)
    return grid.set_args([(f"networks[{network['name']}].data", {"data": network["data"]})])


def application_tags(wildcards, rule_name):
    return grid.tag_args(rule=rule_name, preset=PRESET, network=wildcards.net, fit=wildcards.fitpoint)


def application_report(stage, name, caption, category, result):
    """An application output in the Snakemake report: one subcategory per network, labelled by fit and result."""
    return report(application_path(stage, name), caption=f"../report/{caption}.rst", category=category,
                  subcategory="{net}", labels={"fit": "{fitpoint}", "result": result})


# -- final outputs -------------------------------------------------------------------------------------------


def published_inputs():
    return [grid.repo_file(REPO, config["published"])] if config["published"] else []


def table_caption(name):
    kind = "ablation" if name.startswith("ablation_") else name
    return f"../report/table_{kind}.rst"


def table_outputs():
    """Each table as CSV (shown in the Snakemake report), Markdown and LaTeX."""
    files = []
    names = grid.table_names(ROWS) + (["rate_distortion"] if grid.compressed_networks(config, ROWS) else [])
    for name in names:
        files.append(report(f"{TABLES}/{name}.csv", caption=table_caption(name), category="Tables",
                            labels={"table": name, "format": "csv"}))
        files += [f"{TABLES}/{name}.md", f"{TABLES}/{name}.tex"]
    return files


def figure_outputs():
    files = [report(f"{FIGURES}/accuracy_vs_size.png", caption="../report/figure_accuracy_vs_size.rst",
                    category="Figures", labels={"figure": "accuracy vs predictor size"})]
    for network in config["networks"]:
        files.append(report(f"{FIGURES}/training_curves_{network['name']}.png",
                            caption="../report/figure_training_curves.rst", category="Figures",
                            labels={"figure": f"training curves {network['name']}"}))
    for network in grid.compressed_networks(config, ROWS):
        files.append(report(f"{FIGURES}/rate_distortion_{network}.png",
                            caption="../report/figure_rate_distortion.rst", category="Figures",
                            labels={"figure": f"accuracy vs bytes {network}"}))
    return files


def final_outputs():
    return [str(path) for path in table_outputs() + figure_outputs()]
