# Config validation, the experiment plan, wildcard constraints and every input function.
# All logic lives in flanpipe (the Plan's methods, flanpipe.core.vocab's names); this file only maps
# wildcards to paths and params, plus set_resource: the one place Snakemake internals are read.

from pathlib import Path

from flanpipe.plan.checks import check_config_files
from flanpipe.plan.config import check_nodes, check_world, validate_config
from flanpipe.plan.experiments import plan_experiment
from flanpipe.data.ingest import check_local_source
from flanpipe.core.io import resolve_config_path
from flanpipe.core.rerun import canonical, stage_version
from flanpipe.core.threads import train_job_threads
from flanpipe.plan import contract
from flanpipe.core.vocab import ABLATIONS, SHARD_PATTERN, SPLITS, VARIANT_PATTERN, EvalVariant, parse_shard_name, shard_options_share


check_config_files(workflow.configfiles)  # Snakemake's YAML reader keeps a duplicate key's last value
config = validate_config(config)  # defaults filled; a wrong key or type fails before any job
PLAN = plan_experiment(config)  # registry + templates validated against each dataset's fields
HUB = sorted(name for name, spec in PLAN.registry.items() if spec.source.type == "hf")
LOCAL = sorted(name for name, spec in PLAN.registry.items() if spec.source.type == "local")
SYNTHETIC = sorted(
    name for name, spec in PLAN.registry.items() if spec.source.path.startswith("results/synthetic/")
)
TRAINED = sorted(PLAN.mixtures)  # runs trained here (tuned and pretrained), not given checkpoints


def set_resource(rule, name):
    """A resource the profile or --set-resources gives ``rule`` for every job, or None.

    Snakemake has no public API for this: it reads workflow.resource_settings.overwrite_resources,
    Snakemake's own table of set-resources. A string is evaluated only per job, so its text is returned
    (``mpi: "srun"`` -> "srun"); a resource computed by a function is known only per job (reading its
    ``value`` raises ValueError) and counts as not set, as does a Snakemake without that table.
    """
    try:
        res = workflow.resource_settings.overwrite_resources.get(rule, {})
        value = res.get(name)
        if getattr(value, "is_evaluable", lambda: False)() and isinstance(getattr(value, "raw", None), str):
            return value.raw.strip().strip("'\"")
        return getattr(value, "value", value)
    except (AttributeError, ValueError):
        return None


def train_tasks(wildcards=None):
    """Ranks of one training job at data-parallel size 1 (more DP ranks come from the profile)."""
    t = config["train"]
    return t["tensor_model_parallel_size"] * t["pipeline_model_parallel_size"]


