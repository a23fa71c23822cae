# Paths, input functions and wildcard constraints shared by the stage files.
#
# Every path is derived from the preset (config): results/<preset>/<network>/... says what a file is.
#   original/{orig}/                           the original network: orig = reg<factor> (pretrained) or imported
#   permutation/{orig}/{perm}.safetensors      coordinate permutation of that original
#   fit/{fit_preset}/{orig}/{perm}/h{hidden}/  one NeRN fit of the main grid (also the regularisation table)
#   ablation/{variant}/{fit_preset}/{orig}/{perm}/h{hidden}/    an ablation fit
#   data-free/{fit_preset}/{orig}/{perm}/h{hidden}/             a data-free fit
# The per-job overrides are rule params, so changing one in the config reruns exactly the jobs it touches.

import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

REPO = Path(workflow.basedir)
PRESET = config["name"]
RESULTS = f"results/{PRESET}"
TABLES = f"results/tables/{PRESET}"
FIGURES = f"results/figures/{PRESET}"
LOGS = f"logs/{PRESET}"
BENCHMARKS = f"benchmarks/{PRESET}"
NETWORKS = {network["name"]: network for network in config["networks"]}
# Jobs run the CLI with the interpreter that runs Snakemake (inside Slurm too), never whatever is on PATH.
# NERN, MLFLOW_URI, the device and COMPILE are used in shell commands directly, not as params: they do not change
# results, so a new virtualenv, tracking server or GPU must not rerun finished jobs.
NERN = f"{shlex.quote(sys.executable)} -m nern"
# torch.compile of each fit's iteration: the same method, fused; like the device it does not rerun fits.
COMPILE = "true" if config.get("compile", False) else "false"
PERMUTATIONS = ("none", "infilter", "crossfilter")


wildcard_constraints:
    net="|".join(map(re.escape, NETWORKS)) or "[^/]+",
    orig=r"imported|reg[0-9.e+-]+",
    reg=r"[0-9.e+-]+",
    perm="|".join(PERMUTATIONS),
    hidden=r"[0-9]+",
    fit_preset="|".join(map(re.escape, config["fit_presets"])),
    variant=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",


# -- config helpers ---------------------------------------------------------------------------------------


def repo_file(path):
    """Files the repository ships (fit presets, published numbers): relative paths are relative to it."""
    return str(path) if os.path.isabs(path) else str(REPO / path)


def tracking_uri():
    """The configured MLflow store, else an embedded SQLite file under ./results (absolute: jobs agree on it)."""
    uri = config["mlflow"]["tracking_uri"]
    return uri if uri else f"sqlite:///{Path('results').resolve() / 'mlflow.db'}"


MLFLOW_URI = shlex.quote(tracking_uri())


def fit_preset_file(name):
    if name not in config["fit_presets"]:
        raise WorkflowError(f"fit preset '{name}' is not in fit_presets ({', '.join(config['fit_presets'])})")
    return repo_file(config["fit_presets"][name])


