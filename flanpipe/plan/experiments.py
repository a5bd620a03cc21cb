"""The experiment plan: which models are trained and which evaluations are run.

A *run* is one training job (a mixture, a packed dataset, a model): the paper's main results train
one run per held-out cluster; each ablation adds runs (fewer training clusters, another model size,
another instruction mode, fewer templates). A *base* run is the untuned model: a given pretrained
checkpoint (the normal case) or, with none, a small LM pretrained here on the datasets' unlabeled text
so the embedded default also has a base to tune from and compare against. An *evaluation* scores
one model on one dataset under one eval variant (instruction mode, options block on/off, k shots).
Everything is derived once from the validated config; the rules and the CLI look things up here and
call the same Plan methods for each rule's params (run_shards, budget_tokens, run_model_config,
train_spec, record_meta), so a step run by hand cannot drift from the DAG's. Names (modes, variants,
run names and roles) are flanpipe.core.vocab's.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flanpipe.core.io import resolve_config_path
from flanpipe.core.registry import (
    FLAN_OVERLAPS,
    DatasetSpec,
    RegistryError,
    excluded_clusters,
    load_registry,
    with_clusters,
    with_local_mirror,
    with_template_files,
)
from flanpipe.core.vocab import (
    ABLATIONS,
    DEFAULT_MODE,
    EvalVariant,
    RunKind,
    ablation_run_name,
    base_run_name,
    instruction_setting,
    main_run_name,
    options_ablation_value,
)
from flanpipe.data.patterns import Template
from flanpipe.data.templates import load_validated
from flanpipe.plan.checks import (
    PlanError,
    PlanWarning,
    check_cluster_names,
    check_formats,
    check_models,
    check_scale_checkpoints,
    check_splits,
    check_template_counts,
)
from flanpipe.plan.runs import Evaluation, Run


@dataclass(frozen=True)
class Plan:
    """Everything the DAG needs to know, derived once from the validated config."""

    registry: dict[str, DatasetSpec]
    templates: dict[str, list[Template]]
    runs: dict[str, Run]
    evaluations: list[Evaluation]  # the main results and baselines (rule all)
    ablations: dict[str, list[Evaluation]] = field(default_factory=dict)
    config: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    ablation_errors: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    _checked: set[str] = field(default_factory=set, repr=False, compare=False)

    def check_ablation(self, name: str) -> None:
        """An ablation that cannot be planned fails when (and only when) its target is asked for."""
        if name in self.ablation_errors:
            raise PlanError(self.ablation_errors[name])

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
        return {r.name: list(r.datasets) for r in self.runs.values() if r.kind is not RunKind.GIVEN}

    @property
    def train_datasets(self) -> list[str]:
        return sorted({d for r in self.runs.values() if r.kind is RunKind.TUNE for d in r.datasets})

    def model_dir(self, run: str) -> str:
        r = self.runs[run]
        if r.hf:
            return hf_import_dir(r.model)
        return str(resolve_config_path(r.checkpoint)) if r.kind is RunKind.GIVEN else f"results/models/{run}"

    @property
    def hf_base(self) -> Run | None:
        """The base run that base.hf gives (imported by rule import_hf, exported beside each tuned run), or None."""
        return next((r for r in self.runs.values() if r.hf), None)

    def trained_run(self, name: str) -> Run:
        """A run this config trains, or an error naming the runs it does train."""
        if name not in self.mixtures:
            raise PlanError(f"unknown run {name!r}; this config trains {sorted(self.mixtures)}")
        return self.runs[name]

    # --- what a rule (and its CLI subcommand) passes for one run: one function each, so they cannot drift

    def run_shards(self, run: str, root: str | Path = "results/shards") -> dict[str, str]:
        """Rule mix's inputs: the run's training shard of every dataset it trains on."""
        r = self.runs[run]
        return {d: str(Path(root) / d / "train" / f"{r.shard_variant}.parquet") for d in r.datasets}

    def tokenizer_shards(self, root: str | Path = "results/shards") -> list[str]:
        """The tokenizer learns from every training shard of the main runs (one vocabulary for all runs)."""
        return sorted({p for r in self.runs.values() if r.is_main for p in self.run_shards(r.name, root).values()})

    def run_model_config(self, run: str) -> Path:
        """The run's own model config (the scale ablation's runs differ from ``model``): what pack and train use."""
        return resolve_config_path(self.runs[run].model)

    def budget_tokens(self, run: str) -> int:
        """Rule mix's token budget: train.steps (or the run's own steps) x tokens per step."""
        from flanpipe.plan.config import budget_tokens

        assert self.config is not None
        return budget_tokens(self.config, steps=self.runs[run].steps)

    def train_spec(self, run: str) -> dict[str, Any]:
        """Rule train_spec's JSON: model config + training facts, the run's step count, its initial weights."""
        from flanpipe.core.io import read_yaml
        from flanpipe.model.hf_format import load_model_file
        from flanpipe.plan.config import train_spec

        assert self.config is not None
        r = self.runs[run]
        init = self.model_dir(r.init) if r.init else None
        path = self.run_model_config(run)
        model = load_model_file(path).to_dict() if path.name == "config.json" else read_yaml(path)  # base.hf
        return train_spec(self.config, model, steps=r.steps, init_checkpoint=init)

    def record_meta(self, evaluation: Evaluation, ablation: str | None = None) -> dict[str, Any]:
        """What the report needs to know about one evaluation besides its scores (rules report, ablation)."""
        from flanpipe.core.model_config import param_count
        from flanpipe.model.hf_format import load_model_file

        run = self.runs[evaluation.run]
        meta: dict[str, Any] = {
            "run": run.name,
            "variant": evaluation.variant,
            "held_out": run.held_out or self.registry[evaluation.dataset].cluster,
            "role": run.role.value,
            "model": model_stem(run.model),
            "params": param_count(load_model_file(self.run_model_config(run.name))),
        }
        if ablation is not None:
            meta["ablation_value"] = self._ablation_value(ablation, run, evaluation, meta["params"])
        return meta

    def audited_datasets(self, run: str) -> list[str]:
        """Datasets whose evaluations (main results and ablations) score this run's model: what it is audited on.

        Evaluation-only entries too: they are never in a mixture themselves, but their examples can be (an
        entry built from another dataset's train split), and a score on leaked examples is no zero-shot score.
        """
        evals = self.evaluations + [e for es in self.ablations.values() for e in es]
        return sorted({e.dataset for e in evals if e.run == run})

    def template_audited_datasets(self, run: str) -> list[str]:
        """Audited datasets that some evaluation of this run prompts with natural instructions.

        The no_template and dataset_name eval modes have no instruction text that could leak, so a dataset
        scored only in those modes gets no template check (its training templates would flag it falsely).
        """
        evals = self.evaluations + [e for es in self.ablations.values() for e in es]
        natural = {e.dataset for e in evals if e.run == run and EvalVariant.parse(e.variant).mode == "natural"}
        return sorted(natural & set(self.audited_datasets(run)))

    def _ablation_value(self, ablation: str, run: Run, evaluation: Evaluation, params: int) -> int | str | None:
        """The x of an ablation's plot: what the ablation varies, read off the run (and the eval variant)."""
        if ablation == "clusters":
            return len({self.registry[d].cluster for d in run.datasets})
        if ablation == "scale":
            return params
        if ablation == "instructions":
            return instruction_setting(run.train_mode, EvalVariant.parse(evaluation.variant).mode)
        if ablation == "templates":
            return run.num_templates
        if ablation == "options":
            assert self.config is not None
            share = self.config["formats"]["options"] if run.options_share is None else run.options_share
            return options_ablation_value(share, EvalVariant.parse(evaluation.variant).options)
        raise PlanError(f"unknown ablation {ablation!r}; expected one of {ABLATIONS}")


def model_stem(model: str) -> str:
    """A model's short name: the config file's stem, or for base.hf's config.json its checkpoint dir's name
    (characters a path or wildcard would trip on replaced by ``_``)."""
    p = Path(model)
    if p.name == "config.json":
        return re.sub(r"[^A-Za-z0-9_-]", "_", p.resolve().parent.name)
    return p.stem


def hf_import_dir(model: str) -> str:
    """Where rule import_hf writes base.hf's checkpoint in flanpipe's format (model.json, checkpoint/, hf/)."""
    return f"results/base/hf/{model_stem(model)}"


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
        if s.cluster not in drop and (train_clusters is None or s.cluster in train_clusters) and not s.eval_only
    )
    if not names:
        raise PlanError(f"holding out {held_out!r} removes clusters {sorted(drop)} and leaves no training data")
    return names