def train_threads(wildcards=None):
    """All cores for a run that trains alone in the DAG (the base every other run starts from), half
    for runs that can train side by side (flanpipe.core.threads.train_job_threads); the profile's set-threads
    overrides it. Under an executor that gives no --cores (a SLURM profile), Snakemake refuses to read
    workflow.cores: then 1, and the profile's set-threads decides."""
    try:
        cores = workflow.cores
    except Exception:  # snakemake's WorkflowError: "requires a total number of cores"
        return 1
    run = getattr(wildcards, "run", None)
    if run is None:
        return max(1, (cores or 1) // 2)
    # the runs the default target trains; for an ablation target every planned run (the conservative choice)
    main = {e.run for e in PLAN.evaluations if e.run in PLAN.runs}
    main |= {PLAN.runs[r].init for r in main if PLAN.runs[r].init in PLAN.runs}
    return train_job_threads(cores or 1, run, {r: PLAN.runs[r].init for r in (main if run in main else PLAN.runs)})


def set_tasks(rule):
    """The `tasks` the profile or --set-resources gives ``rule``, as an int, or None."""
    value = set_resource(rule, "tasks")
    return int(value) if isinstance(value, int) or (isinstance(value, str) and value.isdigit()) else None


def _train_world():
    """Training ranks: the profile's train `tasks` (set-resources), else TP x PP (rules/train.smk)."""
    if (tasks := set_tasks("train")) is not None:
        return tasks, "set-resources train:tasks (the profile or --set-resources)"
    return train_tasks(), "the default train tasks = TP x PP"


check_world(config, *_train_world())  # world = TP x PP x DP and the batch arithmetic, before any job
check_nodes(  # the profile's nodes: srun ranks filling them evenly, whole TP groups per node, before any job
    "train",
    _train_world()[0],
    set_resource("train", "nodes"),
    config["train"]["tensor_model_parallel_size"],
    set_resource("train", "mpi"),
)

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
    shard=SHARD_PATTERN,
    variant=VARIANT_PATTERN,
    ablation="|".join(ABLATIONS),
    split="|".join(SPLITS),


localrules:
    sources_check,
    download,
    train_spec,
    report,
    ablation,


def _eval_split_inputs(dataset, split):
    """For the train role, the dataset's canonical validation/test splits (split hygiene compares them)."""
    if split != "train":
        return {}
    return {r: f"results/ingest/{dataset}/{r}.parquet" for r in ("validation", "test") if r in PLAN.registry[dataset].splits}


def ingest_inputs(wildcards):
    """The local source file of one split (one no rule makes must exist already, checked with the DAG),
    and for the train role the eval splits it is checked against."""
    spec = PLAN.registry[wildcards.local_dataset]
    if wildcards.local_dataset not in SYNTHETIC:
        check_local_source(spec, wildcards.split, Path(config["data"]["root"]))
    raw = str(Path(config["data"]["root"]) / spec.source.path.format(split=spec.splits[wildcards.split]))
    return {"raw": raw, **_eval_split_inputs(wildcards.local_dataset, wildcards.split)}


def download_inputs(wildcards):
    """The pre-flight check of the hub sources (once: ancient), and for train the eval splits."""
    return {"check": ancient("results/sources/check.md"), **_eval_split_inputs(wildcards.hub_dataset, wildcards.split)}


def hub_source_entries():
    """Per hub dataset, what the sources_check job checks: the entry's ingest facts (a change reruns it)."""
    return {d: contract.ingest_spec(config, PLAN.registry[d])[0] for d in HUB}


def hub_source_ops():
    """Where sources_check looks (data.root, data.hf_cache) and each entry's registry file: operational."""
    from flanpipe.core.rerun import Operational

    files = {d: PLAN.registry[d].defined_in for d in HUB}
    return Operational({"root": config["data"]["root"], "hf_cache": config["data"]["hf_cache"], "defined_in": files})


def template_file(wildcards):
    return str(PLAN.registry[wildcards.dataset].templates)


def ingest_facts(wildcards):
    """Rules ingest / download: the registry entry's facts (flanpipe.plan.contract.ingest_spec)."""
    name = getattr(wildcards, "local_dataset", None) or wildcards.hub_dataset
    return contract.ingest_spec(config, PLAN.registry[name])[0]


def ingest_policy(wildcards):
    """The train role's data.split_duplicates (contract.ingest_policy); nothing for the eval roles."""
    return contract.ingest_policy(config, wildcards.split)


def ingest_ops(wildcards):
    name = getattr(wildcards, "local_dataset", None) or wildcards.hub_dataset
    return contract.ingest_spec(config, PLAN.registry[name])[1]


def dataset_facts(wildcards):
    """What rendering reads of the registry entry (flanpipe.core.registry.RENDER_FACTS)."""
    return contract.dataset_render_facts(PLAN.registry[wildcards.dataset])


def templates_of(dataset):
    """A dataset's validated templates (loaded once by the plan; loaded here for one it did not need)."""
    from flanpipe.data.templates import load_validated

    return PLAN.templates[dataset] if dataset in PLAN.templates else load_validated(PLAN.registry[dataset])


def template_facts(wildcards):
    """The dataset's parsed templates: tracked, so a comment in the file reruns nothing (contract.template_facts)."""
    return contract.template_facts(templates_of(wildcards.dataset))


def shard_mode(wildcards):
    return parse_shard_name(wildcards.shard)[0]


def shard_num_templates(wildcards):
    return parse_shard_name(wildcards.shard)[1]


def shard_formats(wildcards):
    """config formats, with the options ablation's share for its -optsNN shards."""
    share = shard_options_share(wildcards.shard)
    return canonical({**config["formats"], **({} if share is None else {"options": share})})


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
    return PLAN.run_shards(wildcards.run)


def run_budget(wildcards):
    return PLAN.budget_tokens(wildcards.run)


def tokenizer_shards(wildcards):
    return PLAN.tokenizer_shards()


def tokenizer_model(wildcards=None):
    """The configured .model (e.g. the base model's vocabulary), or the one trained on the shards."""
    given = config["tokenizer"]["model"]
    return str(resolve_config_path(given)) if given else "results/tokenizer/spm.model"


def run_model_config(wildcards):
    return str(PLAN.run_model_config(wildcards.run))


def run_spec(wildcards):
    return PLAN.train_spec(wildcards.run)  # canonical: only what changes the weights (flanpipe.core.train_config)


def train_inputs(wildcards):
    PLAN.check_run(wildcards.run)  # model config vs TP/PP, lengths, tokenizer, base checkpoint
    run = PLAN.runs[wildcards.run]
    inputs = {"spec": f"results/specs/{run.name}.json", "data": f"results/packed/{run.name}"}
    if run.init:
        inputs["init"] = PLAN.model_dir(run.init)
    return inputs




def report_inputs(wildcards=None):
    return [e.path for e in PLAN.evaluations]


def report_meta(wildcards=None):
    return canonical([PLAN.record_meta(e) for e in PLAN.evaluations])


def report_published():
    """dataset -> the paper's published scores (registry `published:`), for the report's paper table."""
    return canonical({d: dict(s.published) for d, s in PLAN.registry.items() if s.published})


def ablation_inputs(wildcards):
    PLAN.check_ablation(wildcards.ablation)  # an ablation that cannot be planned fails only its own target
    return [e.path for e in PLAN.ablations.get(wildcards.ablation, [])]


def ablation_meta(wildcards):
    return canonical([PLAN.record_meta(e, wildcards.ablation) for e in PLAN.ablations.get(wildcards.ablation, [])])


def all_targets():
    """The report, and with base.hf every main tuned run exported back to HF format (rules/hf.smk)."""
    hf = [f"results/hf/{r.name}" for r in PLAN.runs.values() if r.is_main] if PLAN.hf_base else []
    return ["results/summary.json", "results/summary.md", "results/figures/summary.png", *hf]


def hf_source_files():
    """base.hf's config.json and weights: import_hf reruns when the checkpoint changes."""
    src = resolve_config_path(config["base"]["hf"])
    return [str(src / "config.json"), *sorted(str(p) for p in src.glob("*.safetensors*"))]


def export_inputs(wildcards):
    """A tuned run's model dir, and with base.hf the imported base whose tokenizer and config.json it ships."""
    PLAN.trained_run(wildcards.run)
    inputs = {"model": PLAN.model_dir(wildcards.run)}
    if PLAN.hf_base is not None:
        inputs["base"] = PLAN.model_dir(PLAN.hf_base.name)
    return inputs


def eval_group_members(wildcards):
    """The (variant, dataset) pairs one evaluation job scores (flanpipe.plan.eval_plan.planned_group_members)."""
    from flanpipe.plan.eval_plan import planned_group_members

    return planned_group_members(PLAN, wildcards.evalrun, wildcards.cluster)


def eval_world():
    """Ranks of one evaluation job: the profile's evaluate `tasks` (set-resources), else eval TP x PP."""
    tasks = set_tasks("evaluate")
    return eval_tasks() if tasks is None else tasks


def eval_tasks(wildcards=None):
    """Ranks of one evaluation job at data-parallel size 1: eval TP x PP (more DP ranks come from the profile)."""
    from flanpipe.eval.layout import eval_layout

    tp, pp = eval_layout(config)
    return tp * pp


def _check_eval_nodes():
    """The profile's evaluate `nodes` against its ranks (check_nodes), before any job."""
    from flanpipe.eval.layout import eval_layout

    check_nodes("evaluate", eval_world(), set_resource("evaluate", "nodes"), eval_layout(config)[0], set_resource("evaluate", "mpi"))


_check_eval_nodes()


def eval_group_inputs(wildcards):
    """The model, tokenizer and shards of one evaluation job; its layout is checked against the model first."""
    from flanpipe.eval.layout import check_eval_layout, eval_layout

    PLAN.check_run(wildcards.evalrun)
    from flanpipe.model.hf_format import load_model_file

    model = load_model_file(PLAN.run_model_config(wildcards.evalrun))
    check_eval_layout(model, *eval_layout(config), eval_world(), examples=config["eval"]["examples"])
    return {
        "model": PLAN.model_dir(wildcards.evalrun),
        "tokenizer": tokenizer_model(),
        "shards": [f"results/shards/{d}/eval/{v}.parquet" for v, d in eval_group_members(wildcards)],
    }


def eval_group_params(wildcards):
    """Result names (``<variant>/<dataset>``) and metrics, in the order of eval_group_inputs' shards (the
    layout is operational: contract.eval_ops)."""
    from flanpipe.plan.eval_plan import result_name

    members = eval_group_members(wildcards)
    return {"results": [result_name(v, d) for v, d in members], "metrics": [PLAN.registry[d].metric for _, d in members]}


def eval_group_dir(wildcards):
    """The evaluation job whose directory holds this result; an error naming what that job scores when the
    asked-for variant is not among them (a hand-typed target)."""
    from flanpipe.plan.eval_plan import eval_group_name

    cluster = eval_group_name(PLAN.registry[wildcards.dataset])
    from flanpipe.plan.eval_plan import planned_group_members

    members = planned_group_members(PLAN, wildcards.evalrun, cluster)
    if (wildcards.variant, wildcards.dataset) not in members:
        raise ValueError(
            f"{wildcards.evalrun} is not evaluated on {wildcards.dataset} under {wildcards.variant}: its "
            f"evaluate job on {cluster} scores {', '.join('/'.join(m) for m in members)}"
        )
    return f"results/eval_groups/{wildcards.evalrun}/{cluster}"
