"""Zero-shot evaluation: rank classification for option tasks, greedy decoding otherwise.

The model is only seen through `Scorer.logits`, a plain causal LM over right-padded rows,
so the same code evaluates a Megatron checkpoint or a toy PyTorch module in the tests. The
workflow's scorer is flanpipe.eval.inference.ParallelLM: any TP x PP layout, and a KV cache that
greedy decoding uses (``_uses_kv_cache``). ``evaluate_many`` is the evaluate rule: one model load
for several datasets, on one process or on the ranks flanpipe.train.launch starts (``main``), rows
dealt over data-parallel replicas (``predict_shard_data_parallel``).

Decisions (FLAN-compatible, written down so train and eval agree):
- Option scoring: an option is scored as its text tokens *plus EOS*, i.e. exactly the target
  sequence the model was trained to emit (targets are encoded as ids[:targets_length-1] + EOS).
  Without EOS an option that is a prefix of another ("yes" vs "yes, definitely") could never
  lose to it, since every extra token only adds a log-prob <= 0. Scores are summed, not
  length-normalized, as in FLAN's rank classification.
- Input truncation: inputs longer than inputs_length keep their END by default (keep_end=True).
  FLAN templates put the instruction and the OPTIONS block last, and those are what the answer
  depends on; cutting them would turn a classification prompt into an unanswerable one. It
  also keeps the answer adjacent to the prompt text the model conditions on most. Training
  (flanpipe.data.tokenize) keeps the START; pass keep_end=False to evaluate with the training rule.
- Right padding + per-row lengths (not left padding): a causal LM with absolute or rotary
  positions sees each row's real tokens at positions 0..len-1 exactly as in training, and
  padding after a row's end cannot influence earlier positions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import torch

from flanpipe.core.registry import REFERENCES
from flanpipe.data.hf_tokenizer import Tokenizer
from flanpipe.data.tokenize import as_tokenizer
from flanpipe.eval.metrics import SCORINGS, get_metric, rank_choices

SPLITS = ("validation", "test")


class Scorer(Protocol):
    """Anything that maps right-padded token rows to next-token logits."""

    def logits(self, tokens: torch.LongTensor) -> torch.FloatTensor:
        """tokens [b, s] -> logits [b, s, V]; logits[:, t] predicts tokens[:, t + 1]."""
        ...


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


def truncate_input(ids: Sequence[int], inputs_length: int, keep_end: bool = True) -> list[int]:
    """Cut ids to inputs_length, keeping the end by default (see module docstring for why)."""
    if len(ids) <= inputs_length:
        return list(ids)
    return list(ids[len(ids) - inputs_length :]) if keep_end else list(ids[:inputs_length])


def encode_target(ids: Sequence[int], targets_length: int, eos_id: int) -> list[int]:
    """Target ids as trained: first targets_length-1 ids, then EOS (so len <= targets_length)."""
    return [*ids[: targets_length - 1], eos_id]


@torch.inference_mode()
def option_logprobs(
    scorer: Scorer,
    input_ids: Sequence[Sequence[int]],
    options_ids: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
) -> list[list[float]]:
    """log p(option | input) for every example and option, summed over the option's tokens.

    All (example, option) pairs are flattened, sorted by length (longest first, so an
    out-of-memory shows up on the first batch) and right-padded per batch. For a pair with
    input length L and total length T, option token t in [L, T) is predicted by the logits
    at t - 1, so
        score = sum_{j=0}^{T-L-1} log_softmax(logits[L - 1 + j])[tokens[L + j]]
    The option positions are gathered first ([b, s, V] -> [b, J, V], J = longest option),
    so log_softmax runs on J positions per row instead of s: with s = 1024 + 256 and
    J <= 256 that is 5x less memory than normalizing every input position.
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
    scores = torch.empty(len(pairs), dtype=torch.float64)
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
        tok_logp = logp.gather(-1, tokens.gather(1, pos + 1)[..., None]).squeeze(-1)  # [b, J]
        scores[idx] = torch.where(valid, tok_logp, torch.zeros_like(tok_logp)).sum(-1).double().cpu()
    out: list[list[float]] = [[] for _ in input_ids]
    for (ex, _, _), s in zip(pairs, scores.tolist(), strict=True):
        out[ex].append(s)
    return out


