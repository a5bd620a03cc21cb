"""Plan-time checks: every value the config, registry, templates and model configs hold, checked against
the use it will be put to, when the DAG is built and before any job runs.

``flanpipe.plan.experiments`` plans runs and evaluations and calls into this module; each check raises a
``PlanError`` naming the config key, file, dataset or run and saying how to fix it. Model checks of an
ablation's runs happen only when one of its targets is asked for (``Plan.check_run``). Nothing here
imports torch or Snakemake.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flanpipe.core.io import resolve_config_path
from flanpipe.core.model_config import CHECKPOINT_FILES

if TYPE_CHECKING:
    from flanpipe.core.model_config import ModelConfig
    from flanpipe.core.registry import DatasetSpec
    from flanpipe.data.patterns import Template
    from flanpipe.plan.runs import Evaluation, Run


class PlanError(ValueError):
    """The config asks for an experiment that cannot be planned; the message names the key."""


class PlanWarning(UserWarning):
    """A config value that is probably a mistake but could be intended."""


def _model_key(config: Mapping[str, Any], model: str) -> str:
    """The config key a run's model config comes from (for messages)."""
    return "model" if model == config["model"] else "ablations.scale.models"


def _load_model(path: str | Path, key: str) -> ModelConfig:
    """A model config (YAML, or a checkpoint's model.json); any problem names the file and config key."""
    from flanpipe.model.hf_format import load_model_file

    resolved = resolve_config_path(path)
    if not Path(resolved).is_file():
        raise PlanError(f"config key {key}: model config file {path} not found (looked for {resolved})")
    try:
        return load_model_file(resolved)
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
    packed row (lengths.pack <= max_position_embeddings) and a capped option beside a full input (lengths.inputs +
    eval.option_tokens <= max_position_embeddings) and a token id of the tokenizer (the given
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
        cap, inputs = config["eval"]["option_tokens"], config["lengths"]["inputs"]
        if cap is not None and inputs + cap > cfg.max_position_embeddings:
            raise PlanError(
                f"config key eval.option_tokens: an option of {cap} tokens beside a full input of lengths.inputs = "
                f"{inputs} is {inputs + cap} tokens, longer than max_position_embeddings = "
                f"{cfg.max_position_embeddings} of model config {path} ({key})"
            )
    _check_tokenizer(config, models)
    for run in runs.values():
        if run.kind == "given" and not run.hf:  # base.hf's import is a job, not a file yet
            _check_checkpoint(config, run, models[run.model])


def _check_tokenizer(config: Mapping[str, Any], models: Mapping[str, ModelConfig]) -> None:
    from flanpipe.data.tokenize import piece_count

    tok = config["tokenizer"]
    if tok["model"]:
        path = resolve_config_path(tok["model"])
        if not Path(path).exists():
            raise PlanError(
                f"config key tokenizer.model: SentencePiece model {tok['model']} not found (looked for {path})"
            )
        try:  # a .model file or a checkpoint's tokenizer directory (flanpipe.data.tokenize.open_tokenizer)
            n, what = piece_count(path), f"tokenizer {path} (tokenizer.model) has"
        except (ValueError, FileNotFoundError) as e:
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
    if not model_json.is_file() and (Path(directory) / "config.json").is_file():
        raise PlanError(
            f"config key {key}: {directory} holds an HF config.json but no model.json: a HuggingFace checkpoint, "
            "which base.hf imports (base.checkpoint is a flanpipe model dir: model.json + checkpoint/)"
        )
    got = _load_model(model_json, key)
    weights = Path(directory) / "checkpoint"
    missing = [f for f in CHECKPOINT_FILES if not (weights / f).is_file()]
    if missing:
        raise PlanError(
            f"config key {key}: base checkpoint {directory} has no complete weights: {weights} lacks {missing}, "
            "which Megatron's dist_checkpointing writes at the end of a save. Point the key at a finished "
            "run's results/models/<run>/ (or copy the whole checkpoint/ folder)"
        )
    if got != want:
        a, b = got.to_dict(), want.to_dict()
        diffs = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k])
        raise PlanError(
            f"config key {key}: the checkpoint's architecture {model_json} differs from model config "
            f"{resolve_config_path(run.model)} ({_model_key(config, run.model)}) in {diffs} (checkpoint vs config); "
            "set the model config the checkpoint was trained with"
        )


def check_cluster_names(config: Mapping[str, Any], registry: Mapping[str, DatasetSpec]) -> None:
    """Every cluster the config names must exist: a typo in ``overlaps`` would silently keep a near-duplicate
    cluster in training and leak the held-out task."""
    known = sorted({s.cluster for s in registry.values()})
    for c, partners in (config.get("overlaps") or {}).items():
        unknown = sorted({c, *partners} - set(known))
        if unknown:
            raise PlanError(
                f"config key overlaps.{c}: unknown cluster(s) {unknown}; the registry has {known}. "
                "Overlap rules name clusters of the registry (check the spelling)"
            )