def _base_run(config: Mapping[str, Any], model: str, registry: Mapping[str, DatasetSpec]) -> Run | None:
    """The base model of ``model``: a given checkpoint, one pretrained here, or none."""
    base = config["base"]
    if base["hf"]:
        if model != config["model"]:
            raise PlanError(
                f"config key base.hf: gives the base of {config['model']} only; model {model!r} "
                "(ablations.scale) would need its own base, which base.hf cannot give"
            )
        return Run(name=base_run_name(model_stem(model)), model=model, kind=RunKind.GIVEN, hf=base["hf"])
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
        return Run(name=base_run_name(model_stem(model)), model=model, kind=RunKind.GIVEN, checkpoint=checkpoint)
    if base["pretrain_steps"] == 0:
        return None
    return Run(
        name=base_run_name(model_stem(model)),
        model=model,
        datasets=tuple(d for d, s in registry.items() if not s.eval_only),  # eval-only text is never trained on
        kind=RunKind.PRETRAIN,
        steps=base["pretrain_steps"],
    )


def _variants(spec: DatasetSpec, mode: str, templates: Sequence[Template], shots: int = 0) -> list[str]:
    """Classification is scored with and without the options block in the prompt (paper, sec. 2.3). Prompts
    kept as written (every template ``kind: jinja``, e.g. P3's) show their own choices or not, so they have
    one variant: T0 scores each prompt as written, over its own answer_choices."""
    out = [EvalVariant(mode, True, shots).name]
    as_written = mode == DEFAULT_MODE and all(t.kind == "jinja" for t in templates)
    if spec.has_options and not as_written:
        out.append(EvalVariant(mode, False, shots).name)
    return out


