# Config validation, the experiment plan, wildcard constraints and every input function.
# All logic lives in flanpipe; this file only maps wildcards to paths.

from pathlib import Path

from flanpipe.config import budget_tokens, check_world, train_spec, validate_config
from flanpipe.experiments import (
    EvalVariant,
    options_setting,
    parse_shard_variant,
    plan_experiment,
    shard_options_share,
)
from flanpipe.ingest import check_local_source
from flanpipe.io import read_yaml, resolve_config_path
from flanpipe.model_config import load_model_config, param_count
from flanpipe.registry import ROLES


config = validate_config(config)  # defaults filled; a wrong key or type fails before any job
PLAN = plan_experiment(config)  # registry + templates validated against each dataset's fields
HUB = sorted(name for name, spec in PLAN.registry.items() if spec.source.type == "hf")
LOCAL = sorted(name for name, spec in PLAN.registry.items() if spec.source.type == "local")
SYNTHETIC = sorted(
    name for name, spec in PLAN.registry.items() if spec.source.path.startswith("results/synthetic/")
)
TRAINED = sorted(PLAN.mixtures)  # runs trained here (tuned and pretrained), not given checkpoints


def _train_world():
    """Training ranks: the profile's train `tasks` (set-resources), else TP x PP (rules/train.smk)."""
    t = config["train"]
    default = t["tensor_model_parallel_size"] * t["pipeline_model_parallel_size"]
    res = workflow.resource_settings.overwrite_resources.get("train", {})
    tasks = res.get("tasks") if hasattr(res, "get") else None
    try:
        value = getattr(tasks, "value", tasks)
    except ValueError:  # a callable resource: known only per job
        value = None
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value), "set-resources train:tasks (the profile or --set-resources)"
    return default, "the default train tasks = TP x PP"


check_world(config, *_train_world())  # world = TP x PP x DP and the batch arithmetic, before any job

CONDA_ENV = "../workflow/envs/flanpipe.yaml"  # every rule's software (--sdm conda); relative to rules/
EXPERIMENT = Path(workflow.configfiles[-1]).name if workflow.configfiles else "flanpipe"


def _alternatives(names):
    return "|".join(sorted(names)) or "__none__"


wildcard_constraints:
    dataset=_alternatives(PLAN.registry),
    hub_dataset=_alternatives(HUB),
    local_dataset=_alternatives(LOCAL),
    synthetic=_alternatives(SYNTHETIC),
    run=_alternatives(TRAINED),
    evalrun=_alternatives(PLAN.runs),
    shard=r"lm|(natural|no_template|dataset_name)-(all|\d+)(-opts\d+)?",
    variant=r"(natural|no_template|dataset_name)(-noopts)?(-\d+shot)?",
    ablation="|".join(("clusters", "scale", "instructions", "templates", "options")),
    split="train|validation|test",


localrules:
    download,
    train_spec,
    report,
    ablation,


def raw_inputs(wildcards):
    """The local source file of one split; one no rule makes must exist already (checked with the DAG)."""
    spec = PLAN.registry[wildcards.local_dataset]
    if wildcards.local_dataset not in SYNTHETIC:
        check_local_source(spec, wildcards.split, Path(config["data"]["root"]))
    return [str(Path(config["data"]["root"]) / spec.source.path.format(split=spec.splits[wildcards.split]))]


def template_file(wildcards):
    return str(PLAN.registry[wildcards.dataset].templates)


def shard_mode(wildcards):
    return parse_shard_variant(wildcards.shard)[0]


def shard_num_templates(wildcards):
    return parse_shard_variant(wildcards.shard)[1]


def shard_formats(wildcards):
    """config formats, with the options ablation's share for its -optsNN shards."""
    share = shard_options_share(wildcards.shard)
    return {**config["formats"], **({} if share is None else {"options": share})}


def eval_shard_inputs(wildcards):
    """Validation and test splits; few-shot variants also draw exemplars from train."""
    d = wildcards.dataset
    inputs = {s: f"results/ingest/{d}/{s}.parquet" for s in ("validation", "test")}
    if EvalVariant.parse(wildcards.variant).shots:
        inputs["train"] = f"results/ingest/{d}/train.parquet"
    return inputs