def check_splits(
    config: Mapping[str, Any],
    registry: Mapping[str, DatasetSpec],
    runs: Iterable[Run],
    evaluations: Sequence[Evaluation],
) -> None:
    """A dataset must map every split role its planned jobs read: train for training, pretraining and
    few-shot exemplars, validation and test for evaluation."""
    need: dict[str, dict[str, str]] = {}  # dataset -> role -> why

    def want(dataset: str, role: str, why: str) -> None:
        need.setdefault(dataset, {}).setdefault(role, why)

    for run in runs:
        for d in run.datasets:
            want(d, "train", f"run {run.name!r} trains on it")
    shots = config["base"]["fewshot"]
    for e in evaluations:
        want(e.dataset, "validation", f"run {e.run!r} is evaluated on it")
        want(e.dataset, "test", f"run {e.run!r} is evaluated on it")
        if shots and e.variant.endswith("shot"):
            want(e.dataset, "train", f"the {shots}-shot baseline draws exemplars from it")
    for d, roles in need.items():
        spec = registry[d]
        for role, why in roles.items():
            if role not in spec.splits:
                raise PlanError(
                    f"{spec.defined_in or 'registry'}: dataset {d!r} has no {role!r} split (its 'splits' maps "
                    f"{sorted(spec.splits)}), but {why}. Map {role} to a split of the source in its entry, or "
                    "leave the dataset out (config 'datasets', or another held_out)"
                )


def check_template_counts(
    config: Mapping[str, Any], templates: Mapping[str, Sequence[Template]], runs: Iterable[Run]
) -> None:
    """A template-count ablation asking for more templates than a dataset has would silently train on
    fewer (and two counts on the same data)."""
    for run in runs:
        k = run.num_templates
        if k is None or run.kind != "tune" or run.train_mode != "natural":
            continue
        key = "templates.num_templates" if "__templates" not in run.name else "ablations.templates.counts"
        for d in run.datasets:
            natural = [t for t in templates.get(d, ()) if not t.turned_around]
            if k > len(natural):
                raise PlanError(
                    f"config key {key}: {k} templates per dataset asked for (run {run.name!r}), but dataset {d!r} "
                    f"has only {len(natural)} that do the task itself (turned-around ones are not counted); "
                    f"lower the count to <= {len(natural)} or add templates"
                )


def check_formats(
    config: Mapping[str, Any],
    registry: Mapping[str, DatasetSpec],
    templates: Mapping[str, Sequence[Template]],
    runs: Iterable[Run],
) -> None:
    """Flan 2022's prompt formats (config ``formats``, the options ablation's shares) rewrite pattern prompts: a
    ``kind: jinja`` template shows its options as written and has no exemplar slot, so a run whose training
    templates include one fails here, not in its render job."""
    from flanpipe.data.templates import select_templates

    fmt = config.get("formats") or {}
    for run in runs:
        if run.kind != "tune" or run.train_mode != "natural":
            continue
        options = fmt.get("options", 1.0) if run.options_share is None else run.options_share
        asked = [
            k for k, v in (("formats.fewshot", fmt.get("fewshot", 0.0) > 0), ("formats.options", options < 1)) if v
        ]
        if not asked:
            continue
        key = asked if run.options_share is None else ["ablations.options"]
        for d in run.datasets:
            chosen = select_templates(templates.get(d, ()), run.num_templates) if d in templates else []
            jinja = [t.index for t in chosen if t.kind == "jinja"]
            if jinja:
                raise PlanError(
                    f"config key {' / '.join(key)}: run {run.name!r} trains on dataset {d!r} with kind: jinja "
                    f"template(s) {jinja} of {registry[d].templates}; prompt formats (few-shot exemplars, the options "
                    "block left out) apply to {field} pattern templates only, a jinja template renders as written. "
                    "Use pattern templates for training (templates.files), or the default formats"
                )


def check_config_files(paths: Iterable[str | Path]) -> None:
    """Read each config file with the strict loader: Snakemake parses ``--configfile`` itself and would keep
    a duplicate key's last value silently (a config error names the file and line)."""
    from flanpipe.core.io import read_yaml

    for path in paths:
        try:
            read_yaml(path)
        except ValueError as e:
            raise PlanError(str(e)) from None


def check_scale_checkpoints(scale: Mapping[str, Any]) -> None:
    """Each ``ablations.scale.checkpoints`` key must be one of ``models``, spelled the same: another
    spelling of a path would leave that model without its checkpoint (and the entry unused)."""
    stray = sorted(set(scale.get("checkpoints") or {}) - set(scale.get("models") or []))
    if stray:
        raise PlanError(
            f"config key ablations.scale.checkpoints: {stray} are not in ablations.scale.models "
            f"{scale.get('models')}; each key must be one of those model config paths, written the same way"
        )
