# flanpipe: FLAN-style instruction tuning as a DAG.
#   synthetic/ingest -> templated shards -> capped, mixed mixtures (Polars) -> SentencePiece + packing
#   -> Megatron-Core training (one model per held-out cluster) -> zero-shot evaluation -> report
# Every rule's work is one function in the flanpipe package; `flanpipe --help` runs any step by hand.

from snakemake.utils import min_version

min_version("9.0")


# The embedded default, only when no --configfile names the experiment: Snakemake merges a configfile
# directive *under* every --configfile, so its keys (model, base.pretrain_steps, ...) would leak into
# config/flan137b.yaml or flan_hf.yaml. A recipe config means what its file says.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/mixture.smk"
include: "rules/tokenize.smk"
include: "rules/audit.smk"
include: "rules/hf.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/uncertainty.smk"


rule all:
    input:
        all_targets(),
    default_target: True
