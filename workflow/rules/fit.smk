# Stage 3: NeRN fits over the grid of fit presets x originals x permutations x predictor sizes.
# The same rule fits the reference points of the ablation, regularisation and data-free tables.

FIT_POINT = "fit/{fit_preset}/{orig}/{perm}/h{hidden}"
FIT_DIR = f"{RESULTS}/{{net}}/{FIT_POINT}"


rule fit:
    input:
        preset=lambda wildcards: fit_preset_file(wildcards.fit_preset),
        model=original_model,
        permutation=permutation_input,
    output:
        metrics=f"{FIT_DIR}/metrics.json",
        curves=f"{FIT_DIR}/curves.csv",
        predictor=f"{FIT_DIR}/predictor.safetensors",
    log:
        f"{LOGS}/{{net}}/{FIT_POINT}.log",
    benchmark:
        f"{BENCHMARKS}/{{net}}/{FIT_POINT}.tsv"
    threads: rule_threads("fit")
    resources:
        **rule_resources("fit"),
    params:
        overrides=lambda wildcards: fit_overrides(wildcards),
        tags=lambda wildcards: fit_tags(wildcards, "fit"),
        run_name=lambda wildcards: fit_run_name(wildcards),
        out=lambda wildcards, output: os.path.dirname(output.metrics),
    # The finished fit's checkpoint is dropped so a rerun with changed settings starts afresh; an
    # interrupted (pre-empted) fit keeps it and resumes.
    shell:
        "{NERN} fit --config {input.preset} --model {input.model} --permutation {input.permutation}"
        " {params.overrides} --set threads={threads} --set device={config[device]} --set progress=false"
        " --out {params.out} --mlflow-uri {MLFLOW_URI} --experiment {PRESET} --run-name {params.run_name}"
        " {params.tags} > {log} 2>&1 && rm -f {params.out}/checkpoint.pt"
