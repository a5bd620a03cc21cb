"""Zero-shot evaluation: rank classification for option tasks, greedy decoding otherwise.

The model is only seen through `Scorer.logits`, a plain causal LM over right-padded rows,
so the same code evaluates a Megatron checkpoint or a toy PyTorch module in the tests. The
workflow's scorer is flanpipe.eval.inference.ParallelLM: any TP x PP layout, and a KV cache that
greedy decoding uses (``_uses_kv_cache``). ``evaluate_many`` is the evaluate rule: one model load
for several datasets, on one process or on the ranks flanpipe.train.launch starts (``main``), rows
dealt over data-parallel replicas (``predict_shard_data_parallel``).

Decisions (written down so train and eval agree, and so a score can be lined up with another harness):
- What an option is scored as (config ``eval.convention``, ``CONVENTIONS``, recorded in the eval JSON):
  ``flan`` (default) scores input ids, then the option's text ids *plus EOS*: exactly the target sequence
  the model was trained to emit (seqio's targets carry EOS). Without EOS an option that is a prefix of
  another ("yes" vs "yes, definitely") could never lose to it, since every extra token only adds a log-prob
  <= 0. ``lm_eval`` scores what lm-evaluation-harness scores: the text ``input + " " + option`` with no EOS,
  split as its ``_encode_pair`` splits it (trailing whitespace of the input moves to the option, the whole
  text is encoded, and the option is the ids after the input's own encoding).
- Options are scored whole. An option that cannot fit beside its input within the model's positions
  (``Scorer.max_positions``) is an error naming the dataset, example, template and option, before any
  scoring; with ``eval.option_tokens`` set, longer options are cut to that many scored tokens (EOS
  included), counted in the eval JSON (``options_cut``) and logged. A silent cut would make two options
  that differ only after it tie, and the earlier one would always win.
- The rank-classification rule (``eval.scoring``, flanpipe.eval.metrics.SCORINGS): summed log-prob (FLAN's)
  by default; ``acc_norm`` is lm-evaluation-harness's rule exactly; every rule's summary is recorded.
- An option list with a duplicate or a single entry cannot rank anything (a duplicate always ties; one
  option always wins): refused, naming the example, or counted and dropped (``eval.bad_option_lists``).
- Input truncation: an input longer than ``lengths.inputs`` keeps its START, as training cuts an input
  (flanpipe.data.tokenize: so a checkpoint's BOS survives and the model is scored on the view of an
  example it was trained on). A few-shot prompt too long for it first loses whole exemplars from the front
  (``fit_fewshot``, training's rule), so the kept start is its own question, never only exemplars. The rows
  cut are counted in the eval JSON (``inputs_cut``), those that lost exemplars too (``exemplars_trimmed``).
  lm-evaluation-harness instead keeps the end of input + option within the model's length, so the two agree
  exactly when no input is cut.
- Every pick is recorded (``{dataset}.predictions.parquet`` beside the JSON, ``RECORD_SCHEMA``): per
  example and template the options, the gold option, the option each rule chose, and each option's
  log-prob, EOS log-prob and scored tokens, so calibration, ties and a paired comparison with another
  harness need no re-scoring. Ties are counted in the JSON (``ties``).
- Right padding + per-row lengths (not left padding): a causal LM with absolute or rotary
  positions sees each row's real tokens at positions 0..len-1 exactly as in training, and
  padding after a row's end cannot influence earlier positions.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import polars as pl
import torch

from flanpipe.core.registry import REFERENCES
from flanpipe.data.formats import EXEMPLAR_ENDS
from flanpipe.data.hf_tokenizer import Tokenizer
from flanpipe.data.tokenize import as_tokenizer, fit_exemplars
from flanpipe.eval.metrics import SCORINGS, get_metric, rank_choices

SPLITS = ("validation", "test")
CONVENTIONS = ("flan", "lm_eval")  # config eval.convention: what an option is scored as (module docstring)
LM_EVAL_DELIMITER = " "  # lm-evaluation-harness's default target_delimiter between input and option
BAD_OPTION_LISTS = ("error", "drop")  # config eval.bad_option_lists


@dataclass(frozen=True)
class RankConfig:
    """The ``eval`` keys that decide what rank classification scores, picks and records (all rerun triggers)."""

    scoring: str = "sum"  # the rule behind the headline (metrics.SCORINGS)
    convention: str = "flan"  # CONVENTIONS
    option_tokens: int | None = None  # None: options scored whole; else the cap on an option's scored tokens
    bad_option_lists: str = "error"  # BAD_OPTION_LISTS

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("scoring", self.scoring, SCORINGS),
            ("convention", self.convention, CONVENTIONS),
            ("bad_option_lists", self.bad_option_lists, BAD_OPTION_LISTS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown eval.{key} {value!r}; choose one of {allowed}")
        if self.option_tokens is not None and self.option_tokens < 1:
            raise ValueError(f"eval.option_tokens must be >= 1 or null, got {self.option_tokens}")

    @classmethod
    def from_config(cls, eval_config: Mapping[str, Any]) -> RankConfig:
        """The validated config's ``eval`` block (defaults filled by flanpipe.plan.config)."""
        return cls(**{k: eval_config[k] for k in cls.__dataclass_fields__})


class Scorer(Protocol):
    """Anything that maps right-padded token rows to next-token logits.

    A scorer may also say how many positions it has (``max_positions``, ParallelLM: the model's
    max_position_embeddings); rank classification then checks every input + option against it first.
    """

    def logits(self, tokens: torch.LongTensor) -> torch.FloatTensor:
        """tokens [b, s] -> logits [b, s, V]; logits[:, t] predicts tokens[:, t + 1]."""
        ...


class OptionLogprobs(NamedTuple):
    """Per example and option: the summed log-prob of the option's ids given the input (``total``) and the
    log-prob of its last id alone (``last``: the EOS under the flan convention)."""

    total: list[list[float]]
    last: list[list[float]]


