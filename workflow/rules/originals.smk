# Stage 1: the original networks, either imported from published weights or pretrained per
# smoothness-regularisation factor (orig = reg<factor>).

IMPORTED = ORIGINAL_DIR.format(orig="imported")  # original/imported
TRAINED = ORIGINAL_DIR.format(orig="reg{reg}")  # original/reg{reg}


rule import_weights:
    input:
        import_inputs,
    output:
        model=f"{NET_RESULTS}/{IMPORTED}/model.safetensors",
        metrics=f"{NET_RESULTS}/{IMPORTED}/metrics.json",
    log:
        f"{NET_LOGS}/{IMPORTED}.log",
    threads: rule_threads("import_weights")
    resources:
        **rule_resources("import_weights"),
    params:
        overrides=import_overrides,
        out=lambda wildcards, output: os.path.dirname(output.model),
    shell:
        "{NERN} import {params.overrides} --set device={config[device]} --set progress=false"
        " --out {params.out} --mlflow-uri {MLFLOW_URI} --experiment {PRESET}"
        " --run-name import:{wildcards.net} --tag rule={rule} --tag preset={PRESET} --tag network={wildcards.net}"
        " > {log} 2>&1"


rule pretrain:
    input:
        original_sources,
    output:
        model=f"{NET_RESULTS}/{TRAINED}/model.safetensors",
        metrics=f"{NET_RESULTS}/{TRAINED}/metrics.json",
        curves=f"{NET_RESULTS}/{TRAINED}/curves.csv",
    log:
        f"{NET_LOGS}/{TRAINED}.log",
    benchmark:
        f"{NET_BENCHMARKS}/{TRAINED}.tsv"
    threads: rule_threads("pretrain")
    resources:
        **rule_resources("pretrain"),
    params:
        overrides=pretrain_overrides,
        out=lambda wildcards, output: os.path.dirname(output.model),
    shell:
        "{NERN} pretrain {params.overrides} --set threads={threads} --set device={config[device]}"
        " --set progress=false --out {params.out} --mlflow-uri {MLFLOW_URI} --experiment {PRESET}"
        " --run-name pretrain:{wildcards.net}/reg{wildcards.reg} --tag rule={rule} --tag preset={PRESET}"
        " --tag network={wildcards.net} --tag smoothness={wildcards.reg}"
        " > {log} 2>&1"
