# Stage 7 (application): meta-compression of every fitted NeRN (nern/compress.py). The predictor is pruned,
# fine-tuned and quantised into real files; every file is read back and measured, next to the same codecs
# applied to the original network. One job per fit directory; outputs live beside the fit:
#   results/<preset>/<net>/<fit dir>/compress/{compression.csv,compression.md,accuracy_vs_bytes.png,metrics.json,files/}
# The helpers below are shared with importance.smk (included after this file).

# A fit directory below results/<preset>/<net>/: fit/..., data-free/... or ablation/<variant>/...
FIT_POINT = r"(fit|data-free|ablation/[A-Za-z0-9][A-Za-z0-9_.+-]*)/[^/]+/(imported|reg[0-9.e+-]+)/(" + "|".join(GRID_PERMUTATIONS) + r")/h[0-9]+"


def application_outputs(stage, files):
    return [f"{fit_dir}/{stage}/{name}" for fit_dir in grid.application_dirs(config, ROWS, stage) for name in files]


def application_model(wildcards):
    """The network a fit directory's predictor was fitted to (its orig and perm are the third- and second-last
    parts): the original, or its permuted equivalent for a network permutation."""
    orig, perm = wildcards.fitpoint.split("/")[-3:-1]
    if perm in NETWORK_PERMUTATIONS:
        return network_permuted_model(wildcards.net, orig, perm)
    return f"{RESULTS}/{wildcards.net}/original/{orig}/model.safetensors"


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


def application_report(path, caption, category, result):
    """An application output in the Snakemake report: one subcategory per network, labelled by fit and result."""
    return report(path, caption=f"../report/{caption}.rst", category=category, subcategory="{net}",
                  labels={"fit": "{fitpoint}", "result": result})


def compress_outputs():
    return application_outputs("compress", ["compression.csv", "compression.md", "accuracy_vs_bytes.png",
                                            "metrics.json"])


rule compress:
    wildcard_constraints:
        fitpoint=FIT_POINT,
    input:
        model=application_model,
        predictor=f"{RESULTS}/{{net}}/{{fitpoint}}/predictor.safetensors",
    output:
        table=application_report(f"{RESULTS}/{{net}}/{{fitpoint}}/compress/compression.csv",
                                 "table_compression", "Meta-compression", "bytes and accuracy per file"),
        markdown=f"{RESULTS}/{{net}}/{{fitpoint}}/compress/compression.md",
        figure=application_report(f"{RESULTS}/{{net}}/{{fitpoint}}/compress/accuracy_vs_bytes.png",
                                  "figure_accuracy_vs_bytes", "Meta-compression", "accuracy vs bytes"),
        metrics=f"{RESULTS}/{{net}}/{{fitpoint}}/compress/metrics.json",
    log:
        f"{LOGS}/{{net}}/{{fitpoint}}/compress.log",
    benchmark:
        f"{BENCHMARKS}/{{net}}/{{fitpoint}}/compress.tsv"
    threads: application_threads("compress")
    resources:
        **application_resources("compress"),
    params:
        data=application_data,
        options=grid.stage_options(config, "compress"),
        tags=lambda wildcards: application_tags(wildcards, "compress"),
        out=lambda wildcards, output: os.path.dirname(output.metrics),
    shell:
        "{NERN} compress --model {input.model} --predictor {input.predictor} {params.data} {params.options}"
        " --set threads={threads} --set device={config[device]} --set progress=false --out {params.out}"
        " --mlflow-uri {MLFLOW_URI} --experiment {PRESET} --run-name compress:{wildcards.net}/{wildcards.fitpoint}"
        " {params.tags} > {log} 2>&1"
