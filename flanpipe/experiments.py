"""The experiment plan: which models are trained and which evaluations are run.

A *run* is one training job (a mixture, a packed dataset, a model): the paper's main results train
one run per held-out cluster; each ablation adds runs (fewer training clusters, another model size,
another instruction mode, fewer templates). A *base* run is the untuned model: a given pretrained
checkpoint (the normal case) or, with none, a small LM pretrained here on the datasets' unlabeled text
so the embedded default also has a base to tune from and compare against. An *evaluation* scores
one model on one dataset under one eval variant (instruction mode, options block on/off, k shots).
Everything is derived once from the validated config; the Snakefile only looks things up here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flanpipe.io import resolve_config_path
from flanpipe.registry import (
    FLAN_OVERLAPS,
    DatasetSpec,
    RegistryError,
    excluded_clusters,
    load_registry,
    with_clusters,
    with_local_mirror,
)
from flanpipe.templates import Template, load_validated

if TYPE_CHECKING:
    from flanpipe.model_config import ModelConfig

ABLATIONS = ("clusters", "scale", "instructions", "templates", "options")
_VARIANT = re.compile(r"(?P<mode>natural|no_template|dataset_name)(?P<noopts>-noopts)?(?:-(?P<shots>\d+)shot)?\Z")


class PlanError(ValueError):
    """The config asks for an experiment that cannot be planned; the message names the key."""


@dataclass(frozen=True)
class EvalVariant:
    """How a model is prompted at evaluation: instruction mode, options block, few-shot exemplars."""

    mode: str = "natural"
    options: bool = True  # classification: keep FLAN's OPTIONS block in the prompt
    shots: int = 0

    @property
    def name(self) -> str:
        return self.mode + ("" if self.options else "-noopts") + (f"-{self.shots}shot" if self.shots else "")

    @classmethod
    def parse(cls, name: str) -> EvalVariant:
        m = _VARIANT.match(name)
        if m is None:
            raise PlanError(f"unknown eval variant {name!r}")
        return cls(m["mode"], m["noopts"] is None, int(m["shots"] or 0))


@dataclass(frozen=True)
class Run:
    """One model: trained here (tune or pretrain), or a given base checkpoint (``checkpoint``)."""

    name: str
    model: str  # model config path
    datasets: tuple[str, ...] = ()
    held_out: str | None = None
    train_mode: str = "natural"
    num_templates: int | None = None
    init: str | None = None  # name of the base run whose weights start this one
    kind: str = "tune"  # tune | pretrain | given
    checkpoint: str | None = None  # kind == given: a model dir (model.json + checkpoint/)
    steps: int | None = None  # override of train.steps (pretraining)
    options_share: float | None = None  # options ablation: share of training prompts showing options

    @property
    def shard_variant(self) -> str:
        """Training shards depend only on the instruction mode, the template count and (options ablation)
        the share of prompts that show their options (``-optsNN``, percent)."""
        if self.kind == "pretrain":
            return "lm"
        opts = "" if self.options_share is None else f"-opts{round(self.options_share * 100)}"
        return f"{self.train_mode}-{'all' if self.num_templates is None else self.num_templates}{opts}"


@dataclass(frozen=True)
class Evaluation:
    run: str
    variant: str
    dataset: str

    @property
    def path(self) -> str:
        return f"results/eval/{self.run}/{self.variant}/{self.dataset}.json"


@dataclass(frozen=True)
class Plan:
    """Everything the DAG needs to know, derived once from the validated config."""

    registry: dict[str, DatasetSpec]
    templates: dict[str, list[Template]]
    runs: dict[str, Run]
    evaluations: list[Evaluation]  # the main results and baselines (rule all)
    ablations: dict[str, list[Evaluation]] = field(default_factory=dict)
    config: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    _checked: set[str] = field(default_factory=set, repr=False, compare=False)

    def check_run(self, name: str) -> None:
        """Model checks of one run and its base (``check_models``): the DAG calls this for every training
        or evaluation job it plans, so an ablation's model is checked when (and only when) it is requested."""
        if self.config is None or name in self._checked:
            return
        run = self.runs[name]
        check_models(self.config, {r.name: r for r in (run, self.runs.get(run.init or "")) if r is not None})
        self._checked.add(name)

    @property
    def mixtures(self) -> dict[str, list[str]]:
        """Run -> training datasets (the runs this config trains)."""
        return {r.name: list(r.datasets) for r in self.runs.values() if r.kind != "given"}

    @property
    def train_datasets(self) -> list[str]:
        return sorted({d for r in self.runs.values() if r.kind == "tune" for d in r.datasets})

    def model_dir(self, run: str) -> str:
        r = self.runs[run]
        return str(resolve_config_path(r.checkpoint)) if r.kind == "given" else f"results/models/{run}"


