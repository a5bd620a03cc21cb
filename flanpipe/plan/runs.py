"""A run (one model: trained here or given) and an evaluation (one model on one dataset under one variant).

The plan (flanpipe.plan.experiments) derives them from the config; the checks read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from flanpipe.core.vocab import DEFAULT_MODE, LM_MODE, RunKind, RunRole, is_ablation_run_name, shard_name


@dataclass(frozen=True)
class Run:
    """One model: trained here (tune or pretrain), or a given base checkpoint (``checkpoint``)."""

    name: str
    model: str  # model config path
    datasets: tuple[str, ...] = ()
    held_out: str | None = None
    train_mode: str = DEFAULT_MODE
    num_templates: int | None = None
    init: str | None = None  # name of the base run whose weights start this one
    kind: RunKind = RunKind.TUNE
    checkpoint: str | None = None  # kind GIVEN: a model dir (model.json + checkpoint/)
    hf: str | None = None  # kind GIVEN from base.hf: the HF dir rule import_hf converts into model_dir
    steps: int | None = None  # override of train.steps (pretraining)
    options_share: float | None = None  # options ablation: share of training prompts showing options

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", RunKind(self.kind))  # "given" works too; `is RunKind.GIVEN` holds

    @property
    def shard_variant(self) -> str:
        """Training shards depend only on the instruction mode, the template count and (options ablation)
        the share of prompts that show their options (``-optsNN``, percent)."""
        mode = LM_MODE if self.kind is RunKind.PRETRAIN else self.train_mode
        return shard_name(mode, self.num_templates, self.options_share)

    @property
    def role(self) -> RunRole:
        return RunRole.of_kind(self.kind)

    @property
    def is_main(self) -> bool:
        """A tuned run of the main results (rule all), not one only an ablation trains."""
        return self.kind is RunKind.TUNE and not is_ablation_run_name(self.name)


@dataclass(frozen=True)
class Evaluation:
    run: str
    variant: str
    dataset: str

    @property
    def path(self) -> str:
        return f"results/eval/{self.run}/{self.variant}/{self.dataset}.json"