def flatten(tree, prefix=""):
    """{'loss': {'kd': 0}} and {'loss.kd': 0} both become {'loss.kd': 0}."""
    flat = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def yaml_scalar(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return yaml.safe_dump(list(value), default_flow_style=True).strip()
    return str(value)


def set_args(*trees):
    """`--set key=value` arguments, later trees winning; shell-quoted and sorted, so the key order of the
    YAML (which params change detection would see) does not rerun anything."""
    merged = {}
    for tree in trees:
        merged.update(flatten(tree))
    return " ".join(f"--set {shlex.quote(f'{k}={yaml_scalar(v)}')}" for k, v in sorted(merged.items()))


def tag_args(**tags):
    return " ".join(f"--tag {shlex.quote(f'{k}={v}')}" for k, v in tags.items())


def factor_id(smoothness):
    return f"{float(smoothness):g}"


def original_id(network, smoothness=None):
    if network["original"]["source"] == "import":
        return "imported"
    return f"reg{factor_id(0 if smoothness is None else smoothness)}"


def grid_smoothness(network):
    return network["grid"]["smoothness"] if network["original"]["source"] == "pretrain" else [None]


def reference(network):
    """The point the ablations, regularisation and data-free runs share (default: the grid's first values)."""
    grid, ref = network["grid"], network["reference"]
    return {
        "fit_preset": ref.get("fit_preset", grid["fit_presets"][0]),
        "smoothness": ref.get("smoothness", grid_smoothness(network)[0]),
        "permutation": ref.get("permutation", grid["permutations"][0]),
        "hidden": ref.get("hidden", grid["hidden"][0]),
    }


def network_data(network):
    return {"data": network["data"]}


# -- the fits a preset asks for, and the table rows they fill -----------------------------------------------


@dataclass(frozen=True)
class Fit:
    stage: str  # fit | ablation | data-free
    net: str
    fit_preset: str
    orig: str
    perm: str
    hidden: int
    variant: str = ""

    @property
    def dir(self):
        point = f"{self.fit_preset}/{self.orig}/{self.perm}/h{self.hidden}"
        if self.stage == "fit":
            return f"{RESULTS}/{self.net}/fit/{point}"
        if self.stage == "ablation":
            return f"{RESULTS}/{self.net}/ablation/{self.variant}/{point}"
        return f"{RESULTS}/{self.net}/data-free/{point}"


def _row(group, label, network, fit, smoothness, overrides=None):
    return {
        "group": group, "label": str(label), "network": network["name"], "task": network["task"],
        "arch": network["model"]["arch"], "published": network["published"], "stage": fit.stage,
        "fit_preset": fit.fit_preset, "original": fit.orig,
        "smoothness": None if smoothness is None else float(smoothness),
        "permutation": fit.perm, "hidden": int(fit.hidden), "variant": fit.variant,
        "data_free": fit.stage == "data-free", "overrides": dict(sorted(flatten(overrides).items())),
        "dir": fit.dir,
    }


def check_network(network):
    """Consistency the schema cannot express; fails before any job starts, naming the key."""
    name, source = network["name"], network["original"]["source"]
    for preset in network["grid"]["fit_presets"] + [network["reference"].get("fit_preset")]:
        if preset is not None and preset not in config["fit_presets"]:
            raise WorkflowError(f"networks[{name}]: fit preset '{preset}' is not in fit_presets")
    if source == "import":
        for key in ("regularisation",):
            if key in network:
                raise WorkflowError(f"networks[{name}].{key}: an imported network has no pretraining to regularise")
        if "smoothness" in network["reference"]:
            raise WorkflowError(f"networks[{name}].reference.smoothness: an imported network has no smoothness factor")
    variants = {}
    for group in network["ablations"]:
        for variant in group["variants"]:
            known = variants.setdefault(variant["name"], flatten(variant["set"]))
            if known != flatten(variant["set"]):
                raise WorkflowError(f"networks[{name}]: ablation variant '{variant['name']}' is defined twice, "
                                    "with different settings")


def table_rows():
    """Every (table, row label) -> fit, in table order; the manifest the `nern tables` stage reads."""
    rows = []
    for network in config["networks"]:
        check_network(network)
        net, grid, ref = network["name"], network["grid"], reference(network)
        for preset in grid["fit_presets"]:
            for s in grid_smoothness(network):
                for perm in grid["permutations"]:
                    for h in grid["hidden"]:
                        fit = Fit("fit", net, preset, original_id(network, s), perm, h)
                        rows.append(_row("main", preset, network, fit, s))
        reg = network.get("regularisation")
        if reg:
            for s in reg["smoothness"]:
                for perm in reg.get("permutations", [ref["permutation"]]):
                    for h in reg.get("hidden", [ref["hidden"]]):
                        fit = Fit("fit", net, ref["fit_preset"], original_id(network, s), perm, h)
                        rows.append(_row("regularisation", factor_id(s), network, fit, s))
        ref_point = (ref["fit_preset"], original_id(network, ref["smoothness"]), ref["permutation"], ref["hidden"])
        for group in network["ablations"]:
            for variant in group["variants"]:
                if flatten(variant["set"]):
                    fit = Fit("ablation", net, *ref_point, variant["name"])
                else:
                    fit = Fit("fit", net, *ref_point)
                rows.append(_row(f"ablation_{group['group']}", variant["name"], network, fit, ref["smoothness"],
                                 variant["set"]))
        free = network.get("data_free")
        if free is not None:
            for perm in free.get("permutations", [ref["permutation"]]):
                for h in free.get("hidden", [ref["hidden"]]):
                    point = (ref["fit_preset"], original_id(network, ref["smoothness"]), perm, h)
                    rows.append(_row("data_free", "task data", network, Fit("fit", net, *point), ref["smoothness"]))
                    rows.append(_row("data_free", "data-free", network, Fit("data-free", net, *point),
                                     ref["smoothness"], {"data_free": True}))
    return rows


ROWS = table_rows()


def table_names():
    """main, regularisation, ablation_<group>..., data_free: the tables `nern tables` writes for this preset."""
    names = []
    for row in ROWS:
        if row["group"] not in names:
            names.append(row["group"])
    return names


def fit_metrics():
    return sorted({f"{row['dir']}/metrics.json" for row in ROWS})


def original_metrics():
    """metrics.json of each original network the fits use."""
    paths = set()
    for row in ROWS:
        paths.add(f"{RESULTS}/{row['network']}/original/{row['original']}/metrics.json")
    return sorted(paths)


def manifest():
    networks = []
    for network in config["networks"]:
        originals = sorted({row["original"] for row in ROWS if row["network"] == network["name"]})
        networks.append({
            "name": network["name"], "task": network["task"], "arch": network["model"]["arch"],
            "published": network["published"],
            "originals": {orig: f"{RESULTS}/{network['name']}/original/{orig}" for orig in originals},
        })
    return {"preset": PRESET, "description": config["description"], "networks": networks, "rows": ROWS}


def write_yaml(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


# -- input functions and params ----------------------------------------------------------------------------


def network_of(wildcards):
    return NETWORKS[wildcards.net]


def original_model(wildcards):
    return f"{RESULTS}/{wildcards.net}/original/{wildcards.orig}/model.safetensors"


def import_inputs(wildcards):
    """A checkpoint file is an input (a new file reruns the import); torchvision:<WEIGHTS> is downloaded by the job."""
    weights = network_of(wildcards)["original"]["checkpoint"]
    if weights.startswith("torchvision:"):
        return []
    return [weights]


def import_overrides(wildcards):
    network = network_of(wildcards)
    return set_args({"model": network["model"]}, network_data(network), network["original"]["set"],
                    {"model.checkpoint": network["original"]["checkpoint"]})


def pretrain_overrides(wildcards):
    network = network_of(wildcards)
    if network["original"]["source"] != "pretrain":
        raise WorkflowError(f"network {wildcards.net} imports its weights; it has no reg{wildcards.reg} original")
    return set_args({"model": network["model"]}, network_data(network), network["original"]["set"],
                    {"smoothness": float(wildcards.reg)})


def represent_overrides(wildcards):
    """The represented layers a network's fits use, so its permutations cover the same layers."""
    fit = flatten(network_of(wildcards)["fit"])
    return set_args({k: v for k, v in fit.items() if k.startswith("represent.")})


def permutation_input(wildcards):
    return f"{RESULTS}/{wildcards.net}/permutation/{wildcards.orig}/{wildcards.perm}.safetensors"


def variant_set(wildcards):
    for group in network_of(wildcards)["ablations"]:
        for variant in group["variants"]:
            if variant["name"] == wildcards.variant:
                return variant["set"]
    raise WorkflowError(f"network {wildcards.net} has no ablation variant '{wildcards.variant}'")


def fit_overrides(wildcards, extra=None):
    """Result-changing settings only: threads, device and progress bars are set in the shell command, so a
    different --cores or device does not rerun finished fits."""
    network = network_of(wildcards)
    return set_args(network_data(network), network["fit"], extra or {}, {"predictor.hidden": int(wildcards.hidden)})


def fit_tags(wildcards, rule_name, variant=""):
    return tag_args(**{"rule": rule_name}, preset=PRESET, network=wildcards.net, task=network_of(wildcards)["task"],
                    fit_preset=wildcards.fit_preset, original=wildcards.orig, permutation=wildcards.perm,
                    hidden=wildcards.hidden, variant=variant or "default")


def rule_threads(rule_name):
    return config["threads"][rule_name]


def rule_resources(rule_name, per_network=True):
    """The preset's resources of a rule, each value overridable per network (as a wildcard-dependent callable)."""
    base = dict(config["resources"].get(rule_name, {}))
    if not per_network:
        return base
    for network in config["networks"]:
        extra = network["resources"].get(rule_name, {})
        missing = sorted(set(extra) - set(base))
        if missing:
            raise WorkflowError(f"networks[{network['name']}].resources.{rule_name}.{missing[0]} needs a "
                                f"preset-wide default in resources.{rule_name}")

    def value(key):
        return lambda wildcards: NETWORKS[wildcards.net]["resources"].get(rule_name, {}).get(key, base[key])

    return {key: value(key) for key in base}


def fit_run_name(wildcards, variant=""):
    point = f"{wildcards.net}/{wildcards.fit_preset}/{wildcards.orig}/{wildcards.perm}/h{wildcards.hidden}"
    return shlex.quote(f"{variant}:{point}" if variant else point)


# -- final outputs -------------------------------------------------------------------------------------------


def published_inputs():
    return [repo_file(config["published"])] if config["published"] else []


def table_caption(name):
    kind = "ablation" if name.startswith("ablation_") else name
    return f"../report/table_{kind}.rst"


def table_outputs():
    """Each table as CSV (shown in the Snakemake report), Markdown and LaTeX."""
    files = []
    for name in table_names():
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
    return files


def final_outputs():
    return [str(path) for path in table_outputs() + figure_outputs()]