def parse_shard_variant(name: str) -> tuple[str, int | None]:
    """``natural-all`` -> ("natural", None); ``natural-4`` -> ("natural", 4); ``lm`` -> ("lm", None)."""
    if name == "lm":
        return "lm", None
    name = re.sub(r"-opts\d+\Z", "", name)
    mode, _, k = name.rpartition("-")
    if mode not in ("natural", "no_template", "dataset_name") or not (k == "all" or k.isdigit()):
        raise PlanError(f"unknown training shard variant {name!r}")
    return mode, None if k == "all" else int(k)


def shard_options_share(name: str) -> float | None:
    """``natural-all-opts50`` -> 0.5: the options ablation's share; None when the config's formats decide."""
    m = re.search(r"-opts(\d+)\Z", name)
    return None if m is None else int(m[1]) / 100


def options_setting(share: float) -> str:
    """The options ablation's names for a share of prompts showing options."""
    return "always" if share == 1.0 else "never" if share == 0.0 else f"mixed {round(share * 100)}%"


def model_stem(model: str) -> str:
    return Path(model).stem


def _training_set(
    registry: Mapping[str, DatasetSpec],
    held_out: str,
    overlaps: Mapping[str, Sequence[str]],
    train_clusters: Sequence[str] | None = None,
) -> tuple[str, ...]:
    drop = excluded_clusters([held_out], overlaps)
    names = tuple(
        s.name
        for s in registry.values()
        if s.cluster not in drop and (train_clusters is None or s.cluster in train_clusters)
    )
    if not names:
        raise PlanError(f"holding out {held_out!r} removes clusters {sorted(drop)} and leaves no training data")
    return names


def _base_run(config: Mapping[str, Any], model: str, registry: Mapping[str, DatasetSpec]) -> Run | None:
    """The base model of ``model``: a given checkpoint, one pretrained here, or none."""
    base = config["base"]
    if base["checkpoint"]:
        checkpoint = base["checkpoint"]
        if model != config["model"]:
            given = ((config.get("ablations") or {}).get("scale") or {}).get("checkpoints") or {}
            if model not in given:
                raise PlanError(
                    f"config key ablations.scale.checkpoints: base.checkpoint is given, so model {model!r} "
                    "needs its own pretrained checkpoint there"
                )
            checkpoint = given[model]
        return Run(name=f"base-{model_stem(model)}", model=model, kind="given", checkpoint=checkpoint)
    if base["pretrain_steps"] == 0:
        return None
    return Run(
        name=f"base-{model_stem(model)}",
        model=model,
        datasets=tuple(registry),
        kind="pretrain",
        steps=base["pretrain_steps"],
    )


def _variants(spec: DatasetSpec, mode: str, shots: int = 0) -> list[str]:
    """Classification is scored with and without the options block in the prompt (paper, sec. 2.3)."""
    out = [EvalVariant(mode, True, shots).name]
    if spec.has_options:
        out.append(EvalVariant(mode, False, shots).name)
    return out


