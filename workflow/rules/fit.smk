# Stage 3: NeRN fits over the grid of fit recipes x originals x permutations x predictor sizes.
# The same rule fits the reference points of the ablation, regularisation and data-free tables.

FIT_SUBDIR = FIT_DIRS["fit"]
FIT_OUT = f"{NET_RESULTS}/{FIT_SUBDIR}"


rule fit:
    input:
        recipe=fit_recipe_input,
        model=fitted_model,
        permutation=permutation_input,
    output:
        metrics=f"{FIT_OUT}/metrics.json",
        curves=f"{FIT_OUT}/curves.csv",
        predictor=f"{FIT_OUT}/predictor.safetensors",
    log:
        f"{NET_LOGS}/{FIT_SUBDIR}.log",
    benchmark:
        f"{NET_BENCHMARKS}/{FIT_SUBDIR}.tsv"
    threads: rule_threads("fit")
    resources:
        **rule_resources("fit"),
    params:
        **fit_params("fit", "fit"),
    shell:
        "{NERN} fit --config {input.recipe} --model {input.model} --permutation {input.permutation}"
        " {params.overrides} --set threads={threads} --set device={config[device]} --set progress=false"
        " --set compile={COMPILE} --out {params.out} --mlflow-uri {MLFLOW_URI} --experiment {PRESET} --run-name {params.run_name}"
        " {params.tags} > {log} 2>&1"