@torch.inference_mode()
def option_logprobs_packed(
    scorer: Any,
    input_ids: Sequence[Sequence[int]],
    options_ids: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
) -> list[list[float]]:
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
    out: list[list[float]] = [[] for _ in input_ids]
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
        logits = scorer.masked_logits(tokens, pos, (~allowed).unsqueeze(1))
        row_i, first, n_opt = (torch.tensor(c) for c in zip(*picks, strict=True))
        n_in = torch.tensor([len(input_ids[ex]) for ex in idx])[row_i]
        j = torch.arange(int(n_opt.max()))[None, :]
        valid = j < n_opt[:, None]  # [P, J]
        at = (first[:, None] + j).clamp(max=width - 1)  # option token j's column
        pred = torch.where(j == 0, n_in[:, None] - 1, at - 1)  # the column whose logits predict it
        picked = logits[row_i[:, None], pred]  # [P, J, V]
        logp = torch.log_softmax(_float_logits(picked), dim=-1)
        tok_logp = logp.gather(-1, tokens[row_i[:, None], at].to(logp.device)[..., None]).squeeze(-1)
        scores = torch.where(valid, tok_logp, torch.zeros_like(tok_logp)).sum(-1).double().tolist()
        for (r, _, _), score in zip(picks, scores, strict=True):
            out[idx[r]].append(score)
    return out


def rank_classification(
    scorer: Scorer,
    input_ids: Sequence[Sequence[int]],
    options_ids: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
) -> list[int]:
    """Index of the most likely option per example (ties go to the earliest option)."""
    return [max(range(len(s)), key=s.__getitem__) for s in option_scores(scorer, input_ids, options_ids, batch_size)]


