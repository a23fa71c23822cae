# Stage 8 (application): weight importance from NeRN's reconstruction error (nern/importance.py): error maps
# per layer, and the ORIGINAL network pruned by NeRN error vs magnitude vs at random (no fine-tuning).
# Outputs live beside the fit (the application helpers are in common.smk):
#   results/<preset>/<net>/<fit dir>/importance/{importance.csv,importance.md,pruning.png,error_maps.png,kernels.png,
#                                               metrics.json}


def importance_outputs():
    return application_outputs("importance", ["importance.csv", "importance.md", "pruning.png", "error_maps.png",
                                              "kernels.png", "metrics.json"])


rule importance:
    wildcard_constraints:
        fitpoint=FIT_DIR_PATTERN,
    input:
        model=application_model,
        predictor=f"{NET_RESULTS}/{{fitpoint}}/predictor.safetensors",
    output:
        table=application_report("importance", "importance.csv", "table_importance", "Weight importance",
                                  "top-1 after pruning"),
        markdown=application_path("importance", "importance.md"),
        pruning=application_report("importance", "pruning.png", "figure_pruning", "Weight importance",
                                   "pruning curves"),
        maps=application_report("importance", "error_maps.png", "figure_error_maps", "Weight importance",
                                "error maps"),
        kernels=application_report("importance", "kernels.png", "figure_kernels", "Weight importance", "kernels"),
        metrics=application_path("importance", "metrics.json"),
    log:
        f"{NET_LOGS}/{{fitpoint}}/importance.log",
    benchmark:
        f"{NET_BENCHMARKS}/{{fitpoint}}/importance.tsv"
    threads: application_threads("importance")
    resources:
        **application_resources("importance"),
    params:
        data=application_data,
        options=grid.stage_options(config, "importance"),
        tags=lambda wildcards: application_tags(wildcards, "importance"),
        out=lambda wildcards, output: os.path.dirname(output.metrics),
    shell:
        "{NERN} importance --model {input.model} --predictor {input.predictor} {params.data} {params.options}"
        " --set threads={threads} --set device={config[device]} --set progress=false --out {params.out}"
        " --mlflow-uri {MLFLOW_URI} --experiment {PRESET} --run-name importance:{wildcards.net}/{wildcards.fitpoint}"
        " {params.tags} > {log} 2>&1"
