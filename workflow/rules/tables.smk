# Stage 6: the paper's tables and figures, aggregated from the runs' metrics.json / curves.csv only.

MANIFEST = f"{RESULTS}/manifest.yaml"  # which run fills which table row (nern/grid.py)


rule manifest:
    # Which run fills which table row, written from the config: a new or changed row reruns the tables.
    output:
        MANIFEST,
    log:
        f"{LOGS}/manifest.log",
    localrule: True
    params:
        manifest=grid.manifest(config, ROWS).to_dict(),
    run:
        grid.write_manifest(output[0], params.manifest)
        Path(log[0]).write_text(f"{len(params.manifest['rows'])} table rows -> {output[0]}\n")


rule tables:
    input:
        manifest=MANIFEST,
        fits=grid.fit_metrics(ROWS),
        curves=[path.replace("metrics.json", "curves.csv") for path in grid.fit_metrics(ROWS)],
        originals=grid.original_metrics(PRESET, ROWS),
        compressed=grid.compression_tables(config, ROWS),  # aggregated into the rate-distortion table
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
        tables=TABLES,
        figures=FIGURES,
    shell:
        "{NERN} tables --manifest {input.manifest} {params.published} --tables {params.tables}"
        " --figures {params.figures} > {log} 2>&1"