def option_scores(
    scorer: Scorer,
    input_ids: Sequence[Sequence[int]],
    options_ids: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
) -> list[list[float]]:
    """Summed log p(option | input) per example and option, by the scorer's fastest way.

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
        scores = option_logprobs_packed(scorer, input_ids, options_ids, batch_size)
    elif _uses_kv_cache(scorer) and getattr(scorer, "share_prefix", False):
        from flanpipe.eval.inference import option_logprobs_shared

        scores = option_logprobs_shared(scorer, input_ids, options_ids, batch_size)
    else:
        scores = option_logprobs(scorer, input_ids, options_ids, batch_size)
    return scores


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


def predict_shard(
    scorer: Scorer,
    sp: Tokenizer,
    shard: pl.DataFrame,
    inputs_length: int,
    targets_length: int,
    batch_size: int = 32,
    keep_end: bool = True,
) -> pl.DataFrame:
    """Add a `prediction` column: the chosen option text, or the greedy decode.

    Rows with a non-empty `options` list are rank-classified: `prediction` by summed log-prob (FLAN's rule),
    `prediction_<rule>` by each rule of metrics.SCORINGS (a generated row's are its decode). The others are generated
    (up to targets_length tokens, the trained target budget including EOS). Turned-around
    templates are dropped: they invert the task, so they are not evaluations of it.
    """
    sp = as_tokenizer(sp)
    eos = sp.eos_id
    df = shard.filter(~pl.col("turned_around")).with_row_index("_row")
    is_cls = pl.col("options").list.len() > 0
    cls, gen = df.filter(is_cls), df.filter(~is_cls)
    parts: list[pl.DataFrame] = []
    if cls.height:
        inputs = [truncate_input(ids, inputs_length, keep_end) for ids in sp.encode_batch(cls["inputs"].to_list())]
        flat = cls.select("_row", "options").explode("options")
        flat_ids = [
            encode_target(ids, targets_length, eos)
            for ids in sp.encode_batch(flat["options"].to_list(), add_special=False)
        ]
        options_ids = (
            flat.with_columns(_ids=pl.Series(flat_ids, dtype=pl.List(pl.Int64)))
            .group_by("_row", maintain_order=True)
            .agg("_ids")["_ids"]
            .to_list()
        )
        scores = option_scores(scorer, inputs, options_ids, batch_size)
        chars = cls["options"].list.eval(pl.element().str.len_chars()).to_list()
        choices = rank_choices(scores, chars, [[len(ids) for ids in opts] for opts in options_ids])
        picked = {f"prediction_{k}": pl.col("options").list.get(pl.Series(v)) for k, v in choices.items()}
        parts.append(cls.with_columns(prediction=picked["prediction_sum"], **picked))
    if gen.height:
        inputs = [truncate_input(ids, inputs_length, keep_end) for ids in sp.encode_batch(gen["inputs"].to_list())]
        if _uses_kv_cache(scorer):
            from flanpipe.eval.inference import greedy_generate_cached

            new = greedy_generate_cached(scorer, inputs, targets_length, eos, batch_size)
        else:
            new = greedy_generate(scorer, inputs, targets_length, eos, batch_size)
        decoded = gen.with_columns(prediction=pl.Series(sp.decode_batch(new), dtype=pl.Utf8))
        parts.append(decoded.with_columns(pl.col("prediction").alias(f"prediction_{k}") for k in SCORINGS))
    if not parts:
        empty = pl.lit(None, dtype=pl.Utf8)
        return df.drop("_row").with_columns(prediction=empty, **{f"prediction_{k}": empty for k in SCORINGS})
    return pl.concat(parts).sort("_row").drop("_row")


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
    keep_end: bool = True,
) -> pl.DataFrame:
    """predict_shard with the rows dealt round-robin over the data-parallel replicas and the predictions
    gathered on every rank, in the shard's order. Each row is scored alone (right padding, causal
    model), so the predictions do not depend on the DP size."""
    rank, size, group = _data_parallel(scorer)
    if size == 1:
        return predict_shard(scorer, sp, shard, inputs_length, targets_length, batch_size, keep_end)
    import torch.distributed as dist

    kept = shard.filter(~pl.col("turned_around")).with_row_index("_dp_row")
    if kept.height < size:
        raise ValueError(f"{kept.height} examples cannot be shared by {size} data-parallel ranks")
    mine = kept.filter(pl.col("_dp_row") % size == rank)
    local = predict_shard(scorer, sp, mine, inputs_length, targets_length, batch_size, keep_end)
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


def evaluate_shard(
    scorer: Scorer,
    sp: Tokenizer,
    shard: pl.DataFrame,
    metric: str,
    inputs_length: int,
    targets_length: int,
    batch_size: int = 32,
    keep_end: bool = True,
    predictions_out: Path | None = None,
    scoring: str = "sum",
) -> dict:
    """Zero-shot result for one dataset's eval shard (schema: see ARCH.md, Evaluation); with
    ``predictions_out``, every row's prediction is written there (Parquet) too.

    ``scoring`` (config eval.scoring, a rule of metrics.SCORINGS) picks the rank-classification rule behind
    the headline; an option task's record also holds every rule's summary under ``scorings``."""
    names = shard.select("dataset", "cluster").unique()
    if names.height != 1:
        raise ValueError(f"eval shard must hold exactly one dataset, got {names.rows()}")
    dataset, cluster = names.row(0)
    get_metric(metric)  # fail before spending model time on an unknown metric
    if scoring not in SCORINGS:
        raise ValueError(f"unknown rank-classification scoring {scoring!r}; choose one of {SCORINGS}")
    t0 = time.perf_counter()
    preds = predict_shard_data_parallel(scorer, sp, shard, inputs_length, targets_length, batch_size, keep_end)
    seconds = time.perf_counter() - t0
    preds = preds.with_columns(prediction=pl.col(f"prediction_{scoring}"))
    if predictions_out is not None:
        kept = ["split", "example_id", "template_id", "targets", *([REFERENCES] if REFERENCES in preds.columns else [])]
        preds.select(*kept, "prediction").write_parquet(predictions_out)
    per_template = score_templates(preds, metric)
    has_options = bool(preds.height) and bool((preds["options"].list.len() > 0).any())
    scorings = {
        k: summarize(score_templates(preds.with_columns(prediction=pl.col(f"prediction_{k}")), metric))
        for k in (SCORINGS if has_options else ())
    }
    return {
        "dataset": dataset,
        "cluster": cluster,
        "metric": metric,
        "scoring": scoring,
        "scorings": scorings,  # every rank-classification rule's summary (option tasks only)
        "chance": chance_score(preds) if has_options else None,
        "n_templates": per_template.height,
        "per_template": per_template.to_dicts(),
        **summarize(per_template),
        "examples_per_s": preds.height / seconds if seconds > 0 else None,
        "per_example": per_example_scores(preds, metric),  # flanpipe.report.stats: intervals, paired tests
    }


def evaluate_many(
    model_dir: Path,
    tokenizer: Path,
    shards: Mapping[str, Path],
    metrics: Mapping[str, str],
    out_dir: Path,
    *,
    lengths: dict[str, int],
    batch_size: int = 32,
    scorer: Scorer | None = None,
    tp: int = 1,
    pp: int = 1,
    scoring: str = "sum",
) -> dict[str, dict]:
    """Rule ``evaluate``: load a trained model once, score several datasets' eval shards with it, write
    ``out_dir/{dataset}.json`` per dataset (the same record run_evaluation writes) and its predictions
    (``{dataset}.predictions.parquet``), and return the records.

    Under torchrun/srun (flanpipe.train.launch, ``main``) every rank calls this: the model loads at TP x PP,
    the world's remaining factor is data parallel, and global rank 0 alone writes.

    Every metric and shard is checked before the model loads, so a typo fails in seconds, not after a
    load. ``scorer`` replaces the load (tests, benches). Inputs are truncated like training inputs (keep
    the start, as seqio does) so the model is scored on the view of an example it was trained on.
    """
    from flanpipe.core.io import write_json
    from flanpipe.data.tokenize import open_tokenizer

    if set(shards) != set(metrics):
        raise ValueError(f"datasets with a shard {sorted(shards)} differ from datasets with a metric {sorted(metrics)}")
    for dataset, metric in metrics.items():
        get_metric(metric)
        if not Path(shards[dataset]).exists():
            raise FileNotFoundError(f"eval shard of {dataset} not found: {shards[dataset]}")
    if scorer is None:
        from flanpipe.eval.inference import load_parallel_lm

        scorer = load_parallel_lm(model_dir, tp, pp)
    writer = getattr(scorer, "global_rank", 0) == 0
    sp = open_tokenizer(tokenizer)
    out_dir = Path(out_dir)
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for dataset in sorted(shards):
        df = pl.read_parquet(shards[dataset])
        result = evaluate_shard(
            scorer,
            sp,
            df,
            metrics[dataset],
            lengths["inputs"],
            lengths["targets"],
            batch_size=batch_size,
            keep_end=False,
            predictions_out=out_dir / f"{dataset}.predictions.parquet" if writer else None,
            scoring=scoring,
        )
        if result["dataset"] != dataset:
            raise ValueError(f"shard {shards[dataset]} holds {result['dataset']}, expected {dataset}")
        result["model"] = str(model_dir)
        if writer:
            write_json(out_dir / f"{dataset}.json", result)
        results[dataset] = result
    return results


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
    scoring: str = "sum",
) -> list[str]:
    """``main``'s arguments for one evaluate_many call (what the rule hands to flanpipe.train.launch)."""
    argv = ["--model", str(model_dir), "--tokenizer", str(tokenizer), "--out-dir", str(out_dir)]
    argv += ["--inputs-length", str(lengths["inputs"]), "--targets-length", str(lengths["targets"])]
    argv += ["--batch-size", str(batch_size), "--tp", str(tp), "--pp", str(pp), "--scoring", scoring]
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
        scoring=a.scoring,
    )
    return 0


# dist_checkpointing's spawn-mode machinery re-imports __main__: keep the entry point guarded.
if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))


def run_evaluation(
    model_dir: Path,
    tokenizer: Path,
    shard: Path,
    out: Path,
    *,
    metric: str,
    lengths: dict[str, int],
    batch_size: int = 32,
    scoring: str = "sum",
) -> dict:
    """``flanpipe evaluate``: one dataset's eval shard, its result written to ``out``."""
    from flanpipe.core.io import write_json
    from flanpipe.data.tokenize import open_tokenizer
    from flanpipe.eval.inference import load_parallel_lm

    get_metric(metric)
    scorer = load_parallel_lm(model_dir)
    sp = open_tokenizer(tokenizer)
    df = pl.read_parquet(shard)
    result = evaluate_shard(
        scorer,
        sp,
        df,
        metric,
        lengths["inputs"],
        lengths["targets"],
        batch_size=batch_size,
        keep_end=False,
        scoring=scoring,
    )
    result["model"] = str(model_dir)
    write_json(out, result)
    return result