def plan_experiment(config: Mapping[str, Any]) -> Plan:
    """Load the registry, validate every used template against its dataset, and plan runs + evals."""
    mirror = (config.get("data") or {}).get("local_mirror")
    registry = with_local_mirror(load_registry(list(config["registry"])), mirror)
    try:
        registry = with_clusters(registry, config.get("clusters"))
    except RegistryError as e:
        raise PlanError(str(e)) from None
    if config.get("datasets"):
        unknown = sorted(set(config["datasets"]) - set(registry))
        if unknown:
            raise PlanError(f"config key datasets: unknown dataset(s) {unknown}")
        registry = {k: v for k, v in registry.items() if k in config["datasets"]}
    overlaps = FLAN_OVERLAPS if config.get("overlaps") is None else config["overlaps"]
    clusters = {s.cluster for s in registry.values()}
    for c in config["held_out"]:
        if c not in clusters:
            raise PlanError(f"config key held_out: unknown cluster {c!r}; the registry has {sorted(clusters)}")

    def in_cluster(c: str) -> list[str]:
        return [s.name for s in registry.values() if s.cluster == c]

    runs: dict[str, Run] = {}
    evals: list[Evaluation] = []
    base = _base_run(config, config["model"], registry)
    if base is not None:
        runs[base.name] = base
    shots = config["base"]["fewshot"]
    t = config["templates"]
    for c in config["held_out"]:
        try:
            datasets = _training_set(registry, c, overlaps)
        except PlanError as e:
            raise PlanError(f"config key held_out: {e}") from None
        run = Run(
            name=f"heldout_{c}",
            model=config["model"],
            datasets=datasets,
            held_out=c,
            train_mode=t["train_mode"],
            num_templates=t["num_templates"],
            init=base.name if base else None,
        )
        runs[run.name] = run
        for d in in_cluster(c):
            evals += [Evaluation(run.name, v, d) for v in _variants(registry[d], t["eval_mode"])]
            if base is not None:  # the untuned base model, zero-shot and few-shot
                evals += [Evaluation(base.name, v, d) for v in _variants(registry[d], t["eval_mode"])]
                if shots:
                    evals += [Evaluation(base.name, v, d) for v in _variants(registry[d], t["eval_mode"], shots)]
    ablations = _plan_ablations(config, registry, overlaps, runs, base, in_cluster)
    used = {d for r in runs.values() if r.kind == "tune" for d in r.datasets}
    used |= {e.dataset for e in evals} | {e.dataset for es in ablations.values() for e in es}
    templates = {name: load_validated(registry[name]) for name in registry if name in used}
    # the main runs (rule all) are checked now; an ablation's own runs when a target asks for them
    main = {e.run for e in evals}
    main |= {runs[r].init for r in main if runs[r].init}
    check_models(config, {r: runs[r] for r in sorted(main)})
    return Plan(
        registry=registry, templates=templates, runs=runs, evaluations=evals, ablations=ablations, config=config
    )


def _model_key(config: Mapping[str, Any], model: str) -> str:
    """The config key a run's model config comes from (for messages)."""
    return "model" if model == config["model"] else "ablations.scale.models"


def _load_model(path: str | Path, key: str) -> ModelConfig:
    """A model config (YAML, or a checkpoint's model.json); any problem names the file and config key."""
    from flanpipe.model_config import load_model_config

    resolved = resolve_config_path(path)
    if not Path(resolved).is_file():
        raise PlanError(f"config key {key}: model config file {path} not found (looked for {resolved})")
    try:
        return load_model_config(resolved)
    except (ValueError, TypeError) as e:  # unknown/missing keys, bad values, bad YAML/JSON
        raise PlanError(f"config key {key}: model config {resolved}: {e}") from None
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError and friends: still name the file
        raise PlanError(f"config key {key}: model config {resolved} cannot be read: {e}") from None


def _parallel_arithmetic(cfg: ModelConfig, tp: int, pp: int) -> list[str]:
    out = [
        f"{name} = {size} is not divisible by TP = {tp} ({size} % {tp} = {size % tp})"
        for name, size in (
            ("num_attention_heads", cfg.num_attention_heads),
            ("ffn_hidden_size", cfg.ffn_hidden_size),
            ("vocab_size", cfg.vocab_size),
        )
        if size % tp
    ]
    if cfg.num_layers % pp:
        n = cfg.num_layers
        out.append(f"num_layers = {n} is not divisible by PP = {pp} ({n} % {pp} = {n % pp})")
    return out


