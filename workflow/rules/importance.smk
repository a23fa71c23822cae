# Stage 8 (application): weight importance from NeRN's reconstruction error (nern/importance.py): error maps
# per layer, and the ORIGINAL network pruned by NeRN error vs magnitude vs at random (no fine-tuning).
# Uses the helpers of compress.smk (include it first). Outputs live beside the fit:
#   results/<preset>/<net>/<fit dir>/importance/{importance.csv,importance.md,pruning.png,error_maps.png,kernels.png,...}


def importance_outputs():
    return application_outputs("importance", ["importance.csv", "importance.md", "pruning.png", "error_maps.png",
                                              "kernels.png", "metrics.json"])


rule importance:
    wildcard_constraints:
        fitpoint=FIT_POINT,
    input:
        model=application_model,
        predictor=f"{RESULTS}/{{net}}/{{fitpoint}}/predictor.safetensors",
    output:
        table=application_report(f"{RESULTS}/{{net}}/{{fitpoint}}/importance/importance.csv",
                                 "table_importance", "Weight importance", "top-1 after pruning"),
        markdown=f"{RESULTS}/{{net}}/{{fitpoint}}/importance/importance.md",
        pruning=application_report(f"{RESULTS}/{{net}}/{{fitpoint}}/importance/pruning.png",
                                   "figure_pruning", "Weight importance", "pruning curves"),
        maps=application_report(f"{RESULTS}/{{net}}/{{fitpoint}}/importance/error_maps.png",
                                "figure_error_maps", "Weight importance", "error maps"),
        kernels=application_report(f"{RESULTS}/{{net}}/{{fitpoint}}/importance/kernels.png",
                                   "figure_kernels", "Weight importance", "kernels"),
        metrics=f"{RESULTS}/{{net}}/{{fitpoint}}/importance/metrics.json",
    log:
        f"{LOGS}/{{net}}/{{fitpoint}}/importance.log",
    benchmark:
        f"{BENCHMARKS}/{{net}}/{{fitpoint}}/importance.tsv"
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
