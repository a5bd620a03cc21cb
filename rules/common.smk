# Config validation, the experiment plan, wildcard constraints and every input function.
# All logic lives in flanpipe; this file only maps wildcards to paths.

import json
from pathlib import Path

from flanpipe.config import budget_tokens, plan_experiment, train_spec, validate_config
from flanpipe.io import read_yaml, resolve_config_path
from flanpipe.registry import ROLES


config = validate_config(config)  # defaults filled; a wrong key or type fails before any job
PLAN = plan_experiment(config)  # registry + templates validated against each dataset's fields
MODEL_CONFIG = resolve_config_path(config["model"])
TRAIN_SPEC = train_spec(config, read_yaml(MODEL_CONFIG))
HUB = sorted(name for name, spec in PLAN.registry.items() if spec.source.type == "hf")
LOCAL = sorted(name for name, spec in PLAN.registry.items() if spec.source.type == "local")
SYNTHETIC = sorted(
    name for name, spec in PLAN.registry.items() if spec.source.path.startswith("results/synthetic/")
)


def _alternatives(names):
    return "|".join(sorted(names)) or "__none__"


wildcard_constraints:
    dataset=_alternatives(PLAN.registry),
    hub_dataset=_alternatives(HUB),
    local_dataset=_alternatives(LOCAL),
    synthetic=_alternatives(SYNTHETIC),
    mixture=_alternatives(PLAN.mixtures),
    split="train|validation|test",


localrules:
    download,
    train_spec,
    report,


def raw_inputs(wildcards):
    """The local source file of one split."""
    spec = PLAN.registry[wildcards.local_dataset]
    return [spec.source.path.format(split=spec.splits[wildcards.split])]


def template_file(wildcards):
    return str(PLAN.registry[wildcards.dataset].templates)


def mixture_shards(wildcards):
    return {d: f"results/shards/{d}/train.parquet" for d in PLAN.mixtures[wildcards.mixture]}


def all_train_shards(wildcards):
    return [f"results/shards/{d}/train.parquet" for d in PLAN.train_datasets]


def tokenizer_model(wildcards=None):
    """The configured .model (e.g. the base model's vocabulary), or the one trained on the shards."""
    given = config["tokenizer"]["model"]
    return str(resolve_config_path(given)) if given else "results/tokenizer/spm.model"


def train_tasks(wildcards):
    """Ranks of one training job at data-parallel size 1 (more DP ranks come from the profile)."""
    t = config["train"]
    return t["tensor_model_parallel_size"] * t["pipeline_model_parallel_size"]


def eval_inputs(wildcards):
    return {
        "model": f"results/models/{wildcards.mixture}",
        "tokenizer": tokenizer_model(),
        "shard": f"results/shards/{wildcards.dataset}/eval.parquet",
    }


def dataset_metric(wildcards):
    return PLAN.registry[wildcards.dataset].metric


def eval_results(mixture):
    return [f"results/eval/{mixture}/{d}.json" for d in PLAN.evaluations[mixture]]


def all_eval_results(wildcards=None):
    return [path for m in PLAN.mixtures for path in eval_results(m)]


def all_targets():
    return ["results/summary.json", "results/summary.md"]
