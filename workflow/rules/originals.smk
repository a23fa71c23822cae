# Stage 1: the original networks, either imported from published weights or pretrained per
# smoothness-regularisation factor (orig = reg<factor>).


rule import_weights:
    input:
        import_inputs,
    output:
        model=f"{RESULTS}/{{net}}/original/imported/model.safetensors",
        metrics=f"{RESULTS}/{{net}}/original/imported/metrics.json",
    log:
        f"{LOGS}/{{net}}/original/imported.log",
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
        model=f"{RESULTS}/{{net}}/original/reg{{reg}}/model.safetensors",
        metrics=f"{RESULTS}/{{net}}/original/reg{{reg}}/metrics.json",
        curves=f"{RESULTS}/{{net}}/original/reg{{reg}}/curves.csv",
    log:
        f"{LOGS}/{{net}}/original/reg{{reg}}.log",
    benchmark:
        f"{BENCHMARKS}/{{net}}/original/reg{{reg}}.tsv"
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
