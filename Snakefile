# NeRN reproduction pipeline: original networks -> permutations -> NeRN fits (grid, ablations, data-free)
# -> the paper's tables and figures. One preset per config file:
#   snakemake --profile workflow/profiles/local                                # config.yaml (default)
#   snakemake --profile workflow/profiles/local --configfile config/test.yaml  # the CI smoke preset
#   snakemake --profile workflow/profiles/slurm --configfile config/paper.yaml # the paper's grid
#   snakemake ... --configfile config/cifar10-codec.yaml experiments/codec/cifar10-codec-fmd.yaml  # a past sweep
# A preset is a whole config (config.yaml, config/*.yaml); a fit recipe is one fit's settings (config/recipes/).
# Every rule calls the `nern` CLI; the method lives in the nern package, not here.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


# A key of the older vocabulary (fit_presets, ...) fails in one line naming its new name, before the schema.
from nern.grid import check_renamed_keys

check_renamed_keys(config)
validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/originals.smk"
include: "workflow/rules/permute.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/ablations.smk"
include: "workflow/rules/data_free.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/importance.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
        compress_outputs(),
        importance_outputs(),
