# Stage 2: coordinate permutations of each original network (none / infilter / crossfilter), or the network
# itself permuted along its weight-space symmetries (symmetry: a permuted equivalent network, identity
# coordinates, nothing stored; nern/symmetry.py).


rule permute:
    wildcard_constraints:
        perm="|".join(PERMUTATIONS),
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


rule permute_network:
    wildcard_constraints:
        perm="|".join(NETWORK_PERMUTATIONS),
    input:
        model=original_model,
    output:
        permutation=f"{RESULTS}/{{net}}/permutation/{{orig}}/{{perm}}.safetensors",
        summary=f"{RESULTS}/{{net}}/permutation/{{orig}}/{{perm}}.json",
        model=f"{RESULTS}/{{net}}/permutation/{{orig}}/{{perm}}.model.safetensors",
    log:
        f"{LOGS}/{{net}}/permutation/{{orig}}/{{perm}}.log",
    benchmark:
        f"{BENCHMARKS}/{{net}}/permutation/{{orig}}/{{perm}}.tsv"
    threads: rule_threads("permute")
    resources:
        **rule_resources("permute"),
    params:
        represent=represent_overrides,
    shell:
        "{NERN} permute --model {input.model} --mode {wildcards.perm} {params.represent} --quiet"
        " --out {output.permutation} --model-out {output.model} > {log} 2>&1"