def check_models(config: Mapping[str, Any], runs: Mapping[str, Run]) -> None:
    """Everything about the models that would otherwise fail inside packing or training, checked now.

    Each run's model config must load and split over train.tensor/pipeline_model_parallel_size, hold a
    packed row (lengths.pack <= max_position_embeddings) and a token id of the tokenizer (the given
    tokenizer.model's pieces, or at most tokenizer.vocab_size when one is trained); a given base
    checkpoint must have been trained with the model config it is tuned as.
    """
    t = config["train"]
    tp, pp = t["tensor_model_parallel_size"], t["pipeline_model_parallel_size"]
    vpp = t["virtual_pipeline_model_parallel_size"]
    models: dict[str, ModelConfig] = {}
    for model in sorted({r.model for r in runs.values()}):
        key = _model_key(config, model)
        cfg = models[model] = _load_model(model, key)
        path = resolve_config_path(model)
        try:
            cfg.check_parallel(tp, pp, vpp)
        except ValueError as e:
            detail = "; ".join(_parallel_arithmetic(cfg, tp, pp)) or str(e)
            raise PlanError(
                f"config key train.tensor_model_parallel_size / train.pipeline_model_parallel_size: model config "
                f"{path} ({key}) does not split over TP x PP = {tp} x {pp}: {detail}. "
                "`flanpipe plan --model NAME --gpus N` lists layouts that fit"
            ) from None
        pack = config["lengths"]["pack"]
        if pack > cfg.max_position_embeddings:
            raise PlanError(
                f"config key lengths.pack: packed rows of {pack} tokens are longer than max_position_embeddings = "
                f"{cfg.max_position_embeddings} of model config {path} ({key})"
            )
    _check_tokenizer(config, models)
    for run in runs.values():
        if run.kind == "given":
            _check_checkpoint(config, run, models[run.model])


def _check_tokenizer(config: Mapping[str, Any], models: Mapping[str, ModelConfig]) -> None:
    from flanpipe.tokenize import piece_count

    tok = config["tokenizer"]
    if tok["model"]:
        path = resolve_config_path(tok["model"])
        if not Path(path).is_file():
            raise PlanError(
                f"config key tokenizer.model: SentencePiece model {tok['model']} not found (looked for {path})"
            )
        try:
            n, what = piece_count(path), f"tokenizer {path} (tokenizer.model) has"
        except ValueError as e:
            raise PlanError(f"config key tokenizer.model: {e}") from None
    else:
        n, what = tok["vocab_size"], "the tokenizer trained here (tokenizer.vocab_size) may have"
    for model, cfg in models.items():
        if n > cfg.vocab_size:
            raise PlanError(
                f"config key {'tokenizer.model' if tok['model'] else 'tokenizer.vocab_size'}: {what} {n} pieces "
                f"but model config {resolve_config_path(model)} ({_model_key(config, model)}) has vocab_size = "
                f"{cfg.vocab_size} ({n} > {cfg.vocab_size}): token ids would index past its embedding table. "
                f"Raise the model's vocab_size to >= {n} or use a smaller tokenizer"
            )


def _check_checkpoint(config: Mapping[str, Any], run: Run, want: ModelConfig) -> None:
    """A given base checkpoint's model.json must be the architecture its model config describes."""
    assert run.checkpoint is not None
    key = "base.checkpoint" if run.model == config["model"] else f"ablations.scale.checkpoints.{run.model}"
    directory = resolve_config_path(run.checkpoint)
    if not Path(directory).is_dir():
        raise PlanError(
            f"config key {key}: base checkpoint dir {run.checkpoint} does not exist (looked for {directory}); "
            "it must hold model.json and checkpoint/ as a trained run's results/models/<run>/ does"
        )
    model_json = Path(directory) / "model.json"
    got = _load_model(model_json, key)
    if got != want:
        a, b = got.to_dict(), want.to_dict()
        diffs = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k])
        raise PlanError(
            f"config key {key}: the checkpoint's architecture {model_json} differs from model config "
            f"{resolve_config_path(run.model)} ({_model_key(config, run.model)}) in {diffs} (checkpoint vs config); "
            "set the model config the checkpoint was trained with"
        )