def _uses_kv_cache(scorer: Scorer) -> bool:
    """Scorers with a KV cache (flanpipe.eval.inference.ParallelLM) decode and rank options incrementally."""
    return all(hasattr(scorer, name) for name in ("new_context", "prefill", "step", "take_rows"))


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> torch.LongTensor:
    """Stack ragged id lists into one [b, max_len] tensor, padding on the right."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):  # one copy per row, not per token
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision logits before log_softmax; keep float64 if the model uses it."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _split(out: list[list[float]], examples: Sequence[int], values: Sequence[float]) -> list[list[float]]:
    """Append each (example, value) pair's value to its example's list, in order."""
    for ex, v in zip(examples, values, strict=True):
        out[ex].append(v)
    return out


def truncate_input(ids: Sequence[int], inputs_length: int) -> list[int]:
    """Cut ids to inputs_length, keeping the start as training does (see the module docstring)."""
    return list(ids[:inputs_length])


def encode_target(ids: Sequence[int], targets_length: int, eos_id: int) -> list[int]:
    """Target ids as trained: first targets_length-1 ids, then EOS (so len <= targets_length)."""
    return [*ids[: targets_length - 1], eos_id]


@torch.inference_mode()
def option_logprobs(
    scorer: Scorer,
    input_ids: Sequence[Sequence[int]],
    options_ids: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
) -> OptionLogprobs:
    """log p(option | input) for every example and option, summed over the option's tokens (and its last alone).

    All (example, option) pairs are flattened, sorted by length (longest first, so an
    out-of-memory shows up on the first batch) and right-padded per batch. For a pair with
    input length L and total length T, option token t in [L, T) is predicted by the logits
    at t - 1, so
        score = sum_{j=0}^{T-L-1} log_softmax(logits[L - 1 + j])[tokens[L + j]]
    The option positions are gathered first ([b, s, V] -> [b, J, V], J = longest option),
    so log_softmax runs on J positions per row instead of s: with s = 1024 + 256 and
    J <= 256 that is 5x less memory than normalizing every input position. Sums are float64.
    """
    if len(input_ids) != len(options_ids):
        raise ValueError(f"{len(input_ids)} inputs but {len(options_ids)} option lists")
    if any(len(ids) == 0 for ids in input_ids):
        raise ValueError("rank classification needs a non-empty input (no BOS token exists)")
    pairs = [
        (ex, list(inp) + list(opt), len(inp))
        for ex, (inp, opts) in enumerate(zip(input_ids, options_ids, strict=True))
        for opt in opts
    ]
    if any(len(seq) == n_in for _, seq, n_in in pairs):
        raise ValueError("every option needs at least one token")
    order = sorted(range(len(pairs)), key=lambda k: -len(pairs[k][1]))
    total = torch.empty(len(pairs), dtype=torch.float64)
    last = torch.empty(len(pairs), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        tokens = _right_pad([pairs[k][1] for k in idx])
        logits = scorer.logits(tokens)
        dev, width, vocab = logits.device, tokens.shape[1], logits.shape[-1]
        tokens = tokens.to(dev)
        n_in = torch.tensor([pairs[k][2] for k in idx], device=dev)
        n_opt = torch.tensor([len(pairs[k][1]) - pairs[k][2] for k in idx], device=dev)
        j = torch.arange(int(n_opt.max()), device=dev)[None, :]
        valid = j < n_opt[:, None]  # [b, J]: real option tokens, not padding
        # predicting position for option token j is L - 1 + j; clamp keeps padded slots in range
        pos = (n_in[:, None] - 1 + j).clamp(max=width - 2)
        picked_logits = logits.gather(1, pos[..., None].expand(-1, -1, vocab))  # [b, J, V]
        logp = torch.log_softmax(_float_logits(picked_logits), dim=-1)
        tok_logp = logp.gather(-1, tokens.gather(1, pos + 1)[..., None]).squeeze(-1).double()  # [b, J]
        total[idx] = torch.where(valid, tok_logp, torch.zeros_like(tok_logp)).sum(-1).cpu()
        last[idx] = tok_logp.gather(1, (n_opt - 1)[:, None]).squeeze(1).cpu()
    examples = [ex for ex, _, _ in pairs]
    empty = [[] for _ in input_ids], [[] for _ in input_ids]
    return OptionLogprobs(_split(empty[0], examples, total.tolist()), _split(empty[1], examples, last.tolist()))


@torch.inference_mode()
def option_logprobs_packed(
    scorer: Any,
    input_ids: Sequence[Sequence[int]],
    options_ids: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
) -> OptionLogprobs:
    """option_logprobs' scores, with the input computed once per example instead of once per option.

    One row per example: input, then every option (segments 1 and k + 2). A block mask lets each
    option attend to the input and to its own earlier tokens only, and positions restart at the
    input's length for every option, so each option token sees exactly what it sees in its own
    (input, option) row: the scores equal option_logprobs' up to float summation order. The row has
    L + sum(n_k) tokens instead of sum(L + n_k), so it always costs fewer FLOPs once an example has
    two options (attention over the longer row is a small term at these lengths). Option token j is
    predicted by the logits at the input's last token (j = 0) or at its own previous token.
    ``batch_size`` counts examples (rows), longest row first.
    """
    if len(input_ids) != len(options_ids):
        raise ValueError(f"{len(input_ids)} inputs but {len(options_ids)} option lists")
    if any(len(ids) == 0 for ids in input_ids):
        raise ValueError("rank classification needs a non-empty input (no BOS token exists)")
    if any(len(opt) == 0 for opts in options_ids for opt in opts):
        raise ValueError("every option needs at least one token")
    lengths = [len(i) + sum(map(len, o)) for i, o in zip(input_ids, options_ids, strict=True)]
    order = sorted(range(len(input_ids)), key=lambda k: -lengths[k])
    total: list[list[float]] = [[] for _ in input_ids]
    last: list[list[float]] = [[] for _ in input_ids]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows, segs, poss, picks = [], [], [], []  # picks: (row, option start in the row, option length)
        for r, ex in enumerate(idx):  # per example and option, never per token
            inp, opts = list(input_ids[ex]), options_ids[ex]
            n_in = len(inp)
            row, seg, pos = inp, [1] * n_in, list(range(n_in))
            for k, opt in enumerate(opts):
                picks.append((r, len(row), len(opt)))
                row = row + list(opt)
                seg += [k + 2] * len(opt)
                pos += range(n_in, n_in + len(opt))
            rows.append(row)
            segs.append(seg)
            poss.append(pos)
        tokens, seg, pos = _right_pad(rows), _right_pad(segs), _right_pad(poss)
        width = tokens.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        sees = (seg[:, None, :] == 1) | (seg[:, :, None] == seg[:, None, :])
        real = (seg[:, :, None] != 0) & (seg[:, None, :] != 0)
        allowed = (causal & sees & real) | torch.eye(width, dtype=torch.bool)  # a pad attends only to itself
        row_i, first, n_opt = (torch.tensor(c) for c in zip(*picks, strict=True))
        n_in = torch.tensor([len(input_ids[ex]) for ex in idx])[row_i]
        j = torch.arange(int(n_opt.max()))[None, :]
        valid = j < n_opt[:, None]  # [P, J]
        at = (first[:, None] + j).clamp(max=width - 1)  # option token j's column
        pred = torch.where(j == 0, n_in[:, None] - 1, at - 1)  # the column whose logits predict it
        picked = scorer.masked_logits(tokens, pos, (~allowed).unsqueeze(1), at=(row_i[:, None], pred))  # [P, J, V]
        logp = torch.log_softmax(_float_logits(picked), dim=-1)
        tok_logp = logp.gather(-1, tokens[row_i[:, None], at].to(logp.device)[..., None]).squeeze(-1).double()
        sums = torch.where(valid, tok_logp, torch.zeros_like(tok_logp)).sum(-1).cpu().tolist()
        lasts = tok_logp.gather(1, (n_opt - 1).to(tok_logp.device)[:, None]).squeeze(1).cpu().tolist()
        examples = [idx[r] for r, _, _ in picks]
        _split(total, examples, sums)
        _split(last, examples, lasts)
    return OptionLogprobs(total, last)


def rank_classification(
    scorer: Scorer,
    input_ids: Sequence[Sequence[int]],
    options_ids: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
) -> list[int]:
    """Index of the most likely option per example (ties go to the earliest option)."""
    scores = option_scores(scorer, input_ids, options_ids, batch_size).total
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def option_scores(
    scorer: Scorer,
    input_ids: Sequence[Sequence[int]],
    options_ids: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
) -> OptionLogprobs:
    """Summed log p(option | input) per example and option (and its last token's), by the scorer's fastest way.

    A scorer that takes a block mask (ParallelLM on the local spec) scores all options of an example
    in one row (option_logprobs_packed): never more FLOPs than one row per option, and 3-5x faster on
    the default's rank-classification shards. Else a KV-cache scorer with ``share_prefix`` set encodes
    each input once (inference.option_logprobs_shared; off by default: one forward per option position
    was not reliably faster on CPU); else one row per (input, option). The shared path stays for the one
    case packing cannot serve: Transformer Engine's spec (the GPU path), whose causal attention ignores
    the block mask (ParallelLM.takes_mask is False); whether it beats one row per option there is for a
    GPU measurement to decide.
    """
    if getattr(scorer, "takes_mask", False) and getattr(scorer, "pack_options", True):
        return option_logprobs_packed(scorer, input_ids, options_ids, batch_size)
    if _uses_kv_cache(scorer) and getattr(scorer, "share_prefix", False):
        from flanpipe.eval.inference import option_logprobs_shared

        return OptionLogprobs(*option_logprobs_shared(scorer, input_ids, options_ids, batch_size))
    return option_logprobs(scorer, input_ids, options_ids, batch_size)


@torch.inference_mode()
def greedy_generate(
    scorer: Scorer,
    input_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    batch_size: int,
) -> list[list[int]]:
    """Greedy continuation of every input, stopping a row at EOS (EOS not returned).

    No KV cache: each step re-runs the prefix, which costs O(steps x len) forwards but is
    trivially correct: the reference the KV-cache path (inference.greedy_generate_cached,
    chosen by predict_shard for scorers that have a cache) is tested against. Rows are right-padded and
    each row reads the logit at its OWN last position (lengths - 1); finished rows drop
    out of the forward pass, and the forward is cut to the longest active row.
    """
    if any(len(ids) == 0 for ids in input_ids):
        raise ValueError("greedy generation needs a non-empty input (no BOS token exists)")
    order = sorted(range(len(input_ids)), key=lambda k: -len(input_ids[k]))
    out: list[list[int]] = [[] for _ in input_ids]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        prompts = [input_ids[k] for k in idx]
        lengths = torch.tensor([len(p) for p in prompts])
        buf = _right_pad(prompts)
        buf = torch.cat([buf, torch.zeros(len(idx), max_new_tokens, dtype=torch.long)], dim=1)
        n_new = torch.zeros(len(idx), dtype=torch.long)
        active = torch.ones(len(idx), dtype=torch.bool)
        for _ in range(max_new_tokens):
            rows = active.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            width = int(lengths[rows].max())
            logits = scorer.logits(buf[rows, :width])
            last = (lengths[rows] - 1).to(logits.device)
            nxt = logits[torch.arange(rows.numel(), device=logits.device), last].argmax(-1).cpu()
            done = nxt == eos_id
            keep = rows[~done]
            buf[keep, lengths[keep]] = nxt[~done]
            lengths[keep] += 1
            n_new[keep] += 1
            active[rows[done]] = False
        for j, k in enumerate(idx):
            start_new = len(prompts[j])
            out[k] = buf[j, start_new : start_new + int(n_new[j])].tolist()
    return out


@cache
def _python_whitespace() -> str:
    """The characters Python's ``str.rstrip()`` strips (lm-evaluation-harness moves those off the input)."""
    return "".join(c for c in map(chr, range(0x3001)) if c.isspace())


@dataclass(frozen=True)
class EncodedOptions:
    """Rank-classification rows as the scorer sees them: per row its input ids, per option its scored ids."""

    inputs: list[list[int]]  # the input's ids, cut to lengths.inputs keeping the start
    options: list[list[list[int]]]  # flan: option text ids + EOS; lm_eval: lm-evaluation-harness's continuation
    input_cut: list[bool]  # per row: the input was longer than lengths.inputs
    options_cut: list[int]  # per row: options cut to eval.option_tokens
    eos: bool  # every option's last scored id is the EOS (flan)


def _name_row(row: Mapping[str, Any]) -> str:
    """How an error names one shard row: dataset, split, example and template."""
    return (
        f"dataset {row.get('dataset')!r}, {row.get('split')} example_id {row.get('example_id')} "
        f"(template {row.get('template_id')})"
    )


def encode_options(
    sp: Tokenizer,
    rows: pl.DataFrame,
    inputs_length: int,
    *,
    convention: str = "flan",
    option_tokens: int | None = None,
    max_positions: int | None = None,
) -> EncodedOptions:
    """Token ids of every (input, option) pair of ``rows`` (shard rows with options) under ``convention``.

    Options are whole unless ``option_tokens`` caps them (flan: the first option_tokens - 1 text ids + EOS, as
    encode_target cuts a trained target; lm_eval: the first option_tokens ids). With ``max_positions``, an input +
    option longer than that is an error naming the row and option: it would not fit the model.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown eval.convention {convention!r}; choose one of {CONVENTIONS}")
    sp = as_tokenizer(sp)
    flat = rows.select(pl.int_range(pl.len()).alias("_r"), "inputs", "options").explode("options")
    row_of = flat["_r"].to_numpy()
    if convention == "flan":
        full = sp.encode_batch(rows["inputs"].to_list())
        text = sp.encode_batch(flat["options"].to_list(), add_special=False)
        own = np.fromiter(map(len, text), dtype=np.int64, count=len(text))  # the option's own tokens
        cap = option_tokens or int(own.max(initial=0)) + 1  # no cap: every option whole, + EOS
        options = [encode_target(ids, cap, sp.eos_id) for ids in text]
        cut = own + 1 > cap
    else:
        # lm-evaluation-harness's _encode_pair for (input, " " + option): the input's trailing whitespace moves
        # to the option, the whole text is encoded, and the option is what follows the input's own encoding
        full = sp.encode_batch(rows["inputs"].str.strip_chars_end(_python_whitespace()).to_list())
        texts = flat.select(pl.concat_str("inputs", pl.lit(LM_EVAL_DELIMITER), "options"))[:, 0]
        whole = sp.encode_batch(texts.to_list())
        cont = [ids[len(full[r]) :] for ids, r in zip(whole, row_of.tolist(), strict=True)]
        own = np.fromiter(map(len, cont), dtype=np.int64, count=len(cont))
        cap = option_tokens or int(own.max(initial=0))
        options = [ids[:cap] for ids in cont]
        cut = own > cap
    n_in = np.fromiter((min(len(ids), inputs_length) for ids in full), dtype=np.int64, count=len(full))
    n_opt = np.fromiter(map(len, options), dtype=np.int64, count=len(options))
    bad = np.flatnonzero(own == 0)
    if bad.size:
        k = int(bad[0])
        raise ValueError(
            f"{_name_row(rows.row(int(row_of[k]), named=True))}: option {flat['options'][k]!r} encodes to no tokens "
            f"({bad.size} such option(s)); rank classification needs every option to have one"
        )
    if max_positions is not None:
        over = np.flatnonzero(n_in[row_of] + n_opt > max_positions)
        if over.size:
            k, r = int(over[0]), int(row_of[over[0]])
            raise ValueError(
                f"{_name_row(rows.row(r, named=True))}: option {flat['options'][k]!r} is {n_opt[k]} scored tokens; "
                f"beside its {n_in[r]}-token input that is {n_in[r] + n_opt[k]} > the model's {max_positions} "
                f"positions ({over.size} such option(s)). "
                + (
                    "Options are scored whole: set eval.option_tokens to cut long options (counted in the eval JSON)"
                    if option_tokens is None
                    else f"eval.option_tokens = {option_tokens} is too many for this model"
                )
                + " or lower lengths.inputs"
            )
    per_row: list[list[list[int]]] = [[] for _ in range(rows.height)]
    for r, ids in zip(row_of.tolist(), options, strict=True):  # one append per option
        per_row[r].append(ids)
    return EncodedOptions(
        inputs=[truncate_input(ids, inputs_length) for ids in full],
        options=per_row,
        input_cut=[len(ids) > inputs_length for ids in full],
        options_cut=np.bincount(row_of[cut], minlength=rows.height).tolist(),
        eos=convention == "flan",
    )


def screen_option_lists(shard: pl.DataFrame, action: str = "error") -> tuple[pl.DataFrame, dict[str, int]]:
    """Refuse (``error``) or drop (``drop``) scored rows whose option list has a duplicate or a single entry.

    A duplicate always ties with its twin, so the earlier copy wins whatever the model says; a single option
    always wins. Returns the shard (without those rows when dropped) and how many of each there were.
    """
    if action not in BAD_OPTION_LISTS:
        raise ValueError(f"unknown eval.bad_option_lists {action!r}; choose one of {BAD_OPTION_LISTS}")
    n = pl.col("options").list.len()
    scored = ~pl.col("turned_around") & (n > 0)
    kinds = {"single": scored & (n == 1), "duplicate": scored & (pl.col("options").list.n_unique() < n)}
    flags = shard.select(**kinds)
    counts = {k: int(flags[k].sum()) for k in kinds}
    if not any(counts.values()):
        return shard, counts
    if action == "drop":
        return shard.filter(~(kinds["single"] | kinds["duplicate"])), counts
    kind = next(k for k, v in counts.items() if v)
    row = shard.filter(kinds[kind]).row(0, named=True)
    raise ValueError(
        f"{_name_row(row)}: option list {row['options']} has "
        + ("a single option, which always wins" if kind == "single" else "a duplicate, which always ties")
        + f" ({counts['single']} single-option and {counts['duplicate']} duplicate-option row(s)); fix the dataset "
        "or template, or set eval.bad_option_lists: drop to count and drop such rows"
    )


RECORD_SCHEMA: dict[str, pl.DataType] = {
    "split": pl.Utf8,
    "example_id": pl.Int64,
    "template_id": pl.Int32,
    "targets": pl.Utf8,
    "prediction": pl.Utf8,  # the headline rule's pick (or the greedy decode)
    "options": pl.List(pl.Utf8),
    "gold": pl.Int16,  # the target's index among the options (null: not among them, or no options)
    "chosen": pl.Int16,  # the headline rule's pick, as an index
    **{f"chosen_{k}": pl.Int16 for k in SCORINGS},
    "tied": pl.Boolean,  # the headline rule's best score was shared
    "logprob": pl.List(pl.Float64),  # each option's summed log-prob: everything scored (rule sum)
    "eos_logprob": pl.List(pl.Float64),  # its EOS's share of it (flan convention; null under lm_eval)
    "n_tokens": pl.List(pl.Int32),  # its scored tokens, EOS included
    "options_cut": pl.Int16,  # options of this row cut to eval.option_tokens
    "input_cut": pl.Boolean,  # the input was cut to lengths.inputs
    "exemplars_trimmed": pl.Boolean,  # a few-shot prompt lost exemplars from the front to fit lengths.inputs
}
"""``{dataset}.predictions.parquet``: one row per scored (split, example, template); option columns null or empty
for generated rows."""


def _gold(rows: pl.DataFrame) -> pl.Series:
    """The target's first index among each row's options (null when it is not one of them)."""
    flat = rows.select(pl.int_range(pl.len()).alias("_r"), "targets", "options").explode("options")
    hit = (
        flat.with_columns(_k=pl.int_range(pl.len()).over("_r"))
        .filter(pl.col("options") == pl.col("targets"))
        .group_by("_r")
        .agg(pl.col("_k").first())
    )
    index = pl.DataFrame({"_r": range(rows.height)}, schema={"_r": flat["_r"].dtype})
    return index.join(hit, on="_r", how="left").sort("_r")["_k"].cast(pl.Int16).alias("gold")


def fit_fewshot(sp: Tokenizer, shard: pl.DataFrame, inputs_length: int) -> pl.DataFrame:
    """A few-shot shard's prompts too long for ``inputs_length`` lose exemplars from the front (the rule training
    rows follow, flanpipe.data.tokenize.fit_exemplars), so that the start an input keeps when it is cut is the
    question, never only exemplars; ``exemplars_trimmed`` marks them. Zero-shot shards are returned as they are."""
    if EXEMPLAR_ENDS not in shard.columns:
        return shard
    fitted, _ = fit_exemplars(as_tokenizer(sp), shard["inputs"], shard[EXEMPLAR_ENDS], inputs_length)
    return shard.with_columns(exemplars_trimmed=fitted != shard["inputs"], inputs=fitted)


def predict_shard(
    scorer: Scorer,
    sp: Tokenizer,
    shard: pl.DataFrame,
    inputs_length: int,
    targets_length: int,
    batch_size: int = 32,
    rank: RankConfig = RankConfig(),  # noqa: B008 (frozen, immutable)
) -> pl.DataFrame:
    """Add a `prediction` column (the chosen option text, or the greedy decode) and the record's columns.

    Rows with a non-empty `options` list are rank-classified under ``rank`` (convention, cap): `prediction`
    by the headline rule ``rank.scoring``, `prediction_<rule>` by each rule of metrics.SCORINGS (a generated
    row's are its decode), plus RECORD_SCHEMA's columns and `tied_<rule>`. The others are generated (up to
    targets_length tokens, the trained target budget including EOS). Turned-around templates are dropped:
    they invert the task, so they are not evaluations of it.
    """
    sp = as_tokenizer(sp)
    eos = sp.eos_id
    df = fit_fewshot(sp, shard.filter(~pl.col("turned_around")), inputs_length).with_row_index("_row")
    is_cls = pl.col("options").list.len() > 0
    cls, gen = df.filter(is_cls), df.filter(~is_cls)
    parts: list[pl.DataFrame] = []
    if cls.height:
        enc = encode_options(
            sp,
            cls,
            inputs_length,
            convention=rank.convention,
            option_tokens=rank.option_tokens,
            max_positions=getattr(scorer, "max_positions", None),
        )
        lp = option_scores(scorer, enc.inputs, enc.options, batch_size)
        own = [[t - e for t, e in zip(ts, es, strict=True)] for ts, es in zip(lp.total, lp.last, strict=True)]
        chars = cls["options"].list.eval(pl.element().str.len_chars()).to_list()
        tokens = [list(map(len, opts)) for opts in enc.options]
        ranking = rank_choices(own if enc.eos else lp.total, chars, tokens, lp.last if enc.eos else None)
        f64, i32 = pl.List(pl.Float64), pl.List(pl.Int32)
        cols: dict[str, Any] = {}
        for k in SCORINGS:
            cols[f"chosen_{k}"] = pl.Series(ranking.winners[k], dtype=pl.Int16)
            cols[f"prediction_{k}"] = pl.col("options").list.get(cols[f"chosen_{k}"])
            cols[f"tied_{k}"] = pl.Series(ranking.tied[k], dtype=pl.Boolean)
        cols.update(
            gold=_gold(cls),
            logprob=pl.Series(lp.total, dtype=f64),
            eos_logprob=pl.Series(lp.last, dtype=f64) if enc.eos else pl.lit(None, dtype=f64),
            n_tokens=pl.Series(tokens, dtype=i32),
            options_cut=pl.Series(enc.options_cut, dtype=pl.Int16),
            input_cut=pl.Series(enc.input_cut, dtype=pl.Boolean),
        )
        parts.append(cls.with_columns(**cols))
    if gen.height:
        full = sp.encode_batch(gen["inputs"].to_list())
        inputs = [truncate_input(ids, inputs_length) for ids in full]
        if _uses_kv_cache(scorer):
            from flanpipe.eval.inference import greedy_generate_cached

            new = greedy_generate_cached(scorer, inputs, targets_length, eos, batch_size)
        else:
            new = greedy_generate(scorer, inputs, targets_length, eos, batch_size)
        decoded = pl.Series(sp.decode_batch(new), dtype=pl.Utf8)
        cut = pl.Series([len(ids) > inputs_length for ids in full], dtype=pl.Boolean)
        parts.append(gen.with_columns(**{f"prediction_{k}": decoded for k in SCORINGS}, input_cut=cut))
    added = {
        **{f"prediction_{k}": pl.Utf8 for k in SCORINGS},
        **{f"tied_{k}": pl.Boolean for k in SCORINGS},
        **{k: v for k, v in RECORD_SCHEMA.items() if k not in df.columns},
    }
    out = pl.concat(parts, how="diagonal") if parts else df
    typed = (pl.col(k).cast(v) if k in out.columns else pl.lit(None, dtype=v).alias(k) for k, v in added.items())
    out = out.select(*df.columns, *typed)
    return (
        out.with_columns(
            prediction=pl.col(f"prediction_{rank.scoring}"),
            chosen=pl.col(f"chosen_{rank.scoring}"),
            tied=pl.col(f"tied_{rank.scoring}"),
            options_cut=pl.col("options_cut").fill_null(0),
            # a generated row has no options: empty lists, no pick
            **{k: pl.col(k).fill_null(pl.lit([], dtype=added[k])) for k in ("logprob", "n_tokens")},
        )
        .sort("_row")
        .drop("_row")
    )


def _data_parallel(scorer: Scorer) -> tuple[int, int, object]:
    """(DP rank, DP size, DP group) of a model-parallel scorer; (0, 1, None) for any other."""
    return getattr(scorer, "dp_rank", 0), getattr(scorer, "dp_size", 1), getattr(scorer, "dp_group", None)


def predict_shard_data_parallel(
    scorer: Scorer,
    sp: Tokenizer,
    shard: pl.DataFrame,
    inputs_length: int,
    targets_length: int,
    batch_size: int = 32,
    rank: RankConfig = RankConfig(),  # noqa: B008 (frozen, immutable)
) -> pl.DataFrame:
    """predict_shard with the rows dealt round-robin over the data-parallel replicas and the predictions
    gathered on every rank, in the shard's order. Each row is scored alone (right padding, causal
    model), so the predictions do not depend on the DP size."""
    dp_rank, size, group = _data_parallel(scorer)
    if size == 1:
        return predict_shard(scorer, sp, shard, inputs_length, targets_length, batch_size, rank)
    import torch.distributed as dist

    kept = shard.filter(~pl.col("turned_around")).with_row_index("_dp_row")
    if kept.height < size:
        raise ValueError(f"{kept.height} examples cannot be shared by {size} data-parallel ranks")
    mine = kept.filter(pl.col("_dp_row") % size == dp_rank)
    local = predict_shard(scorer, sp, mine, inputs_length, targets_length, batch_size, rank)
    parts: list[pl.DataFrame | None] = [None] * size
    dist.all_gather_object(parts, local, group=group)
    return pl.concat(parts).sort("_dp_row").drop("_dp_row")


def reference_column(predictions: pl.DataFrame) -> str:
    """What a prediction is scored against: the eval shard's ``references`` (every target that counts as
    right: an example with several acceptable answers is right when the prediction matches any of them,
    flanpipe.eval.metrics takes the best), or ``targets`` in a shard rendered without them."""
    return REFERENCES if REFERENCES in predictions.columns else "targets"


def score_templates(predictions: pl.DataFrame, metric: str) -> pl.DataFrame:
    """One row per template: validation/test score and counts (score null if no examples).

    Metrics are corpus-level functions (BLEU is not a mean of per-row scores), so each
    (template, split) group is handed to the metric whole; the loop is over groups only.
    """
    fn = get_metric(metric)
    refs = reference_column(predictions)
    groups = (
        predictions.group_by("template_id", "split")
        .agg("prediction", pl.col(refs).alias("refs"), n=pl.len())
        .filter(pl.col("split").is_in(SPLITS))
    )
    scores = [fn(p, t) for p, t in zip(groups["prediction"].to_list(), groups["refs"].to_list(), strict=True)]
    long = groups.select("template_id", "split", "n").with_columns(score=pl.Series(scores, dtype=pl.Float64))
    templates = predictions.select(pl.col("template_id").unique().sort())
    for split in SPLITS:
        one = long.filter(pl.col("split") == split).select(
            "template_id", pl.col("score").alias(split), pl.col("n").alias(f"n_{split}")
        )
        templates = templates.join(one, on="template_id", how="left")
    return templates.select("template_id", *SPLITS, *(pl.col(f"n_{s}").fill_null(0).cast(pl.Int64) for s in SPLITS))


def per_example_scores(predictions: pl.DataFrame, metric: str) -> dict[str, list]:
    """Each scored (split, template, example)'s own metric value, column-wise: what flanpipe.report.stats
    resamples for confidence intervals and paired tests.

    For accuracy, exact match, F1 and ROUGE the per-template score is exactly the mean of these; for a
    corpus metric (BLEU) each is the metric of that example alone (sentence BLEU), whose mean differs
    from the corpus score, so intervals on BLEU datasets are about sentence BLEU. The loop is over a
    few thousand scored rows, each handed to the same metric function as ``score_templates``.
    """
    fn = get_metric(metric)
    rows = predictions.filter(pl.col("split").is_in(SPLITS)).sort("split", "template_id", "example_id")
    refs = rows[reference_column(predictions)].to_list()
    scores = [fn([p], [t]) for p, t in zip(rows["prediction"].to_list(), refs, strict=True)]
    return {
        "split": rows["split"].to_list(),
        "template_id": rows["template_id"].to_list(),
        "example_id": rows["example_id"].to_list(),
        "score": scores,
    }


def chance_score(predictions: pl.DataFrame) -> float | None:
    """Expected test score of picking an option uniformly at random (mean of 100 / number of options over
    the scored test rows): the floor a figure draws so a score near it reads as no skill."""
    test = predictions.filter((pl.col("split") == "test") & (pl.col("options").list.len() > 0))
    return test.select((100.0 / pl.col("options").list.len()).mean()).item() if test.height else None


def summarize(per_template: pl.DataFrame) -> dict:
    """Mean/std over templates (test split) and the best-dev-template test score.

    The template is chosen by its VALIDATION score only (ties -> lowest template_id);
    its test score is then read off. Looking at test here would overstate zero-shot
    performance. std is the population std (ddof=0) so a single template gives 0, not NaN.
    """
    test = per_template["test"].drop_nulls()
    dev = per_template.filter(pl.col("validation").is_not_null()).sort(
        ["validation", "template_id"], descending=[True, False]
    )
    best = dev.row(0, named=True) if dev.height else None
    return {
        "mean": float(test.mean()) if test.len() else None,
        "std": float(test.std(ddof=0)) if test.len() else None,
        "median": float(test.median()) if test.len() else None,  # T0 reports mean and median over prompts
        "best_dev_template": int(best["template_id"]) if best else None,
        "best_dev_test": best["test"] if best else None,
    }


def write_records(predictions: pl.DataFrame, path: Path) -> None:
    """The per-example record (RECORD_SCHEMA, and the shard's ``references`` when it has them) of
    ``predict_shard``'s output, as Parquet, atomically."""
    from flanpipe.core.io import atomic_path

    refs = [REFERENCES] if REFERENCES in predictions.columns else []
    with atomic_path(path) as tmp:
        predictions.select(*(pl.col(k).cast(v) for k, v in RECORD_SCHEMA.items()), *refs).write_parquet(tmp)


def _log_cuts(dataset: str, preds: pl.DataFrame, rank: RankConfig) -> int:
    """Log the options cut to eval.option_tokens (the first row named) and return how many there were."""
    cut = int(preds["options_cut"].sum())
    if cut:
        rows = preds.filter(pl.col("options_cut") > 0)
        print(
            f"flanpipe evaluate: {dataset}: {cut} option(s) in {rows.height} row(s) were longer than "
            f"eval.option_tokens = {rank.option_tokens} scored tokens and were cut, first in "
            f"{_name_row({'dataset': dataset, **rows.row(0, named=True)})}",
            file=sys.stderr,
            flush=True,
        )
    return cut


def evaluate_shard(
    scorer: Scorer,
    sp: Tokenizer,
    shard: pl.DataFrame,
    metric: str,
    inputs_length: int,
    targets_length: int,
    batch_size: int = 32,
    predictions_out: Path | None = None,
    rank: RankConfig = RankConfig(),  # noqa: B008 (frozen, immutable)
) -> dict:
    """Zero-shot result for one dataset's eval shard (schema: see ARCH.md, Evaluation); with
    ``predictions_out``, every row's record (RECORD_SCHEMA) is written there (Parquet) too.

    ``rank.scoring`` (config eval.scoring, a rule of metrics.SCORINGS) picks the rank-classification rule behind
    the headline; an option task's record also holds every rule's summary under ``scorings`` and its ties under
    ``ties``. The convention, the option cap and what was cut or dropped are recorded beside them."""
    names = shard.select("dataset", "cluster").unique()
    if names.height != 1:
        raise ValueError(f"eval shard must hold exactly one dataset, got {names.rows()}")
    dataset, cluster = names.row(0)
    get_metric(metric)  # fail before spending model time on an unknown metric
    shard, dropped = screen_option_lists(shard, rank.bad_option_lists)
    if any(dropped.values()):
        print(f"flanpipe evaluate: {dataset}: dropped option lists {dropped} (eval.bad_option_lists: drop)",
              file=sys.stderr, flush=True)  # fmt: skip
    t0 = time.perf_counter()
    preds = predict_shard_data_parallel(scorer, sp, shard, inputs_length, targets_length, batch_size, rank)
    seconds = time.perf_counter() - t0
    if predictions_out is not None:
        write_records(preds, predictions_out)
    per_template = score_templates(preds, metric)
    option_rows = preds.filter(pl.col("options").list.len() > 0)
    has_options = bool(option_rows.height)
    scorings = {
        k: summarize(score_templates(preds.with_columns(prediction=pl.col(f"prediction_{k}")), metric))
        for k in (SCORINGS if has_options else ())
    }
    return {
        "dataset": dataset,
        "cluster": cluster,
        "metric": metric,
        "scoring": rank.scoring,
        "scorings": scorings,  # every rank-classification rule's summary (option tasks only)
        "convention": rank.convention,  # what an option is scored as (flan: + EOS; lm_eval: " " + option)
        "option_tokens": rank.option_tokens,  # the cap on an option's scored tokens (null: scored whole)
        "options_cut": _log_cuts(dataset, preds, rank),
        "inputs_cut": int(preds["input_cut"].sum()),  # rows whose input was cut to lengths.inputs (start kept)
        # few-shot rows that lost exemplars from the front to fit lengths.inputs (their own question kept)
        "exemplars_trimmed": int(preds["exemplars_trimmed"].fill_null(False).sum()),
        "ties": {k: int(option_rows[f"tied_{k}"].sum()) for k in (SCORINGS if has_options else ())},
        "dropped_option_lists": dropped,  # rows dropped under eval.bad_option_lists: drop
        "predictions": predictions_out.name if predictions_out is not None else None,
        "chance": chance_score(preds) if has_options else None,
        "n_templates": per_template.height,
        "per_template": per_template.to_dicts(),
        **summarize(per_template),
        "examples_per_s": preds.height / seconds if seconds > 0 else None,
        "per_example": per_example_scores(preds, metric),  # flanpipe.report.stats: intervals, paired tests
    }


def check_lengths(lengths: Mapping[str, int], rank: RankConfig, max_positions: int | None, model: str) -> None:
    """What the DAG checks at plan time (flanpipe.plan: lengths.inputs + lengths.targets <= lengths.pack <=
    max_position_embeddings, and an option cap beside a full input), for a model handed to evaluate by hand."""
    if max_positions is None:
        return
    for key, n in (("lengths.targets", lengths["targets"]), ("eval.option_tokens", rank.option_tokens)):
        if n is not None and lengths["inputs"] + n > max_positions:
            raise ValueError(
                f"config keys lengths.inputs + {key} = {lengths['inputs']} + {n} = {lengths['inputs'] + n} tokens "
                f"are longer than max_position_embeddings = {max_positions} of {model}"
            )


def _max_positions(scorer: Scorer | None, model_dir: Path) -> int | None:
    """The position limit options are checked against: the scorer's, else the model.json's (torch-free)."""
    if scorer is not None:
        return getattr(scorer, "max_positions", None)
    from flanpipe.core.model_config import load_model_config

    return load_model_config(Path(model_dir) / "model.json").max_position_embeddings


def check_shards(
    sp: Tokenizer,
    shards: Mapping[str, pl.DataFrame],
    inputs_length: int,
    rank: RankConfig,
    max_positions: int | None,
) -> None:
    """Everything about the shards' option rows that would otherwise fail after the model load: their option lists
    (``screen_option_lists``) and every option beside its input within the model's positions (``encode_options``)."""
    for df in shards.values():
        df, _ = screen_option_lists(df, rank.bad_option_lists)
        cls = df.filter(~pl.col("turned_around") & (pl.col("options").list.len() > 0))
        if cls.height:
            encode_options(sp, cls, inputs_length, convention=rank.convention, option_tokens=rank.option_tokens,
                           max_positions=max_positions)  # fmt: skip


def _tokenizer(tokenizer: Path | Tokenizer) -> Tokenizer:
    """A tokenizer path opened (flanpipe.data.tokenize.open_tokenizer), or a tokenizer object as given (tests)."""
    from flanpipe.data.tokenize import open_tokenizer

    return open_tokenizer(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer


def evaluate_many(
    model_dir: Path,
    tokenizer: Path | Tokenizer,
    shards: Mapping[str, Path],
    metrics: Mapping[str, str],
    out_dir: Path,
    *,
    lengths: dict[str, int],
    batch_size: int = 32,
    scorer: Scorer | None = None,
    tp: int = 1,
    pp: int = 1,
    rank: RankConfig = RankConfig(),  # noqa: B008 (frozen, immutable)
) -> dict[str, dict]:
    """Rule ``evaluate``: load a trained model once, score several eval shards with it, write
    ``out_dir/{name}.json`` per shard (the same record run_evaluation writes) and its per-example record
    (``{name}.predictions.parquet``, RECORD_SCHEMA), and return the records by name.

    A name is the dataset, or ``<variant>/<dataset>`` when one job scores several prompt variants of a
    dataset (the rule's names, flanpipe.plan.eval_plan.result_name): its last part must be the shard's dataset.

    Under torchrun/srun (flanpipe.train.launch, ``main``) every rank calls this: the model loads at TP x PP,
    the world's remaining factor is data parallel, and global rank 0 alone writes.

    Every metric, shard, option list and option length is checked before the model loads, so a typo or an
    option too long for the model fails in seconds, not after a load. ``scorer`` replaces the load (tests,
    benches). Inputs are truncated like training inputs (keep the start, as seqio does) so the model is scored
    on the view of an example it was trained on.
    """
    from flanpipe.core.io import write_json
    from flanpipe.core.rerun import version_record

    started_cpu = time.process_time()  # interpreter, imports and the caller's set-up: the job's fixed cost
    if set(shards) != set(metrics):
        raise ValueError(f"datasets with a shard {sorted(shards)} differ from datasets with a metric {sorted(metrics)}")
    for dataset, metric in metrics.items():
        get_metric(metric)
        if not Path(shards[dataset]).exists():
            raise FileNotFoundError(f"eval shard of {dataset} not found: {shards[dataset]}")
    max_positions = _max_positions(scorer, model_dir)
    check_lengths(lengths, rank, max_positions, f"{model_dir}/model.json")
    sp = _tokenizer(tokenizer)
    frames = {dataset: pl.read_parquet(shards[dataset]) for dataset in sorted(shards)}
    check_shards(sp, frames, lengths["inputs"], rank, max_positions)
    loading_cpu = time.process_time()
    if scorer is None:
        from flanpipe.eval.inference import load_parallel_lm

        scorer = load_parallel_lm(model_dir, tp, pp)
    scoring_cpu = time.process_time()
    writer = getattr(scorer, "global_rank", 0) == 0
    out_dir = Path(out_dir)
    if writer:
        for name in frames:  # out_dir itself, and <variant>/ below it for a job scoring several variants
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, df in frames.items():
        result = evaluate_shard(
            scorer,
            sp,
            df,
            metrics[name],
            lengths["inputs"],
            lengths["targets"],
            batch_size=batch_size,
            predictions_out=out_dir / f"{name}.predictions.parquet" if writer else None,
            rank=rank,
        )
        if result["dataset"] != name.rsplit("/", 1)[-1]:
            raise ValueError(f"shard {shards[name]} holds {result['dataset']}, expected {name}")
        result["model"] = str(model_dir)
        result.update(version_record("evaluate"))
        if writer:
            write_json(out_dir / f"{name}.json", result)
        results[name] = result
    if writer:
        cpu = (started_cpu, loading_cpu - started_cpu, scoring_cpu - loading_cpu, time.process_time() - scoring_cpu)
        print(job_cpu_line(*cpu), file=sys.stderr)
    return results


JOB_CPU_PREFIX = "evaluate job CPU s:"


def job_cpu_line(start: float, checks: float, load: float, scoring: float) -> str:
    """The line each evaluate job logs (rank 0), read back by ``flanpipe bench eval-stage``: CPU seconds of
    its fixed start (interpreter, imports, set-up before evaluate_many), the input checks (tokenizer, shards),
    the model load, and the scoring."""
    return f"{JOB_CPU_PREFIX} start {start:.2f} checks {checks:.2f} load {load:.2f} scoring {scoring:.2f}"


def eval_argv(
    model_dir: Path,
    tokenizer: Path,
    shards: Mapping[str, Path],
    metrics: Mapping[str, str],
    out_dir: Path,
    *,
    lengths: dict[str, int],
    batch_size: int,
    tp: int = 1,
    pp: int = 1,
    rank: RankConfig = RankConfig(),  # noqa: B008 (frozen, immutable)
) -> list[str]:
    """``main``'s arguments for one evaluate_many call (what the rule hands to flanpipe.train.launch)."""
    argv = ["--model", str(model_dir), "--tokenizer", str(tokenizer), "--out-dir", str(out_dir)]
    argv += ["--inputs-length", str(lengths["inputs"]), "--targets-length", str(lengths["targets"])]
    argv += ["--batch-size", str(batch_size), "--tp", str(tp), "--pp", str(pp)]
    argv += ["--scoring", rank.scoring, "--convention", rank.convention, "--bad-option-lists", rank.bad_option_lists]
    if rank.option_tokens is not None:
        argv += ["--option-tokens", str(rank.option_tokens)]
    for dataset in sorted(shards):
        argv += ["--shard", f"{dataset}={shards[dataset]}", "--metric", f"{dataset}={metrics[dataset]}"]
    return argv


def main(argv: list[str] | None = None) -> int:
    """One rank of a launched evaluation (``flanpipe launch --module flanpipe.eval.evaluate``)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m flanpipe.eval.evaluate", description="evaluate_many on this rank")
    for name in ("--model", "--tokenizer", "--out-dir"):
        p.add_argument(name, required=True)
    for name in ("--inputs-length", "--targets-length", "--batch-size"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--scoring", choices=SCORINGS, default="sum")
    p.add_argument("--convention", choices=CONVENTIONS, default="flan")
    p.add_argument("--option-tokens", type=int, default=None)
    p.add_argument("--bad-option-lists", choices=BAD_OPTION_LISTS, default="error")
    p.add_argument("--shard", action="append", default=[], metavar="DATASET=PATH")
    p.add_argument("--metric", action="append", default=[], metavar="DATASET=METRIC")
    a = p.parse_args(argv)
    evaluate_many(
        Path(a.model),
        Path(a.tokenizer),
        {k: Path(v) for k, v in (item.split("=", 1) for item in a.shard)},
        dict(item.split("=", 1) for item in a.metric),
        Path(a.out_dir),
        lengths={"inputs": a.inputs_length, "targets": a.targets_length},
        batch_size=a.batch_size,
        tp=a.tp,
        pp=a.pp,
        rank=RankConfig(a.scoring, a.convention, a.option_tokens, a.bad_option_lists),
    )
    return 0


# dist_checkpointing's spawn-mode machinery re-imports __main__: keep the entry point guarded.
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def run_evaluation(
    model_dir: Path,
    tokenizer: Path | Tokenizer,
    shard: Path,
    out: Path,
    *,
    metric: str,
    lengths: dict[str, int],
    batch_size: int = 32,
    rank: RankConfig = RankConfig(),  # noqa: B008 (frozen, immutable)
) -> dict:
    """``flanpipe evaluate``: one dataset's eval shard, its result written to ``out`` and its per-example record
    beside it (``out`` with suffix ``.predictions.parquet``). Checked before the model loads as the rule's job is:
    the metric, lengths.inputs + lengths.targets (and eval.option_tokens) against the model's
    max_position_embeddings as the DAG checks them, and every option beside its input."""
    from flanpipe.core.io import write_json
    from flanpipe.eval.inference import load_parallel_lm

    get_metric(metric)
    max_positions = _max_positions(None, model_dir)
    check_lengths(lengths, rank, max_positions, f"{model_dir}/model.json")
    sp = _tokenizer(tokenizer)
    df = pl.read_parquet(shard)
    check_shards(sp, {str(shard): df}, lengths["inputs"], rank, max_positions)
    scorer = load_parallel_lm(model_dir)
    out = Path(out)
    records = out.with_name(out.name.removesuffix(".json") + ".predictions.parquet")
    result = evaluate_shard(scorer, sp, df, metric, lengths["inputs"], lengths["targets"], batch_size=batch_size,
                            predictions_out=records, rank=rank)  # fmt: skip
    result["model"] = str(model_dir)
    write_json(out, result)
    return result
