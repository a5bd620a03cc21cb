"""Experiment config: schema validation with defaults, and the plan derived from it.

The same function validates the config for the Snakefile and for the CLI, so a wrong key or type fails
before any job runs, with the key's path in the message.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema

from flanpipe.core.io import PROJECT_ROOT, load_yaml_text, read_yaml
from flanpipe.core.registry import DatasetSpec, load_registry, with_clusters, with_local_mirror, with_template_files
from flanpipe.core.train_config import OPERATIONAL, BatchSplitError, fact_keys, split_batch
from flanpipe.train.planner import node_split

SCHEMA_PATH = PROJECT_ROOT / "config" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The experiment config is wrong; the message names the key path."""


def _with_defaults(validator_cls: type) -> type:
    """A validator that fills schema defaults in place (as snakemake.utils.validate does)."""
    validate_props = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
                elif prop in instance:
                    instance[prop] = _as_schema_number(instance[prop], sub)
        yield from validate_props(validator, properties, instance, schema)

    # JSON Schema counts 1000.0 as an integer, so ``steps: 1000.0`` (or ``1e3``) would pass and then crash
    # range() in training: integer fields take ints only; whole floats are converted above, others rejected.
    checker = validator_cls.TYPE_CHECKER.redefine(
        "integer", lambda _checker, v: isinstance(v, int) and not isinstance(v, bool)
    )
    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults}, type_checker=checker)


def _types(schema: Mapping[str, Any]) -> list[str]:
    types = schema.get("type")
    return [types] if isinstance(types, str) else list(types or [])


def _yaml_scalar(text: str) -> Any:
    """``text`` as a YAML 1.2 plain scalar reads (``'1'`` -> 1, ``'3e-5'`` -> 3e-05, ``'true'`` -> True,
    ``'null'`` -> None), or ``text`` itself when it is no scalar of another type."""
    try:
        value = load_yaml_text(text, "<config value>")
    except ValueError:
        return text
    return value if value is None or isinstance(value, bool | int | float) else text


def _fits(value: Any, types: list[str]) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return (
        ("integer" in types and is_int)
        or ("number" in types and (is_int or isinstance(value, float)))
        or ("boolean" in types and isinstance(value, bool))
        or ("null" in types and value is None)
    )


def _number(value: Any, schema: Mapping[str, Any]) -> Any:
    """One value as the type its field wants.

    Strings are read as YAML 1.2 scalars where the field takes no string: Snakemake passes every nested
    ``--config`` value as a string (``--config base='{hf: DIR, fewshot: 1}'`` gives fewshot ``'1'``) and its
    YAML 1.1 reader keeps ``3e-5`` a string. In a field that takes a string or null, ``'null'`` is null
    (``--config model=null``). Then ``1000.0`` -> 1000 in an integer field."""
    types = _types(schema)
    if isinstance(value, str) and types:
        typed = _yaml_scalar(value.strip())
        if ("string" not in types and _fits(typed, types)) or ("null" in types and typed is None):
            value = typed
    if isinstance(value, float) and value.is_integer() and "integer" in types and "number" not in types:
        return int(value)
    return value


def _as_schema_number(value: Any, schema: Mapping[str, Any]) -> Any:
    """``_number`` on a field or on each item of a list field; anything else is left for the schema to judge."""
    items = schema.get("items")
    if isinstance(value, list) and isinstance(items, Mapping):
        return [_number(v, items) for v in value]
    return _number(value, schema)


