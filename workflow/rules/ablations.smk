# Stage 4: ablations at each network's reference point: one fit per variant (loss terms, weight
# sampling, smooth vs non-smooth embeddings, ...). A variant with no overrides is the reference fit itself.

ABLATION_SUBDIR = "ablation/{variant}/{fit_recipe}/{orig}/{perm}/h{hidden}"
ABLATION_OUT = f"{RESULTS}/{{net}}/{ABLATION_SUBDIR}"


use rule fit as fit_ablation with:
    output:
        metrics=f"{ABLATION_OUT}/metrics.json",
        curves=f"{ABLATION_OUT}/curves.csv",
        predictor=f"{ABLATION_OUT}/predictor.safetensors",
    log:
        f"{LOGS}/{{net}}/{ABLATION_SUBDIR}.log",
    benchmark:
        f"{BENCHMARKS}/{{net}}/{ABLATION_SUBDIR}.tsv"
    params:
        **fit_params("ablation", "fit_ablation"),
