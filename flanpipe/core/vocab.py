"""The workflow's vocabulary: every name that is spelled in a path, a wildcard, a config value or a record.

Instruction modes, ablation names, eval-variant and training-shard names, run names and run roles are
defined here once; the planner (flanpipe.plan.experiments), the renderer (flanpipe.data.templates), the report,
the CLI and rules/common.smk import them instead of re-spelling strings. The config schema
(config/schemas/config.schema.yaml) is data and cannot import; tests/test_vocab.py checks that its
enums list the same names.

Torch-free and Snakemake-free: planning imports this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, get_args

# ---------------------------------------------------------------------------------------------------
# instruction modes

InstructionMode = Literal["natural", "no_template", "dataset_name"]
INSTRUCTION_MODES: tuple[str, ...] = get_args(InstructionMode)  # how a task is phrased (paper, sec. 4.3)
LM_MODE = "lm"  # unlabeled text a base model is pretrained on: a render mode, not an instruction mode
RenderMode = Literal["natural", "no_template", "dataset_name", "lm"]
RENDER_MODES: tuple[str, ...] = get_args(RenderMode)
DEFAULT_MODE: InstructionMode = "natural"

# ---------------------------------------------------------------------------------------------------
# ablations (each a named DAG target: ablation_<name>)

AblationName = Literal["clusters", "scale", "instructions", "templates", "options"]
ABLATIONS: tuple[str, ...] = get_args(AblationName)

SPLITS: tuple[str, ...] = ("train", "validation", "test")


def instruction_setting(train_mode: str, eval_mode: str) -> str:
    """The instructions ablation's x: the fine-tuning and the evaluation instruction mode."""
    return f"{train_mode}->{eval_mode}"


FLAN_SETTING = instruction_setting(DEFAULT_MODE, DEFAULT_MODE)  # natural instructions in and out


def options_setting(share: float) -> str:
    """The options ablation's names for a share of training prompts that show their options."""
    return "always" if share == 1.0 else "never" if share == 0.0 else f"mixed {round(share * 100)}%"


def options_ablation_value(share: float, eval_options: bool) -> str:
    """The options ablation's x: how training showed options -> whether evaluation does."""
    return f"{options_setting(share)}->{'options' if eval_options else 'no options'}"


class VocabError(ValueError):
    """A name that is not in the vocabulary (an unknown variant, shard or mode)."""


def _alternatives(names: tuple[str, ...]) -> str:
    return "|".join(names)


# ---------------------------------------------------------------------------------------------------
# training shards: "<mode>-<k|all>[-optsNN]" or "lm" (-optsNN: the options ablation's percent of
# training prompts that show their options block; absent: the config's formats decide)

SHARD_PATTERN = rf"{LM_MODE}|({_alternatives(INSTRUCTION_MODES)})-(all|\d+)(-opts\d+)?"
_OPTS = re.compile(r"-opts(\d+)\Z")


def shard_name(mode: str, num_templates: int | None, options_share: float | None = None) -> str:
    """Training shards depend only on the render mode, the template count and the options share."""
    if mode == LM_MODE:
        return LM_MODE
    opts = "" if options_share is None else f"-opts{round(options_share * 100)}"
    return f"{mode}-{'all' if num_templates is None else num_templates}{opts}"


def shard_options_share(name: str) -> float | None:
    """``natural-all-opts50`` -> 0.5: the options ablation's share; None when the config's formats decide."""
    m = _OPTS.search(name)
    return None if m is None else int(m[1]) / 100


def parse_shard_name(name: str) -> tuple[str, int | None]:
    """``natural-all`` -> ("natural", None); ``natural-4`` -> ("natural", 4); ``lm`` -> ("lm", None);
    an ``-optsNN`` suffix is read by shard_options_share."""
    if name == LM_MODE:
        return LM_MODE, None
    mode, _, k = _OPTS.sub("", name).rpartition("-")
    if mode not in INSTRUCTION_MODES or not (k == "all" or k.isdigit()):
        raise VocabError(f"unknown training shard variant {name!r}")
    if k != "all" and int(k) < 1:
        raise VocabError(f"training shard variant {name!r}: the template count must be >= 1 (or 'all')")
    return mode, None if k == "all" else int(k)


