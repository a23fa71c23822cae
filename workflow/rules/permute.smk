# Stage 2: coordinate permutations of each original network (none / infilter / crossfilter).


rule permute:
    input:
        model=original_model,
    output:
        permutation=f"{RESULTS}/{{net}}/permutation/{{orig}}/{{perm}}.safetensors",
        summary=f"{RESULTS}/{{net}}/permutation/{{orig}}/{{perm}}.json",
    log:
        f"{LOGS}/{{net}}/permutation/{{orig}}/{{perm}}.log",
    benchmark:
        f"{BENCHMARKS}/{{net}}/permutation/{{orig}}/{{perm}}.tsv"
    threads: rule_threads("permute")
    resources:
        **rule_resources("permute"),
    params:
        method=lambda wildcards: network_of(wildcards)["permute_method"],
        represent=represent_overrides,
    shell:
        "{NERN} permute --model {input.model} --mode {wildcards.perm} --method {params.method} {params.represent}"
        " --quiet --out {output.permutation} > {log} 2>&1"