def validate_config(config: Mapping[str, Any], schema_path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """Return a validated copy of ``config`` with defaults filled in."""
    schema = read_yaml(schema_path)
    out = copy.deepcopy(dict(config))
    cls = _with_defaults(jsonschema.validators.validator_for(schema))
    errors = sorted(cls(schema).iter_errors(out), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        path = [str(p) for p in e.absolute_path]
        if e.validator == "additionalProperties":  # name the unknown key itself, with its full path
            unknown = sorted(set(e.instance) - set(e.schema.get("properties", {})))
            allowed = ", ".join(sorted(e.schema.get("properties", {})))
            keys = ", ".join(".".join([*path, k]) for k in unknown)
            raise ConfigError(f"config key {keys}: unknown key (allowed here: {allowed})")
        if e.validator == "required":  # name the missing key itself, with its full path
            missing = [k for k in e.validator_value if k not in e.instance]
            keys = ", ".join(".".join([*path, k]) for k in missing)
            raise ConfigError(f"config key {keys}: required key is missing ({e.message})")
        key = ".".join(path) or "<top level>"
        raise ConfigError(f"config key {key}: {e.message}")
    check_cross_fields(out)
    return with_hf_base(out)


def with_hf_base(config: dict[str, Any]) -> dict[str, Any]:
    """With ``base.hf``, the checkpoint decides the model and the tokenizer: ``model`` becomes its config.json
    (a given model config must describe the same architecture) and ``tokenizer.model`` its directory.

    The tokenizer is read from the HF dir itself, not the imported copy, so the plan-time vocabulary checks
    run before the import job exists. Torch-free: config.json is plain JSON and the weights' headers are read
    without torch, so a checkpoint the import job would refuse fails here, before the queue wait."""
    from flanpipe.core.io import resolve_config_path
    from flanpipe.model.hf_format import load_model_file

    base = config["base"]
    if not base["hf"]:
        if not config["model"]:
            raise ConfigError("config key model: required key is missing (a model config file, or base.hf)")
        return config
    for key, bad in (("checkpoint", base["checkpoint"]), ("pretrain_steps", base["pretrain_steps"])):
        if bad:
            raise ConfigError(
                f"config key base.{key}: {bad!r} conflicts with base.hf = {base['hf']!r}; the HF checkpoint is "
                f"the base model (nothing is pretrained here), so leave base.{key} unset"
            )
    hf_dir = resolve_config_path(base["hf"])
    path = hf_dir / "config.json"
    if not path.is_file():
        hint = (
            " (it holds model.json: a flanpipe model dir, e.g. an import-hf output; give it as base.checkpoint)"
            if (hf_dir / "model.json").is_file()
            else ""
        )
        raise ConfigError(
            f"config key base.hf: {path} not found; base.hf must be a HuggingFace checkpoint dir holding "
            f"config.json{hint}"
        )
    from flanpipe.model.hf_format import HFFormatError, check_hf_checkpoint

    try:  # config.json and the safetensors headers (missing shard, truncated file, tie, shapes): no torch
        _, want, _, _ = check_hf_checkpoint(hf_dir)
    except (HFFormatError, ValueError, KeyError) as e:
        raise ConfigError(f"config key base.hf: {e}") from None
    if config["model"] and Path(config["model"]) != path:
        given = resolve_config_path(config["model"])
        got = load_model_file(given)
        if got != want:
            a, b = got.to_dict(), want.to_dict()
            diffs = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k])
            raise ConfigError(
                f"config key model: {given} differs from base.hf's {path} in {diffs} (model vs config.json); "
                "with base.hf the checkpoint decides the model: leave model unset (--config model=null)"
            )
    tok = config["tokenizer"]["model"]
    if tok and resolve_config_path(tok) != hf_dir:
        raise ConfigError(
            f"config key tokenizer.model: {tok!r} with base.hf = {base['hf']!r}; the checkpoint's own tokenizer "
            "is used (its ids are the embedding rows), so leave tokenizer.model unset"
        )
    out = copy.deepcopy(config)
    out["model"] = str(path)
    out["tokenizer"]["model"] = str(hf_dir)
    return out


