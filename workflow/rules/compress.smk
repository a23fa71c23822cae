# Stage 7 (application): meta-compression of every fitted NeRN (nern/compress.py). The predictor is pruned,
# fine-tuned and quantised into real files; every file is read back and measured, next to the same codecs
# applied to the original network. One job per fit directory; outputs live beside the fit:
#   results/<preset>/<net>/<fit dir>/compress/{compression.csv,compression.md,accuracy_vs_bytes.png,metrics.json,files/}
# The helpers below are shared with importance.smk (included after this file).

# A fit directory below results/<preset>/<net>/: fit/..., data-free/... or ablation/<variant>/...
FIT_POINT = r"(fit|data-free|ablation/[A-Za-z0-9][A-Za-z0-9_.+-]*)/[^/]+/(imported|reg[0-9.e+-]+)/(none|infilter|crossfilter)/h[0-9]+"


def fitted_nern_dirs():
    """The fit directories the applications run on: with `applications: all`, every distinct fit the tables use
    (main grid, regularisation, ablations, data-free); with `reference`, each network's reference fit only."""
    if config.get("applications", "all") == "reference":
        dirs = set()
        for network in config["networks"]:
            ref = reference(network)
            point = (ref["fit_preset"], original_id(network, ref["smoothness"]), ref["permutation"], ref["hidden"])
            dirs.add(Fit("fit", network["name"], *point).dir)
        return sorted(dirs)
    return sorted({row["dir"] for row in ROWS})


def application_outputs(stage, files):
    return [f"{fit_dir}/{stage}/{name}" for fit_dir in fitted_nern_dirs() for name in files]


def application_model(wildcards):
    """The original network a fit directory's predictor was fitted to (its orig is the third-last part)."""
    return f"{RESULTS}/{wildcards.net}/original/{wildcards.fitpoint.split('/')[-3]}/model.safetensors"


def application_threads(stage):
    """The preset's threads for the stage, else the fit's (fine-tunes and evaluations run like a fit)."""
    return config["threads"].get(stage, config["threads"]["fit"])


def application_resources(stage):
    """The preset's resources for the stage, else the fit's (on a cluster: the GPU partition)."""
    return rule_resources(stage if stage in config["resources"] else "fit")


def application_args(stage):
    """Stage options from an optional `<stage>:` section of the preset (e.g. sparsities, finetune_iterations);
    absent: the CLI's defaults. Keys become --kebab-case flags, lists become comma-separated values."""
    args = []
    for key, value in (config.get(stage) or {}).items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        args.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
    return " ".join(args)


def application_data(wildcards):
    """The network's data settings (the fit's own are the base; the config's current ones win)."""
    return set_args(network_data(network_of(wildcards)))


def application_tags(wildcards, rule_name):
    return tag_args(rule=rule_name, preset=PRESET, network=wildcards.net, fit=wildcards.fitpoint)


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
        table=f"{RESULTS}/{{net}}/{{fitpoint}}/compress/compression.csv",
        markdown=f"{RESULTS}/{{net}}/{{fitpoint}}/compress/compression.md",
        figure=f"{RESULTS}/{{net}}/{{fitpoint}}/compress/accuracy_vs_bytes.png",
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
        options=application_args("compress"),
        tags=lambda wildcards: application_tags(wildcards, "compress"),
        out=lambda wildcards, output: os.path.dirname(output.metrics),
    shell:
        "{NERN} compress --model {input.model} --predictor {input.predictor} {params.data} {params.options}"
        " --set threads={threads} --set device={config[device]} --set progress=false --out {params.out}"
        " --mlflow-uri {MLFLOW_URI} --experiment {PRESET} --run-name compress:{wildcards.net}/{wildcards.fitpoint}"
        " {params.tags} > {log} 2>&1"
