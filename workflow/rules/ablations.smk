# Stage 4: ablations at each network's reference point: one fit per variant (loss terms, weight
# sampling, smooth vs non-smooth embeddings, ...). A variant with no overrides is the reference fit itself.


use rule fit as fit_ablation with:
    output:
        metrics=f"{RESULTS}/{{net}}/ablation/{{variant}}/{{fit_preset}}/{{orig}}/{{perm}}/h{{hidden}}/metrics.json",
        curves=f"{RESULTS}/{{net}}/ablation/{{variant}}/{{fit_preset}}/{{orig}}/{{perm}}/h{{hidden}}/curves.csv",
        predictor=f"{RESULTS}/{{net}}/ablation/{{variant}}/{{fit_preset}}/{{orig}}/{{perm}}/h{{hidden}}/predictor.safetensors",
    log:
        f"{LOGS}/{{net}}/ablation/{{variant}}/{{fit_preset}}/{{orig}}/{{perm}}/h{{hidden}}.log",
    benchmark:
        f"{BENCHMARKS}/{{net}}/ablation/{{variant}}/{{fit_preset}}/{{orig}}/{{perm}}/h{{hidden}}.tsv"
    params:
        overrides=lambda wildcards: fit_overrides(wildcards, variant_set(wildcards)),
        tags=lambda wildcards: fit_tags(wildcards, "fit_ablation", wildcards.variant),
        run_name=lambda wildcards: fit_run_name(wildcards, wildcards.variant),
        out=lambda wildcards, output: os.path.dirname(output.metrics),