def check_cross_fields(config: Mapping[str, Any]) -> None:
    """Checks a JSON schema cannot express, with the arithmetic in the message."""
    n = config["lengths"]
    if n["pack"] < n["inputs"] + n["targets"]:
        raise ConfigError(
            f"config key lengths.pack: {n['pack']} is smaller than lengths.inputs + lengths.targets "
            f"= {n['inputs']} + {n['targets']} = {n['inputs'] + n['targets']}; a full example would not fit"
        )
    t = config["train"]
    for key, steps in (("train.steps", t["steps"]), ("base.pretrain_steps", config["base"]["pretrain_steps"])):
        if steps and t["warmup_steps"] > steps:
            raise ConfigError(
                f"config key train.warmup_steps: {t['warmup_steps']} warmup steps are more than {key} = {steps}; "
                "the learning rate would never reach train.lr. Lower warmup_steps or raise the step count"
            )
    if t["save_interval"] > t["steps"]:
        warnings.warn(
            f"config key train.save_interval: {t['save_interval']} > train.steps = {t['steps']}, so no checkpoint is "
            "saved before the end (0 says the same on purpose)",
            stacklevel=2,
        )
    base = config["base"]
    if base["checkpoint"] and base["pretrain_steps"]:
        warnings.warn(
            f"config key base.pretrain_steps: {base['pretrain_steps']} is ignored because base.checkpoint is given "
            "(the base model is that checkpoint, nothing is pretrained here)",
            stacklevel=2,
        )
    mix = config["mixture"]
    if mix["max_rate"] > mix["cap"]:
        warnings.warn(
            f"config key mixture.max_rate: {mix['max_rate']} > mixture.cap = {mix['cap']} has no effect (a dataset's "
            "rate is min(examples, cap, max_rate)); FLAN uses cap 30000, max_rate 3000",
            stacklevel=2,
        )
    tpl = config["templates"]
    if tpl["num_templates"] is not None and tpl["train_mode"] != "natural":
        warnings.warn(
            f"config key templates.num_templates: {tpl['num_templates']} has no effect with templates.train_mode = "
            f"{tpl['train_mode']!r} (it counts natural-instruction templates); the runs train on all examples "
            "with no template",
            stacklevel=2,
        )
    fmt = config["formats"]
    if (fmt["fewshot"] > 0 or fmt["options"] < 1) and tpl["train_mode"] != "natural":
        warnings.warn(
            f"config key formats: {dict(fmt)} has no effect with templates.train_mode = {tpl['train_mode']!r}: prompt "
            "formats rewrite natural-instruction prompts, and the main runs train on prompts without instructions",
            stacklevel=2,
        )
    if t["micro_batch_size"] and t["global_batch_size"] % t["micro_batch_size"]:
        raise ConfigError(
            f"config key train.global_batch_size: {t['global_batch_size']} is not divisible by "
            f"train.micro_batch_size {t['micro_batch_size']} "
            f"({t['global_batch_size']} % {t['micro_batch_size']} = {t['global_batch_size'] % t['micro_batch_size']})"
        )