def variant_params(wildcards):
    v = EvalVariant.parse(wildcards.variant)
    return {"mode": v.mode, "options_in_prompt": v.options, "shots": v.shots}


def run_shards(wildcards):
    run = PLAN.runs[wildcards.run]
    return {d: f"results/shards/{d}/train/{run.shard_variant}.parquet" for d in run.datasets}


def run_budget(wildcards):
    run = PLAN.runs[wildcards.run]
    return budget_tokens(config, steps=run.steps)


def tokenizer_shards(wildcards):
    """The tokenizer learns from every training shard of the main runs (one vocabulary for all runs)."""
    main = [r for r in PLAN.runs.values() if r.kind == "tune" and "__" not in r.name]
    return sorted({f"results/shards/{d}/train/{r.shard_variant}.parquet" for r in main for d in r.datasets})


def tokenizer_model(wildcards=None):
    """The configured .model (e.g. the base model's vocabulary), or the one trained on the shards."""
    given = config["tokenizer"]["model"]
    return str(resolve_config_path(given)) if given else "results/tokenizer/spm.model"


def run_model_config(wildcards):
    return str(resolve_config_path(PLAN.runs[wildcards.run].model))


def run_spec(wildcards):
    """The JSON run spec: model config + training facts, the run's step count, its initial weights."""
    run = PLAN.runs[wildcards.run]
    init = PLAN.model_dir(run.init) if run.init else None
    return train_spec(config, read_yaml(resolve_config_path(run.model)), steps=run.steps, init_checkpoint=init)


def train_inputs(wildcards):
    PLAN.check_run(wildcards.run)  # model config vs TP/PP, lengths, tokenizer, base checkpoint
    run = PLAN.runs[wildcards.run]
    inputs = {"spec": f"results/specs/{run.name}.json", "data": f"results/packed/{run.name}"}
    if run.init:
        inputs["init"] = PLAN.model_dir(run.init)
    return inputs


def train_tasks(wildcards):
    """Ranks of one training job at data-parallel size 1 (more DP ranks come from the profile)."""
    t = config["train"]
    return t["tensor_model_parallel_size"] * t["pipeline_model_parallel_size"]


def eval_inputs(wildcards):
    PLAN.check_run(wildcards.evalrun)
    return {
        "model": PLAN.model_dir(wildcards.evalrun),
        "tokenizer": tokenizer_model(),
        "shard": f"results/shards/{wildcards.dataset}/eval/{wildcards.variant}.parquet",
    }


def dataset_metric(wildcards):
    return PLAN.registry[wildcards.dataset].metric


def _record_meta(evaluation, ablation=None):
    """What the report needs to know about one evaluation besides its scores."""
    run = PLAN.runs[evaluation.run]
    model = load_model_config(resolve_config_path(run.model))
    meta = {
        "run": run.name,
        "variant": evaluation.variant,
        "held_out": run.held_out or PLAN.registry[evaluation.dataset].cluster,
        "role": "tuned" if run.kind == "tune" else "base",
        "model": Path(run.model).stem,
        "params": param_count(model),
    }
    if ablation == "clusters":
        meta["ablation_value"] = len({PLAN.registry[d].cluster for d in run.datasets})
    elif ablation == "scale":
        meta["ablation_value"] = meta["params"]
    elif ablation == "instructions":
        meta["ablation_value"] = f"{run.train_mode}->{EvalVariant.parse(evaluation.variant).mode}"
    elif ablation == "templates":
        meta["ablation_value"] = run.num_templates
    elif ablation == "options":
        share = config["formats"]["options"] if run.options_share is None else run.options_share
        shown = "options" if EvalVariant.parse(evaluation.variant).options else "no options"
        meta["ablation_value"] = f"{options_setting(share)}->{shown}"
    return meta


def report_inputs(wildcards=None):
    return [e.path for e in PLAN.evaluations]


def report_meta(wildcards=None):
    return [_record_meta(e) for e in PLAN.evaluations]


def ablation_inputs(wildcards):
    return [e.path for e in PLAN.ablations.get(wildcards.ablation, [])]


def ablation_meta(wildcards):
    return [_record_meta(e, wildcards.ablation) for e in PLAN.ablations.get(wildcards.ablation, [])]


def all_targets():
    return ["results/summary.json", "results/summary.md", "results/figures/summary.png"]
