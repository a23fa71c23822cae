# Stage 5: data-free fits: the distillation losses see U[-2, 2] noise instead of task images.


use rule fit as fit_data_free with:
    output:
        metrics=f"{RESULTS}/{{net}}/data-free/{{fit_preset}}/{{orig}}/{{perm}}/h{{hidden}}/metrics.json",
        curves=f"{RESULTS}/{{net}}/data-free/{{fit_preset}}/{{orig}}/{{perm}}/h{{hidden}}/curves.csv",
        predictor=f"{RESULTS}/{{net}}/data-free/{{fit_preset}}/{{orig}}/{{perm}}/h{{hidden}}/predictor.safetensors",
    log:
        f"{LOGS}/{{net}}/data-free/{{fit_preset}}/{{orig}}/{{perm}}/h{{hidden}}.log",
    benchmark:
        f"{BENCHMARKS}/{{net}}/data-free/{{fit_preset}}/{{orig}}/{{perm}}/h{{hidden}}.tsv"
    params:
        overrides=lambda wildcards: fit_overrides(wildcards, {"data_free": True}),
        tags=lambda wildcards: fit_tags(wildcards, "fit_data_free", "data-free"),
        run_name=lambda wildcards: fit_run_name(wildcards, "data-free"),
        out=lambda wildcards, output: os.path.dirname(output.metrics),
