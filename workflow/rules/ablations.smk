# Stage 4: ablations at each network's reference point: one fit per variant (loss terms, weight
# sampling, smooth vs non-smooth embeddings, ...). A variant with no overrides is the reference fit itself.

ABLATION_POINT = "ablation/{variant}/{fit_preset}/{orig}/{perm}/h{hidden}"
ABLATION_DIR = f"{RESULTS}/{{net}}/{ABLATION_POINT}"


use rule fit as fit_ablation with:
    output:
        metrics=f"{ABLATION_DIR}/metrics.json",
        curves=f"{ABLATION_DIR}/curves.csv",
        predictor=f"{ABLATION_DIR}/predictor.safetensors",
    log:
        f"{LOGS}/{{net}}/{ABLATION_POINT}.log",
    benchmark:
        f"{BENCHMARKS}/{{net}}/{ABLATION_POINT}.tsv"
    params:
        overrides=lambda wildcards: fit_overrides(wildcards, variant_set(wildcards)),
        tags=lambda wildcards: fit_tags(wildcards, "fit_ablation", wildcards.variant),
        run_name=lambda wildcards: fit_run_name(wildcards, wildcards.variant),
        out=lambda wildcards, output: os.path.dirname(output.metrics),