def _plan_ablations(
    config: Mapping[str, Any],
    registry: Mapping[str, DatasetSpec],
    overlaps: Mapping[str, Sequence[str]],
    runs: dict[str, Run],
    base: Run | None,
    in_cluster: Any,
) -> dict[str, list[Evaluation]]:
    """Runs and evaluations of the paper's ablations (each a named DAG target)."""
    abl = config.get("ablations") or {}
    out: dict[str, list[Evaluation]] = {}
    model = config["model"]
    init = base.name if base else None

    def add(run: Run, variant: str = "natural") -> list[Evaluation]:
        if run.name not in runs:
            runs[run.name] = run
        assert run.held_out is not None
        return [Evaluation(run.name, variant, d) for d in in_cluster(run.held_out)]

    if abl.get("clusters"):
        a = abl["clusters"]
        evals: list[Evaluation] = []
        known = sorted({s.cluster for s in registry.values()})
        unknown = sorted(set(a["held_out"]) - set(known))
        if unknown:
            raise PlanError(
                f"config key ablations.clusters.held_out: unknown cluster(s) {unknown}; the registry has {known}"
            )
        for c in a["held_out"]:
            drop = excluded_clusters([c], overlaps)
            order = [x for x in a["order"] if x not in drop]
            unknown = sorted(set(a["order"]) - {s.cluster for s in registry.values()})
            if unknown:
                raise PlanError(f"config key ablations.clusters.order: unknown cluster(s) {unknown}")
            for k in a["counts"]:
                if k > len(order):
                    raise PlanError(
                        f"config key ablations.clusters.counts: {k} training clusters asked for held-out {c!r}, "
                        f"but only {len(order)} remain after removing {sorted(drop)}"
                    )
                datasets = _training_set(registry, c, overlaps, order[:k])
                evals += add(Run(f"heldout_{c}__clusters{k}", model, datasets, c, init=init))
        out["clusters"] = evals
    if abl.get("scale"):
        evals = []
        for m in abl["scale"]["models"]:
            b = _base_run(config, m, registry)
            if b is not None:
                runs.setdefault(b.name, b)
            for c in config["held_out"]:
                datasets = _training_set(registry, c, overlaps)
                name = f"heldout_{c}" if m == model else f"heldout_{c}__{model_stem(m)}"
                evals += add(Run(name, m, datasets, c, init=b.name if b else None))
                if b is not None:
                    evals += [Evaluation(b.name, "natural", d) for d in in_cluster(c)]
        out["scale"] = evals
    if abl.get("instructions"):
        evals = []
        for setting in abl["instructions"]["settings"]:
            train_mode, eval_mode = setting["train"], setting["eval"]
            for c in config["held_out"]:
                datasets = _training_set(registry, c, overlaps)
                name = f"heldout_{c}" if train_mode == "natural" else f"heldout_{c}__train-{train_mode}"
                evals += add(Run(name, model, datasets, c, train_mode=train_mode, init=init), eval_mode)
        out["instructions"] = evals
    if abl.get("templates"):
        evals = []
        for k in abl["templates"]["counts"]:
            for c in config["held_out"]:
                datasets = _training_set(registry, c, overlaps)
                evals += add(Run(f"heldout_{c}__templates{k}", model, datasets, c, num_templates=k, init=init))
        out["templates"] = evals
    if abl.get("options"):  # Flan 2022: train with options always / never / mixed, eval with and without
        evals = []
        a = abl["options"]
        config_share = float((config.get("formats") or {}).get("options", 1.0))
        shares = {"always": 1.0, "never": 0.0, "mixed": float(a.get("mixed", 0.5))}
        for setting in a["settings"]:
            share = shares[setting]
            for c in config["held_out"]:
                datasets = _training_set(registry, c, overlaps)
                same = share == config_share  # the main run already trains this way
                name = f"heldout_{c}" if same else f"heldout_{c}__opts-{setting}"
                run = Run(name, model, datasets, c, options_share=None if same else share, init=init)
                evals += add(run, "natural")
                evals += [e for e in add(run, "natural-noopts") if registry[e.dataset].has_options]
        out["options"] = evals
    return out


__all__ = ["ABLATIONS", "EvalVariant", "Evaluation", "Plan", "PlanError", "Run", "RegistryError", "plan_experiment"]
