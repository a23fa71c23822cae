# Stage 7 (application): meta-compression of every fitted NeRN (nern/compress.py). The predictor is pruned,
# fine-tuned and quantised into real files; every file is read back and measured, next to the same codecs
# applied to the original network. One job per fit directory; outputs live beside the fit:
#   results/<preset>/<net>/<fit dir>/compress/{compression.csv,compression.md,accuracy_vs_bytes.png,metrics.json,files/}
# The application helpers (application_*) are in common.smk.


def compress_outputs():
    return application_outputs("compress", ["compression.csv", "compression.md", "accuracy_vs_bytes.png",
                                            "metrics.json"])


rule compress:
    wildcard_constraints:
        fitpoint=FIT_DIR_PATTERN,
    input:
        model=application_model,
        predictor=f"{NET_RESULTS}/{{fitpoint}}/predictor.safetensors",
    output:
        table=application_report("compress", "compression.csv", "table_compression", "Meta-compression",
                                 "bytes and accuracy per file"),
        markdown=application_path("compress", "compression.md"),
        figure=application_report("compress", "accuracy_vs_bytes.png", "figure_accuracy_vs_bytes",
                                  "Meta-compression", "accuracy vs bytes"),
        metrics=application_path("compress", "metrics.json"),
    log:
        f"{NET_LOGS}/{{fitpoint}}/compress.log",
    benchmark:
        f"{NET_BENCHMARKS}/{{fitpoint}}/compress.tsv"
    threads: application_threads("compress")
    resources:
        **application_resources("compress"),
    params:
        data=application_data,
        options=grid.stage_options(config, "compress"),
        tags=lambda wildcards: application_tags(wildcards, "compress"),
        out=lambda wildcards, output: os.path.dirname(output.metrics),
    shell:
        "{NERN} compress --model {input.model} --predictor {input.predictor} {params.data} {params.options}"
        " --set threads={threads} --set device={config[device]} --set progress=false --out {params.out}"
        " --mlflow-uri {MLFLOW_URI} --experiment {PRESET} --run-name compress:{wildcards.net}/{wildcards.fitpoint}"
        " {params.tags} > {log} 2>&1"