def plan_experiment(config: Mapping[str, Any]) -> Plan:
    """Load the registry, validate every used template against its dataset, and plan runs + evals.

    Long but in the order a reader checks a plan: registry, datasets, templates, main runs, their
    evaluations, ablations (``_plan_ablations``), then the checks; each step reads the ones before."""
    mirror = (config.get("data") or {}).get("local_mirror")
    registry = with_local_mirror(load_registry(list(config["registry"])), mirror)
    try:
        registry = with_clusters(registry, config.get("clusters"))
        registry = with_template_files(registry, config["templates"].get("files"))
    except RegistryError as e:
        raise PlanError(str(e)) from None
    check_cluster_names(config, registry)
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

    loaded: dict[str, list[Template]] = {}

    def templates_of(name: str) -> list[Template]:
        if name not in loaded:
            loaded[name] = load_validated(registry[name])
        return loaded[name]

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
            name=main_run_name(c),
            model=config["model"],
            datasets=datasets,
            held_out=c,
            train_mode=t["train_mode"],
            num_templates=t["num_templates"],
            init=base.name if base else None,
        )
        runs[run.name] = run
        for d in in_cluster(c):
            variants = _variants(registry[d], t["eval_mode"], templates_of(d))
            evals += [Evaluation(run.name, v, d) for v in variants]
            if base is not None:  # the untuned base model, zero-shot and few-shot
                evals += [Evaluation(base.name, v, d) for v in variants]
                if shots and not registry[d].eval_only:  # exemplars are drawn from train, which it lacks
                    fewshot = _variants(registry[d], t["eval_mode"], templates_of(d), shots)
                    evals += [Evaluation(base.name, v, d) for v in fewshot]
    if config["eval"].get("eval_only_all_runs"):  # every main model (and the base) scores every eval-only set
        scorers = [main_run_name(c) for c in config["held_out"]] + ([base.name] if base is not None else [])
        planned = set(evals)
        evals += [
            e
            for s in registry.values()
            if s.eval_only
            for r in scorers
            for e in (Evaluation(r, v, s.name) for v in _variants(s, t["eval_mode"], templates_of(s.name)))
            if e not in planned
        ]
    ablations: dict[str, list[Evaluation]] = {}
    deferred: dict[str, str] = {}  # an ablation's plan error fails only its own target (check_ablation)
    for name in ABLATIONS:
        if (config.get("ablations") or {}).get(name):
            one = {**config, "ablations": {name: config["ablations"][name]}}
            try:
                ablations.update(_plan_ablations(one, registry, overlaps, runs, base, in_cluster))
            except PlanError as e:
                deferred[name] = str(e)
    used = {d for r in runs.values() if r.kind is RunKind.TUNE for d in r.datasets}
    used |= {e.dataset for e in evals} | {e.dataset for es in ablations.values() for e in es}
    templates = {name: templates_of(name) for name in registry if name in used}
    # the main runs (rule all) are checked now; an ablation's own runs when a target asks for them
    main = {e.run for e in evals}
    main |= {runs[r].init for r in main if runs[r].init}
    check_models(config, {r: runs[r] for r in sorted(main)})
    plan = Plan(
        registry=registry,
        templates=templates,
        runs=runs,
        evaluations=evals,
        ablations=ablations,
        config=config,
        ablation_errors=deferred,
    )
    check_plan(config, plan)
    return plan