# ---------------------------------------------------------------------------------------------------
# eval variants: "<mode>[-noopts][-<k>shot]"

VARIANT_PATTERN = rf"({_alternatives(INSTRUCTION_MODES)})(-noopts)?(-\d+shot)?"
_VARIANT = re.compile(rf"(?P<mode>{_alternatives(INSTRUCTION_MODES)})(?P<noopts>-noopts)?(?:-(?P<shots>\d+)shot)?\Z")


@dataclass(frozen=True)
class EvalVariant:
    """How a model is prompted at evaluation: instruction mode, options block, few-shot exemplars."""

    mode: str = DEFAULT_MODE
    options: bool = True  # classification: keep FLAN's OPTIONS block in the prompt
    shots: int = 0

    @property
    def name(self) -> str:
        return self.mode + ("" if self.options else "-noopts") + (f"-{self.shots}shot" if self.shots else "")

    @classmethod
    def parse(cls, name: str) -> EvalVariant:
        m = _VARIANT.match(name)
        if m is None:
            raise VocabError(f"unknown eval variant {name!r}")
        return cls(m["mode"], m["noopts"] is None, int(m["shots"] or 0))


# ---------------------------------------------------------------------------------------------------
# runs: names, kinds and roles


class RunKind(StrEnum):
    """How a run's model comes to exist."""

    TUNE = "tune"  # instruction-tuned here
    PRETRAIN = "pretrain"  # a small base LM pretrained here on unlabeled text
    GIVEN = "given"  # a given checkpoint (model.json + checkpoint/)


class RunRole(StrEnum):
    """Which side of the paper's comparison a run's evaluations fill (the records' ``role``)."""

    TUNED = "tuned"
    BASE = "base"

    @classmethod
    def of_kind(cls, kind: RunKind | str) -> RunRole:
        return cls.TUNED if RunKind(kind) is RunKind.TUNE else cls.BASE

    @property
    def label(self) -> str:
        return "instruction-tuned" if self is RunRole.TUNED else "untuned base"


BASE_PREFIX = "base-"  # base-<model stem>
MAIN_PREFIX = "heldout_"  # heldout_<cluster>: one main run per held-out cluster
ABLATION_SEPARATOR = "__"  # heldout_<cluster>__<what the ablation changes>


def base_run_name(model_stem: str) -> str:
    return f"{BASE_PREFIX}{model_stem}"


def main_run_name(cluster: str) -> str:
    return f"{MAIN_PREFIX}{cluster}"


def ablation_run_name(cluster: str, change: str) -> str:
    """A run only an ablation trains; ``change`` says what differs from the main run (``clusters3``)."""
    return f"{main_run_name(cluster)}{ABLATION_SEPARATOR}{change}"


def is_ablation_run_name(name: str) -> bool:
    return ABLATION_SEPARATOR in name


def role_of_run_name(name: str) -> RunRole:
    """The role read off a run's name alone (results found on disk, without the plan)."""
    return RunRole.BASE if name.startswith(BASE_PREFIX) else RunRole.TUNED


__all__ = [
    "ABLATIONS",
    "DEFAULT_MODE",
    "FLAN_SETTING",
    "INSTRUCTION_MODES",
    "LM_MODE",
    "RENDER_MODES",
    "SHARD_PATTERN",
    "SPLITS",
    "VARIANT_PATTERN",
    "AblationName",
    "EvalVariant",
    "InstructionMode",
    "RenderMode",
    "RunKind",
    "RunRole",
    "VocabError",
    "ablation_run_name",
    "base_run_name",
    "instruction_setting",
    "is_ablation_run_name",
    "main_run_name",
    "options_ablation_value",
    "options_setting",
    "parse_shard_name",
    "role_of_run_name",
    "shard_name",
    "shard_options_share",
]
