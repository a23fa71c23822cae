# Stage 4: ablations at each network's reference point: one fit per variant (loss terms, weight
# sampling, smooth vs non-smooth embeddings, ...). A variant with no overrides is the reference fit itself.

ABLATION_SUBDIR = FIT_DIRS["ablation"]
ABLATION_OUT = f"{NET_RESULTS}/{ABLATION_SUBDIR}"


use rule fit as fit_ablation with:
    output:
        metrics=f"{ABLATION_OUT}/metrics.json",
        curves=f"{ABLATION_OUT}/curves.csv",
        predictor=f"{ABLATION_OUT}/predictor.safetensors",
    log:
        f"{NET_LOGS}/{ABLATION_SUBDIR}.log",
    benchmark:
        f"{NET_BENCHMARKS}/{ABLATION_SUBDIR}.tsv"
    params:
        **fit_params("ablation", "fit_ablation"),
