# Stage 5: data-free fits: the distillation losses see U[-2, 2] noise instead of task images.

DATA_FREE_SUBDIR = FIT_DIRS["data-free"]
DATA_FREE_OUT = f"{NET_RESULTS}/{DATA_FREE_SUBDIR}"


use rule fit as fit_data_free with:
    output:
        metrics=f"{DATA_FREE_OUT}/metrics.json",
        curves=f"{DATA_FREE_OUT}/curves.csv",
        predictor=f"{DATA_FREE_OUT}/predictor.safetensors",
    log:
        f"{NET_LOGS}/{DATA_FREE_SUBDIR}.log",
    benchmark:
        f"{NET_BENCHMARKS}/{DATA_FREE_SUBDIR}.tsv"
    params:
        **fit_params("data-free", "fit_data_free", "data-free"),
