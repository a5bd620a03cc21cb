"""Experiment config: schema validation with defaults, and the plan derived from it.

The same function validates the config for the Snakefile and for the CLI, so a wrong key or type fails
before any job runs, with the key's path in the message.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema

from flanpipe.io import PROJECT_ROOT, read_yaml
from flanpipe.registry import DatasetSpec, load_registry, with_clusters, with_local_mirror

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
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults})


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
    if t["global_batch_size"] % t["micro_batch_size"]:
        raise ConfigError(
            f"config key train.global_batch_size: {t['global_batch_size']} is not divisible by "
            f"train.micro_batch_size {t['micro_batch_size']} "
            f"({t['global_batch_size']} % {t['micro_batch_size']} = {t['global_batch_size'] % t['micro_batch_size']})"
        )


def check_world(config: Mapping[str, Any], world: int, source: str = "training ranks") -> int:
    """Check world = TP x PP x DP and global batch = micro batch x DP x accumulation; return DP.

    ``world`` is the number of training ranks (the train rule's ``tasks``, from the profile); ``source``
    says where it came from, for the message.
    """
    t = config["train"]
    tp, pp = t["tensor_model_parallel_size"], t["pipeline_model_parallel_size"]
    if world < 1 or world % (tp * pp):
        raise ConfigError(
            f"world size {world} ({source}) is not a multiple of train.tensor_model_parallel_size x "
            f"train.pipeline_model_parallel_size = {tp} x {pp} = {tp * pp} "
            f"({world} % {tp * pp} = {world % (tp * pp)}); world = TP x PP x DP"
        )
    dp = world // (tp * pp)
    micro, glob = t["micro_batch_size"], t["global_batch_size"]
    if glob % (micro * dp):
        raise ConfigError(
            f"config key train.global_batch_size: {glob} is not a multiple of train.micro_batch_size x DP = "
            f"{micro} x {dp} = {micro * dp} ({glob} % {micro * dp} = {glob % (micro * dp)}), where DP = world / "
            f"(TP x PP) = {world} / ({tp} x {pp}) = {dp} with world {world} from {source}"
        )
    m = glob // (micro * dp)
    if t.get("virtual_pipeline_model_parallel_size", 1) > 1 and m % pp:
        raise ConfigError(
            f"config key train.virtual_pipeline_model_parallel_size: the interleaved schedule needs the micro-batches "
            f"per step, global / (micro x DP) = {glob} / ({micro} x {dp}) = {m}, to be a multiple of "
            f"PP = {pp} (world {world} from {source})"
        )
    return dp


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
    """The JSON run spec the training entry point reads (model config + training facts).

    ``steps`` overrides train.steps (the base model's pretraining length); ``init_checkpoint`` is the
    model dir whose weights the run starts from (the base model, for instruction tuning).
    """
    t = config["train"]
    return {
        "model": dict(model),
        "train": {
            "steps": steps or t["steps"],
            "init_checkpoint": init_checkpoint,
            "lr": t["lr"],
            "warmup_steps": t["warmup_steps"],
            "micro_batch_size": t["micro_batch_size"],
            "global_batch_size": t["global_batch_size"],
            "seq_length": config["lengths"]["pack"],
            "seed": t["seed"],
            "log_interval": t["log_interval"],
            "tensor_model_parallel_size": t["tensor_model_parallel_size"],
            "pipeline_model_parallel_size": t["pipeline_model_parallel_size"],
            "virtual_pipeline_model_parallel_size": t["virtual_pipeline_model_parallel_size"],
            "precision": t["precision"],
            "optimizer": t["optimizer"],
            "weight_decay": t["weight_decay"],
            "clip_grad": t["clip_grad"],
            "save_interval": t["save_interval"],
            "keep_checkpoints": t["keep_checkpoints"],
            "tensorboard": t["tensorboard"],
            "peak_tflops": t["peak_tflops"],
        },
    }


def budget_tokens(config: Mapping[str, Any], steps: int | None = None) -> int:
    """Training tokens of one run: steps x global batch (rows) x sequence length."""
    t = config["train"]
    return (steps or t["steps"]) * t["global_batch_size"] * config["lengths"]["pack"]