def check_plan(config: Mapping[str, Any], plan: Plan) -> None:
    """Checks of the planned runs and evaluations against the datasets they use.

    The main runs fail now; an ablation's failure is recorded in ``plan.ablation_errors`` and raised when its
    target is asked for (``Plan.check_ablation``), like its model checks.
    """
    main = {e.run for e in plan.evaluations}
    main |= {plan.runs[r].init for r in main if plan.runs[r].init}
    groups = [(None, sorted(main), plan.evaluations)]
    groups += [(name, sorted({e.run for e in es} - main), es) for name, es in plan.ablations.items()]
    for ablation, names, evaluations in groups:
        runs = [plan.runs[r] for r in names]
        try:
            check_splits(config, plan.registry, runs, evaluations)
            check_template_counts(config, plan.templates, runs)
            check_formats(config, plan.registry, plan.templates, runs)
            if ablation == "scale":
                check_scale_checkpoints(config["ablations"]["scale"])
        except PlanError as e:
            if ablation is None:
                raise
            plan.ablation_errors.setdefault(ablation, f"ablation {ablation}: {e}")
    base = config["base"]
    if base["fewshot"] and all(r.kind is RunKind.TUNE for r in plan.runs.values()):
        warnings.warn(
            f"config key base.fewshot = {base['fewshot']} has no effect: there is no base model "
            "(base.checkpoint and base.hf are null and base.pretrain_steps is 0), so no few-shot baseline is evaluated",
            PlanWarning,
            stacklevel=2,
        )
    check_eval_only_scored(config, plan)


def check_eval_only_scored(config: Mapping[str, Any], plan: Plan) -> None:
    """An evaluation-only dataset exists to be scored: one that no planned evaluation scores (its cluster is held
    out by no run, and eval.eval_only_all_runs is false) is named with the ways to score it, never dropped silently.
    """
    planned = {e.dataset for e in plan.evaluations} | {e.dataset for es in plan.ablations.values() for e in es}
    unscored = sorted(d for d, s in plan.registry.items() if s.eval_only and d not in planned)
    if unscored:
        clusters = sorted({plan.registry[d].cluster for d in unscored})
        warnings.warn(
            f"evaluation-only dataset(s) {unscored} are scored by no run: no run holds out their cluster(s) "
            f"{clusters} (held_out: {list(config['held_out'])}) and eval.eval_only_all_runs is false. Hold out the "
            "cluster, set eval.eval_only_all_runs: true (every main run and the base score them), or leave them "
            "out (config 'datasets')",
            PlanWarning,
            stacklevel=2,
        )


def _plan_ablations(
    config: Mapping[str, Any],
    registry: Mapping[str, DatasetSpec],
    overlaps: Mapping[str, Sequence[str]],
    runs: dict[str, Run],
    base: Run | None,
    in_cluster: Any,
) -> dict[str, list[Evaluation]]:
    """Runs and evaluations of the paper's ablations (each a named DAG target): one short block per
    ablation, each reading its own config block, so the function is long but flat."""
    abl = config.get("ablations") or {}
    out: dict[str, list[Evaluation]] = {}
    model = config["model"]
    init = base.name if base else None

    def add(run: Run, variant: str = DEFAULT_MODE) -> list[Evaluation]:
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
                evals += add(Run(ablation_run_name(c, f"clusters{k}"), model, datasets, c, init=init))
        out["clusters"] = evals
    if abl.get("scale"):
        evals = []
        for m in abl["scale"]["models"]:
            b = _base_run(config, m, registry)
            if b is not None:
                runs.setdefault(b.name, b)
            for c in config["held_out"]:
                datasets = _training_set(registry, c, overlaps)
                name = main_run_name(c) if m == model else ablation_run_name(c, model_stem(m))
                evals += add(Run(name, m, datasets, c, init=b.name if b else None))
                if b is not None:
                    evals += [Evaluation(b.name, DEFAULT_MODE, d) for d in in_cluster(c)]
        out["scale"] = evals
    if abl.get("instructions"):
        evals = []
        for setting in abl["instructions"]["settings"]:
            train_mode, eval_mode = setting["train"], setting["eval"]
            for c in config["held_out"]:
                datasets = _training_set(registry, c, overlaps)
                name = main_run_name(c) if train_mode == DEFAULT_MODE else ablation_run_name(c, f"train-{train_mode}")
                evals += add(Run(name, model, datasets, c, train_mode=train_mode, init=init), eval_mode)
        out["instructions"] = evals
    if abl.get("templates"):
        evals = []
        for k in abl["templates"]["counts"]:
            for c in config["held_out"]:
                datasets = _training_set(registry, c, overlaps)
                evals += add(Run(ablation_run_name(c, f"templates{k}"), model, datasets, c, num_templates=k, init=init))
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
                name = main_run_name(c) if same else ablation_run_name(c, f"opts-{setting}")
                run = Run(name, model, datasets, c, options_share=None if same else share, init=init)
                evals += add(run, "natural")
                evals += [e for e in add(run, "natural-noopts") if registry[e.dataset].has_options]
        out["options"] = evals
    return out


__all__ = ["ABLATIONS", "EvalVariant", "Evaluation", "Plan", "PlanError", "Run", "RegistryError", "plan_experiment"]