def micro_batch_for(global_batch: int, dp: int, cap: int, accumulation_multiple: int = 1) -> int:
    """The largest micro-batch <= ``cap`` that divides this rank's share, global_batch / DP.

    Why: on CPU (and for small models on GPU) each forward/backward pass pays a fixed cost (Python,
    Megatron's schedule, kernel launches), so fewer, larger passes do the same work faster, and
    memory (activations grow with the micro-batch) is what ``cap`` bounds. E.g. global 8, DP 1 ->
    8 x 1 accumulation; DP 2 -> 4 x 1; DP 8 -> 1 x 1; global 12, DP 1, cap 8 -> 6 x 2. The
    interleaved pipeline schedule wants the accumulation steps (share / micro) to be a multiple of
    PP (``accumulation_multiple``). Falls back to 1 when nothing fits, leaving check_world to explain.
    """
    share, rem = divmod(global_batch, dp)
    if dp < 1 or cap < 1 or rem or share < 1:
        return 1
    fits = [m for m in range(1, min(cap, share) + 1) if share % m == 0 and (share // m) % accumulation_multiple == 0]
    return max(fits, default=1)


def check_world(config: Mapping[str, Any], world: int, source: str = "training ranks") -> int:
    """Check world = TP x PP x DP and global batch = micro batch x DP x accumulation; return DP.

    ``world`` is the number of training ranks (the train rule's ``tasks``, from the profile); ``source``
    says where it came from, for the message. The arithmetic is flanpipe.core.train_config.split_batch, the
    one the training entry point checks again.
    A config that leaves train.micro_batch_size null gets it filled in here, for this DP
    (``micro_batch_for``): the Snakefile checks the world once, and the run specs it builds afterwards
    carry the derived value.
    """
    t = config["train"]
    tp, pp = t["tensor_model_parallel_size"], t["pipeline_model_parallel_size"]
    if not t["micro_batch_size"] and world >= 1 and world % (tp * pp) == 0:
        t["micro_batch_size"] = _derived_micro_batch(t, world // (tp * pp))
    try:
        grid = split_batch(
            world=world,
            tp=tp,
            pp=pp,
            vpp=t.get("virtual_pipeline_model_parallel_size", 1),
            micro_batch_size=t["micro_batch_size"] or 1,
            global_batch_size=t["global_batch_size"],
            source=source,
        )
    except BatchSplitError as e:
        raise ConfigError(f"config key {e}" if e.key else str(e)) from None
    return grid.dp


def check_nodes(rule: str, tasks: int, nodes: Any, tp: int, mpi: Any = "") -> int:
    """The profile's ``nodes`` for ``rule`` against its ``tasks`` ranks, before any job; return ranks per node.

    ``nodes`` unset (None) is one node. Several nodes need the ranks started by srun (``mpi``), not by
    ``torchrun --standalone``, and ranks that fill the nodes evenly, whole TP groups per node
    (flanpipe.train.planner.node_split: the arithmetic ``flanpipe plan`` prints the profile's values with).
    """
    if nodes is None:
        return tasks
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"set-resources {rule}:nodes: want an integer >= 1, got {nodes!r}")
    if nodes > 1 and not str(mpi or "").strip():
        raise ConfigError(
            f"set-resources {rule}:nodes is {nodes} but {rule}:mpi is empty: torchrun --standalone starts every "
            f"rank on one node; set {rule}:mpi to srun (profiles/slurm)"
        )
    try:
        return node_split(tasks, nodes, tp)
    except ValueError as e:
        raise ConfigError(f"set-resources {rule}: tasks={tasks}, nodes={nodes}: {e}") from None


def _derived_micro_batch(t: Mapping[str, Any], dp: int) -> int:
    """train.micro_batch_size when the config leaves it null: the largest one that fits ``dp`` ranks."""
    vpp = t.get("virtual_pipeline_model_parallel_size", 1)
    multiple = t["pipeline_model_parallel_size"] if vpp > 1 else 1
    return micro_batch_for(t["global_batch_size"], dp, t.get("max_micro_batch_size", 8), multiple)


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping")
    try:
        return validate_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dataset_spec(config: Mapping[str, Any], name: str) -> DatasetSpec:
    """One dataset's registry entry (what a rule's script needs; cheaper than a whole plan)."""
    mirror = (config.get("data") or {}).get("local_mirror")  # absent or null: the registry sources
    registry = with_local_mirror(load_registry(list(config["registry"])), mirror)
    registry = with_clusters(registry, config.get("clusters"))
    registry = with_template_files(registry, (config.get("templates") or {}).get("files"))
    if name not in registry:
        raise ConfigError(f"dataset {name!r} is not in the registry files {config['registry']}")
    return registry[name]


def train_spec(
    config: Mapping[str, Any],
    model: Mapping[str, Any],
    *,
    steps: int | None = None,
    init_checkpoint: str | None = None,
) -> dict[str, Any]:
    """The JSON run spec the training entry point reads: the model config and the training facts, those
    that change the weights (flanpipe.core.train_config.fact_keys). Its operational keys come from
    ``train_ops`` through ``--ops``, so the spec (a rerun trigger of training) never changes with them.

    ``steps`` overrides train.steps (the base model's pretraining length); ``init_checkpoint`` is the
    model dir whose weights the run starts from (the base model, for instruction tuning).
    """
    from flanpipe.core.rerun import canonical

    t = config["train"]
    # Every fact comes from the config's train block, except the three a run sets.
    per_run = {
        "steps": steps or t["steps"],
        "init_checkpoint": init_checkpoint,
        "seq_length": config["lengths"]["pack"],
    }
    return canonical({"model": dict(model), "train": {k: per_run[k] if k in per_run else t[k] for k in fact_keys()}})


def train_ops(config: Mapping[str, Any], dp: int = 1) -> dict[str, Any]:
    """Training's operational settings (flanpipe.core.train_config.OPERATIONAL): cadences, the MFU peak and
    the step's split over ranks. A null train.micro_batch_size (not filled in by check_world) is derived
    for ``dp`` data-parallel ranks."""
    t = config["train"]
    ops = {k: t[k] for k in OPERATIONAL if k != "micro_batch_size"}
    return {**ops, "micro_batch_size": t["micro_batch_size"] or _derived_micro_batch(t, dp)}


def budget_tokens(config: Mapping[str, Any], steps: int | None = None) -> int:
    """Training tokens of one run: steps x global batch (rows) x sequence length."""
    t = config["train"]
    return (steps or t["steps"]) * t["global_batch_size"] * config["lengths"]["pack"]
