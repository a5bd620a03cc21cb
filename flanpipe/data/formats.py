"""Flan 2022's training-time prompt formats: zero-shot vs k-shot, with vs without the options block.

Longpre et al. ("The Flan Collection", 2023) train on a mixture of formats instead of FLAN's zero-shot prompts
with options always shown: each example is zero-shot or few-shot, and shows its options or not, by configured
ratios. Here the choice is per example and deterministic: two independent uniform draws from a seeded hash of
(dataset, example_id), the same discipline as mixing.py, so a re-render gives the same shard and adding a
dataset changes no other dataset's formats. Everything stays a Polars expression (one when/then per template).

Few-shot exemplars: ``shots`` training examples per dataset chosen by a seeded hash (``fewshot_exemplars``,
as the few-shot baseline uses), rendered under the row's template, in the row's options format. An exemplar's
own row is always zero-shot (it would otherwise see its own answer). Where the exemplars end is kept beside the
text (``EXEMPLAR_ENDS``): a row longer than lengths.inputs loses exemplars from the front when it is tokenized,
never its own question (cutting the end would leave a target for a question the row no longer shows).
Flan 2022 draws exemplars per example; a fixed set per dataset is the cheap, vectorised approximation
(stated, not hidden).
Pattern templates only: a Jinja (P3) template renders as written (its options are part of its text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import polars as pl

from flanpipe.core.registry import DatasetSpec
from flanpipe.data.patterns import Template, fewshot_exemplars, pattern_fewshot_exemplars, rendered_columns

_UNIT = float(2**64)
# A few-shot row's exemplar boundaries: character offsets in ``inputs`` where each exemplar ends (empty for a
# zero-shot row). Tokenization (flanpipe.data.tokenize) drops whole exemplars from the front of a row too long
# for lengths.inputs, so the row's own prompt is kept whole; only shards with few-shot rows carry the column.
EXEMPLAR_ENDS = "exemplar_ends"


@dataclass(frozen=True)
class FormatMix:
    """Shares of training examples per format (config ``formats:``). The defaults are FLAN's: zero-shot,
    options always shown, i.e. no change to the shard."""

    fewshot: float = 0.0  # share of examples that get `shots` exemplars before their inputs
    shots: int = 3
    options: float = 1.0  # share of examples (of datasets with options) that show the options block
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("fewshot", "options"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"formats.{name} must be a share in [0, 1], got {value}")
        if self.shots < 1:
            raise ValueError(f"formats.shots must be >= 1, got {self.shots}")

    @property
    def is_flan(self) -> bool:
        return self.fewshot == 0.0 and self.options == 1.0

    @classmethod
    def from_config(cls, raw: Mapping[str, Any] | None) -> FormatMix:
        return cls(**(raw or {}))


def uniform(dataset: str, salt: str, seed: int) -> pl.Expr:
    """A per-example uniform draw in [0, 1): seeded hash of (dataset, salt, example_id) over 2**64."""
    key = pl.struct(pl.lit(dataset).alias("d"), pl.lit(salt).alias("s"), pl.col("example_id"))
    return key.hash(seed).cast(pl.Float64) / _UNIT


def render_train_formats(
    lf: pl.LazyFrame, spec: DatasetSpec, chosen: Sequence[Template], mix: FormatMix
) -> pl.LazyFrame:
    """The training shard with each example in its drawn format (template still round-robin)."""
    if any(t.kind == "jinja" for t in chosen):
        raise ValueError(
            f"dataset {spec.name!r} ({spec.templates}): prompt formats need pattern templates; "
            "a jinja template shows its options as written"
        )
    position = pl.col("example_id") % len(chosen)
    template_id = pl.lit(chosen[-1].index, pl.Int32)
    for i, t in reversed(list(enumerate(chosen[:-1]))):
        template_id = pl.when(position == i).then(pl.lit(t.index, pl.Int32)).otherwise(template_id)
    with_opts = rendered_columns(spec, "train", template_id, chosen, True)
    at = [c.meta.output_name() for c in with_opts].index("inputs")
    no_opts_inputs = rendered_columns(spec, "train", template_id, chosen, False)[at]
    show = uniform(spec.name, "options", mix.seed) < mix.options if spec.has_options else pl.lit(True)
    inputs = pl.when(show).then(with_opts[at]).otherwise(no_opts_inputs)
    columns = list(with_opts)
    if mix.fewshot > 0:
        exemplars = fewshot_exemplars(lf, mix.shots, mix.seed)
        ids = exemplars.select("example_id").collect()["example_id"].to_list()
        if len(ids) < mix.shots or lf.select(pl.len()).collect().item() <= mix.shots:
            n = lf.select(pl.len()).collect().item()
            raise ValueError(
                f"dataset {spec.name!r}: formats.shots = {mix.shots} exemplars need more than {mix.shots} training "
                f"examples, and it has {n}: no row could be few-shot (exemplars' own rows stay zero-shot). "
                "Lower formats.shots, or leave the dataset out"
            )
        prefix: Any = pl.lit("")
        ends: Any = _int_list([])
        for t in chosen:
            for shown in (True, False):
                pieces = pattern_fewshot_exemplars(exemplars, spec, t, shown)
                this = (template_id == t.index) & (show == shown)
                prefix = pl.when(this).then(pl.lit("".join(pieces))).otherwise(prefix)
                ends = pl.when(this).then(_int_list(list(accumulate(map(len, pieces))))).otherwise(ends)
        fewshot = (uniform(spec.name, "fewshot", mix.seed) < mix.fewshot) & ~pl.col("example_id").is_in(ids)
        inputs = pl.when(fewshot).then(pl.concat_str([prefix, inputs])).otherwise(inputs)
        columns.append(pl.when(fewshot).then(ends).otherwise(_int_list([])).alias(EXEMPLAR_ENDS))
    columns[at] = inputs.alias("inputs")
    return lf.select(columns)


def _int_list(values: list[int]) -> pl.Expr:
    return pl.lit(pl.Series([values], dtype=pl.List(pl.Int32))).first()
