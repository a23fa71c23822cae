# Stage 6: the paper's tables and figures, aggregated from the runs' metrics.json / curves.csv only.


rule manifest:
    # Which run fills which table row: written from the config, so a new row reruns the tables.
    output:
        f"{RESULTS}/manifest.yaml",
    localrule: True
    params:
        manifest=manifest(),
    run:
        write_yaml(output[0], params.manifest)


rule tables:
    input:
        manifest=f"{RESULTS}/manifest.yaml",
        fits=fit_metrics(),
        curves=[path.replace("metrics.json", "curves.csv") for path in fit_metrics()],
        originals=original_metrics(),
        published=published_inputs(),
    output:
        table_outputs(),
        figure_outputs(),
    log:
        f"{LOGS}/tables.log",
    threads: rule_threads("tables")
    resources:
        **rule_resources("tables", per_network=False),
    params:
        published=lambda wildcards, input: f"--published {input.published}" if input.published else "",
    shell:
        "{NERN} tables --manifest {input.manifest} {params.published} --tables {TABLES} --figures {FIGURES}"
        " > {log} 2>&1"
