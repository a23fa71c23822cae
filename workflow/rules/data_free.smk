# Stage 5: data-free fits: the distillation losses see U[-2, 2] noise instead of task images.

DATA_FREE_POINT = "data-free/{fit_preset}/{orig}/{perm}/h{hidden}"
DATA_FREE_DIR = f"{RESULTS}/{{net}}/{DATA_FREE_POINT}"


use rule fit as fit_data_free with:
    output:
        metrics=f"{DATA_FREE_DIR}/metrics.json",
        curves=f"{DATA_FREE_DIR}/curves.csv",
        predictor=f"{DATA_FREE_DIR}/predictor.safetensors",
    log:
        f"{LOGS}/{{net}}/{DATA_FREE_POINT}.log",
    benchmark:
        f"{BENCHMARKS}/{{net}}/{DATA_FREE_POINT}.tsv"
    params:
        overrides=lambda wildcards: fit_overrides(wildcards, {"data_free": True}),
        tags=lambda wildcards: fit_tags(wildcards, "fit_data_free", "data-free"),
        run_name=lambda wildcards: fit_run_name(wildcards, "data-free"),
        out=lambda wildcards, output: os.path.dirname(output.metrics),
