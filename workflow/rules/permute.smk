# Stage 2: coordinate permutations of each original network (none / infilter / crossfilter), or the network
# itself permuted along its weight-space symmetries (symmetry: a permuted equivalent network, identity
# coordinates, nothing stored; nern/symmetry.py).

PERMUTATION_OUT = f"{NET_RESULTS}/{PERMUTATION_STEM}"  # + .safetensors, .json, .model.safetensors


rule permute:
    wildcard_constraints:
        perm="|".join(PERMUTATIONS),
    input:
        model=original_model,
    output:
        permutation=f"{PERMUTATION_OUT}.safetensors",
        summary=f"{PERMUTATION_OUT}.json",
    log:
        f"{NET_LOGS}/{PERMUTATION_STEM}.log",
    benchmark:
        f"{NET_BENCHMARKS}/{PERMUTATION_STEM}.tsv"
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
        permutation=f"{PERMUTATION_OUT}.safetensors",
        summary=f"{PERMUTATION_OUT}.json",
        model=f"{PERMUTATION_OUT}.model.safetensors",
    log:
        f"{NET_LOGS}/{PERMUTATION_STEM}.log",
    benchmark:
        f"{NET_BENCHMARKS}/{PERMUTATION_STEM}.tsv"
    threads: rule_threads("permute")
    resources:
        **rule_resources("permute"),
    params:
        represent=represent_overrides,
    shell:
        "{NERN} permute --model {input.model} --mode {wildcards.perm} {params.represent} --quiet"
        " --out {output.permutation} --model-out {output.model} > {log} 2>&1"
