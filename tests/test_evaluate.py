"""Zero-shot evaluation against brute-force references on a tiny plain-PyTorch causal LM.

The batched code pads, sorts and masks; the references score one unpadded row at a time with
explicit Python loops, so any off-by-one in the shift, the mask or the per-row last position
shows up as a mismatch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import polars as pl
import pytest
import sentencepiece as spm
import torch
from torch import nn
from torch.nn import functional as F

from flanpipe.data.patterns import SHARD_SCHEMA
from flanpipe.eval.evaluate import (
    RankConfig,
    encode_target,
    evaluate_shard,
    greedy_generate,
    option_logprobs,
    predict_shard,
    rank_classification,
    score_templates,
    summarize,
    truncate_input,
)
from flanpipe.eval.metrics import METRICS

VOCAB = 64


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A 2-layer GPT with learned positions; default (large) init so logits are far from ties."""

    def __init__(self, vocab: int, d: int = 32, layers: int = 2, heads: int = 4, max_len: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_lm(vocab: int = VOCAB, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(vocab).eval()


@torch.inference_mode()
def brute_option_logprob(lm: TinyLM, inp: list[int], opt: list[int]) -> float:
    """log p(opt | inp), one unpadded row, one token at a time."""
    seq = inp + opt
    logp = torch.log_softmax(lm.logits(torch.tensor([seq]))[0].float(), dim=-1)
    return sum(float(logp[t - 1, seq[t]]) for t in range(len(inp), len(seq)))


@torch.inference_mode()
def brute_greedy(lm: TinyLM, inp: list[int], max_new: int, eos: int) -> list[int]:
    """Greedy decoding of one unpadded row, re-running the whole prefix every step."""
    seq, new = list(inp), []
    for _ in range(max_new):
        nxt = int(lm.logits(torch.tensor([seq]))[0, -1].argmax())
        if nxt == eos:
            break
        seq.append(nxt)
        new.append(nxt)
    return new


def random_ids(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]


def test_option_logprobs_match_brute_force() -> None:
    lm, rng = make_lm(), random.Random(1)
    inputs = [random_ids(rng, 1, 12) for _ in range(9)]
    options = [[random_ids(rng, 1, 5) for _ in range(rng.randint(2, 4))] for _ in inputs]
    # batch_size 4 over ~27 pairs: several batches, each with ragged rows and padding
    got = option_logprobs(lm, inputs, options, batch_size=4)
    for inp, opts, scores, lasts in zip(inputs, options, got.total, got.last, strict=True):
        want = [brute_option_logprob(lm, inp, opt) for opt in opts]
        assert scores == pytest.approx(want, abs=1e-5)
        # the last token's own log-prob: the whole option's minus the option without its last token's
        want_last = [w - brute_option_logprob(lm, inp, opt[:-1]) for w, opt in zip(want, opts, strict=True)]
        assert lasts == pytest.approx(want_last, abs=1e-5)
    best = rank_classification(lm, inputs, options, batch_size=4)
    want_best = [
        max(range(len(opts)), key=lambda j, i=i, o=opts: brute_option_logprob(lm, inputs[i], o[j]))
        for i, opts in enumerate(options)
    ]
    assert best == want_best
    assert len(set(best)) > 1  # the check is not vacuous: different options win


def test_rank_classification_batch_size_invariant() -> None:
    lm, rng = make_lm(), random.Random(2)
    inputs = [random_ids(rng, 1, 10) for _ in range(7)]
    options = [[random_ids(rng, 1, 4) for _ in range(3)] for _ in inputs]
    one = option_logprobs(lm, inputs, options, batch_size=1)
    many = option_logprobs(lm, inputs, options, batch_size=64)
    for a, b in zip(one.total + one.last, many.total + many.last, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_rank_classification_rejects_empty_input_or_option() -> None:
    lm = make_lm()
    with pytest.raises(ValueError, match="non-empty input"):
        rank_classification(lm, [[]], [[[5]]], batch_size=2)
    with pytest.raises(ValueError, match="at least one token"):
        rank_classification(lm, [[4]], [[[5], []]], batch_size=2)


def test_greedy_generate_matches_brute_force_and_stops_at_eos() -> None:
    lm, rng = make_lm(), random.Random(3)
    inputs = [random_ids(rng, 1, 12) for _ in range(10)]
    max_new = 6
    # Pick as EOS a token the model actually emits mid-continuation for some rows, so that
    # some rows stop early while others run to max_new: first decode with an unused EOS id.
    free = greedy_generate(lm, inputs, max_new, eos_id=-1, batch_size=3)
    assert all(len(g) == max_new for g in free)
    eos = free[0][2]
    got = greedy_generate(lm, inputs, max_new, eos_id=eos, batch_size=3)
    want = [brute_greedy(lm, inp, max_new, eos) for inp in inputs]
    assert got == want
    assert any(len(g) < max_new for g in got) and any(len(g) == max_new for g in got)
    assert all(eos not in g for g in got)


def test_truncation_and_target_encoding() -> None:
    assert truncate_input([1, 2, 3, 4, 5], 3) == [1, 2, 3]  # the training rule: keep the start (and its BOS)
    assert truncate_input([1, 2], 3) == [1, 2]
    # targets_length 3 -> at most 2 text ids + EOS, as in training
    assert encode_target([7, 8, 9, 10], 3, eos_id=1) == [7, 8, 1]
    assert encode_target([], 3, eos_id=1) == [1]


def test_best_dev_template_uses_validation_only() -> None:
    # template 0: best on validation (90) but worst on test (10)
    # template 1: worst on validation (50) but best on test (95)
    # template 2: ties template 0 on validation (90) -> the lower id (0) wins the tie
    per_template = pl.DataFrame(
        {
            "template_id": [0, 1, 2],
            "validation": [90.0, 50.0, 90.0],
            "test": [10.0, 95.0, 30.0],
            "n_validation": [4, 4, 4],
            "n_test": [4, 4, 4],
        }
    )
    out = summarize(per_template)
    assert out["best_dev_template"] == 0
    assert out["best_dev_test"] == 10.0
    # mean = (10 + 95 + 30) / 3 = 45; population std = sqrt(((-35)^2 + 50^2 + (-15)^2) / 3)
    assert out["mean"] == pytest.approx(45.0)
    assert out["std"] == pytest.approx(((35**2 + 50**2 + 15**2) / 3) ** 0.5)
    assert out["median"] == pytest.approx(30.0)  # T0's other summary over prompts: median of 10, 30, 95
    # changing only test scores never changes the chosen template
    shuffled = per_template.with_columns(test=pl.Series([0.0, 100.0, 100.0]))
    assert summarize(shuffled)["best_dev_template"] == 0
    # no validation scores at all -> no best template (never fall back to test)
    no_dev = per_template.with_columns(validation=pl.lit(None, dtype=pl.Float64))
    assert summarize(no_dev)["best_dev_template"] is None
    assert summarize(no_dev)["best_dev_test"] is None


# ---------------------------------------------------------------- end to end with SentencePiece

WORDS = {
    "subj": ["the film", "this movie", "the actor", "my friend", "the story", "a critic", "the plot"],
    "verb": ["was", "seemed", "felt", "became", "looked"],
    "adj": ["great", "terrible", "boring", "wonderful", "awful", "fun", "slow", "bright"],
    "tail": ["today", "again", "overall", "at the end", "to me", "in the cinema"],
}


@pytest.fixture(scope="module")
def sp(tmp_path_factory: pytest.TempPathFactory) -> spm.SentencePieceProcessor:
    """A tiny BPE model with the project's special ids, trained on ~400 generated sentences."""
    rng = random.Random(0)
    sentences = [
        f"{rng.choice(WORDS['subj'])} {rng.choice(WORDS['verb'])} {rng.choice(WORDS['adj'])} "
        f"{rng.choice(WORDS['tail'])}. OPTIONS: positive, negative. Answer: yes or no."
        for _ in range(400)
    ]
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(prefix),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def make_shard(rows: list[dict]) -> pl.DataFrame:
    """Eval shard with the ARCH.md schema and dtypes."""
    return pl.DataFrame(rows, schema=SHARD_SCHEMA)


def sentiment_rows(n: int, templates: int, options: list[str] | None, turned: bool = False) -> list[dict]:
    """Validation + test rows for every (example, template).

    options None -> generative rows (empty options, target = the review); [] -> per-example
    options: 2-4 adjectives sampled per example, like a dataset with an options_field, so the
    winning option text varies between examples; otherwise that fixed options list.
    """
    rng = random.Random(4)
    rows = []
    for split in ("validation", "test"):
        for ex in range(n):
            review = f"{rng.choice(WORDS['subj'])} was {rng.choice(WORDS['adj'])} {rng.choice(WORDS['tail'])}."
            if options is None:
                opts = []
            else:
                opts = options or rng.sample(WORDS["adj"], rng.randint(2, 4))
            for t in range(templates):
                prompt = ["Review: ", "What is the sentiment? "][t % 2] + review
                if opts:
                    prompt += "\nOPTIONS:\n" + "\n".join(f"- {o}" for o in opts)
                rows.append(
                    {
                        "dataset": "toy_sentiment",
                        "cluster": "sentiment",
                        "split": split,
                        "example_id": ex,
                        "template_id": t,
                        "turned_around": False,
                        "inputs": prompt,
                        "targets": rng.choice(opts) if opts else review,
                        "options": opts,
                    }
                )
    if turned:  # turned-around rows must be ignored by evaluation
        rows.append({**rows[0], "template_id": 9, "turned_around": True})
    return rows


def test_evaluate_shard_classification_end_to_end(sp: spm.SentencePieceProcessor) -> None:
    lm = make_lm(sp.vocab_size())
    shard = make_shard(sentiment_rows(n=6, templates=2, options=[], turned=True))
    inputs_length, targets_length = 20, 4  # 20 < every prompt's length: truncation is exercised
    result = evaluate_shard(lm, sp, shard, "accuracy", inputs_length, targets_length, batch_size=4)

    # brute force: same encoding rules, one (example, option) at a time
    kept = shard.filter(~pl.col("turned_around"))
    preds = []
    for text, options in kept.select("inputs", "options").iter_rows():
        inp = sp.encode(text)[:inputs_length]  # the start kept, as in training
        assert len(inp) == inputs_length
        opt_ids = [[*ids, sp.eos_id()] for ids in sp.encode(options)]  # whole options + EOS
        scores = [brute_option_logprob(lm, inp, o) for o in opt_ids]
        preds.append(options[max(range(len(options)), key=scores.__getitem__)])
    assert len(set(preds)) > 1  # different options win, so a row mix-up would show
    kept = kept.with_columns(prediction=pl.Series(preds))
    assert predict_shard(lm, sp, shard, inputs_length, targets_length, 4)["prediction"].to_list() == preds

    assert result["dataset"] == "toy_sentiment" and result["cluster"] == "sentiment"
    assert result["metric"] == "accuracy" and result["n_templates"] == 2
    for row in result["per_template"]:
        for split in ("validation", "test"):
            part = kept.filter((pl.col("template_id") == row["template_id"]) & (pl.col("split") == split))
            assert row[f"n_{split}"] == part.height == 6
            want = METRICS["accuracy"](part["prediction"].to_list(), part["targets"].to_list())
            assert row[split] == pytest.approx(want)
    tests = [r["test"] for r in result["per_template"]]
    assert result["mean"] == pytest.approx(sum(tests) / 2)
    assert result["examples_per_s"] > 0

    # per-example scores: 100 where the chosen option is the target, keyed by (split, template, example)
    per = pl.DataFrame(result["per_example"])
    assert per.height == kept.height == 2 * 2 * 6
    want = kept.select("split", "template_id", "example_id", score=(pl.col("prediction") == pl.col("targets")) * 100.0)
    joined = per.join(want, on=["split", "template_id", "example_id"], suffix="_want")
    assert joined.height == per.height and joined["score"].to_list() == joined["score_want"].to_list()
    means = per.group_by("template_id", "split").agg(pl.col("score").mean())
    for row in result["per_template"]:
        for split in ("validation", "test"):
            m = means.filter((pl.col("template_id") == row["template_id"]) & (pl.col("split") == split))["score"]
            assert m.item() == pytest.approx(row[split])


def test_evaluate_shard_generation_end_to_end(sp: spm.SentencePieceProcessor) -> None:
    lm = make_lm(sp.vocab_size(), seed=5)
    shard = make_shard(sentiment_rows(n=3, templates=2, options=None))
    inputs_length, targets_length = 12, 5
    result = evaluate_shard(lm, sp, shard, "rouge", inputs_length, targets_length, batch_size=4)

    want = [
        sp.decode(brute_greedy(lm, sp.encode(t)[:inputs_length], targets_length, sp.eos_id()))
        for t in shard["inputs"].to_list()
    ]
    got = predict_shard(lm, sp, shard, inputs_length, targets_length, 4)["prediction"].to_list()
    assert got == want
    per = score_templates(shard.with_columns(prediction=pl.Series(want)), "rouge")
    assert result["per_template"] == per.to_dicts()
    assert [r["n_test"] for r in result["per_template"]] == [3, 3]
    # ROUGE is a mean over examples: the per-example scores average back to each template's score
    ex = pl.DataFrame(result["per_example"]).group_by("template_id", "split").agg(pl.col("score").mean())
    for row in result["per_template"]:
        m = ex.filter((pl.col("template_id") == row["template_id"]) & (pl.col("split") == "test"))["score"]
        assert m.item() == pytest.approx(row["test"])


class ConstantScorer:
    """Same next-token distribution at every position: prefers the tokens of one option."""

    def __init__(self, vocab: int, favoured: list[int]) -> None:
        self.bias = torch.zeros(vocab)
        self.bias[favoured] = 10.0

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*tokens.shape, -1)


def test_evaluate_shard_picks_best_template_on_validation_not_test(sp: spm.SentencePieceProcessor) -> None:
    # The scorer always answers "yes". Targets are set so that
    #   template 0: validation all "yes" (100), test all "no" (0)
    #   template 1: validation all "no"  (0),   test all "yes" (100)
    # best_dev_template must be 0 (validation argmax) with best_dev_test 0, although template 1
    # has the best test score. mean over templates (test) = (0 + 100) / 2 = 50.
    yes, no = sp.encode("yes"), sp.encode("no")
    scorer = ConstantScorer(sp.vocab_size(), [i for i in yes if i not in no])
    rows = []
    for split in ("validation", "test"):
        for t in (0, 1):
            for ex in range(3):
                answer = "yes" if (split == "validation") == (t == 0) else "no"
                rows.append(
                    {
                        "dataset": "toy_yesno",
                        "cluster": "nli",
                        "split": split,
                        "example_id": ex,
                        "template_id": t,
                        "turned_around": False,
                        "inputs": f"question {ex} in template {t}?",
                        "targets": answer,
                        "options": ["no", "yes"],
                    }
                )
    result = evaluate_shard(scorer, sp, make_shard(rows), "accuracy", 32, 4)
    per = {r["template_id"]: (r["validation"], r["test"]) for r in result["per_template"]}
    assert per == {0: (100.0, 0.0), 1: (0.0, 100.0)}
    assert result["best_dev_template"] == 0
    assert result["best_dev_test"] == 0.0
    assert result["mean"] == pytest.approx(50.0)
    assert result["std"] == pytest.approx(50.0)


def test_evaluate_shard_rejects_mixed_datasets(sp: spm.SentencePieceProcessor) -> None:
    rows = sentiment_rows(n=1, templates=1, options=["a", "b"])
    rows[0] = {**rows[0], "dataset": "other"}
    with pytest.raises(ValueError, match="exactly one dataset"):
        evaluate_shard(make_lm(sp.vocab_size()), sp, make_shard(rows), "accuracy", 16, 4)


def test_shard_path_smoke(tmp_path: Path, sp: spm.SentencePieceProcessor) -> None:
    """An eval shard round-tripped through parquet (as the workflow reads it) evaluates the same."""
    shard = make_shard(sentiment_rows(n=2, templates=1, options=["positive", "negative"]))
    path = tmp_path / "eval.parquet"
    shard.write_parquet(path)
    lm = make_lm(sp.vocab_size())
    a = evaluate_shard(lm, sp, shard, "accuracy", 24, 4)
    b = evaluate_shard(lm, sp, pl.read_parquet(path), "accuracy", 24, 4)
    assert a["per_template"] == b["per_template"]
    assert json.loads(json.dumps(b))["per_template"] == b["per_template"]  # plain JSON types


# ---------------------------------------------------------------- one model load, many datasets


def test_evaluate_many_writes_one_result_per_dataset_equal_to_single_runs(
    tmp_path: Path, sp: spm.SentencePieceProcessor
) -> None:
    """One scorer serves two datasets; each file equals evaluate_shard on that dataset alone."""
    from flanpipe.eval.evaluate import evaluate_many

    sp_path = tmp_path / "spm.model"
    sp_path.write_bytes(sp.serialized_model_proto())
    cls = make_shard(sentiment_rows(n=3, templates=2, options=[]))
    gen = make_shard(sentiment_rows(n=2, templates=1, options=None)).with_columns(dataset=pl.lit("toy_gen"))
    shards = {"toy_sentiment": tmp_path / "a.parquet", "toy_gen": tmp_path / "b.parquet"}
    cls.write_parquet(shards["toy_sentiment"])
    gen.write_parquet(shards["toy_gen"])
    metrics = {"toy_sentiment": "accuracy", "toy_gen": "rouge"}
    lm = make_lm(sp.vocab_size())
    lengths = {"inputs": 24, "targets": 4}
    out = evaluate_many(Path("m"), sp_path, shards, metrics, tmp_path / "out", lengths=lengths, batch_size=4, scorer=lm)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "toy_gen.json",
        "toy_gen.predictions.parquet",
        "toy_sentiment.json",
        "toy_sentiment.predictions.parquet",
    ]
    preds = pl.read_parquet(tmp_path / "out" / "toy_sentiment.predictions.parquet")
    assert preds.height == cls.height and set(preds["prediction"]) <= set(cls["options"].explode())
    for name, shard in (("toy_sentiment", cls), ("toy_gen", gen)):
        alone = evaluate_shard(lm, sp, shard, metrics[name], 24, 4, batch_size=4)
        written = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert written["per_template"] == alone["per_template"] == out[name]["per_template"]
        assert written["model"] == "m" and written["dataset"] == name

    # a wrong metric or a missing shard fails before any scoring (the scorer is never called)
    class Exploding:
        def logits(self, tokens):  # noqa: ANN001, ANN202
            raise AssertionError("scored before checking its inputs")

    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_many(Path("m"), sp_path, shards, {**metrics, "toy_gen": "bleurt"}, tmp_path / "x", lengths=lengths,
                      scorer=Exploding())  # fmt: skip
    with pytest.raises(FileNotFoundError, match="toy_gen"):
        evaluate_many(Path("m"), sp_path, {**shards, "toy_gen": tmp_path / "nope.parquet"}, metrics, tmp_path / "x",
                      lengths=lengths, scorer=Exploding())  # fmt: skip


def test_eval_groups_one_job_per_model_variant_cluster() -> None:
    from flanpipe.plan.eval_plan import eval_groups, group_datasets
    from flanpipe.plan.runs import Evaluation

    cluster_of = {"a1": "A", "a2": "A", "b1": "B"}
    evals = [Evaluation("run", "natural", d) for d in ("a2", "a1", "b1")] + [
        Evaluation("run", "natural-noopts", "a1"),
        Evaluation("base", "natural", "a1"),
        Evaluation("run", "natural", "a2"),  # planned twice (main + ablation): once in the group
    ]
    groups = eval_groups(evals, cluster_of)
    assert groups == {
        ("base", "natural", "A"): ["a1"],
        ("run", "natural", "A"): ["a1", "a2"],
        ("run", "natural", "B"): ["b1"],
        ("run", "natural-noopts", "A"): ["a1"],
    }
    assert group_datasets(groups, "run", "natural", "A") == ["a1", "a2"]
    with pytest.raises(ValueError, match="no planned evaluation of run under natural-2shot on cluster A"):
        group_datasets(groups, "run", "natural-2shot", "A")
    # a result asked for by hand: the cluster's evaluable datasets, in one job
    assert group_datasets(groups, "base", "natural", "B", unplanned=["b2", "b1"]) == ["b1", "b2"]


def test_length_normalised_scorings_by_brute_force(sp: spm.SentencePieceProcessor) -> None:
    """Each scoring rule picks the option a one-at-a-time brute force picks (summed log-prob of the option's text
    and EOS, divided by nothing, by the option's characters with or without the EOS's log-prob, or by its scored
    tokens); the selected rule drives the headline, all are recorded."""
    lm = make_lm(sp.vocab_size())
    options = ["no", "wonderful", "a b c d e", "bad bad bad bad", "x"]  # characters per token differ a lot
    shard = make_shard(sentiment_rows(n=6, templates=2, options=options))
    inputs_length, targets_length = 20, 6
    kept = shard.filter(~pl.col("turned_around"))
    want: dict[str, list[str]] = {"sum": [], "acc_norm": [], "per_char_eos": [], "per_token": []}
    for text, options in kept.select("inputs", "options").iter_rows():
        inp = sp.encode(text)[:inputs_length]
        opt_ids = [[*ids, sp.eos_id()] for ids in sp.encode(options)]
        total = [brute_option_logprob(lm, inp, o) for o in opt_ids]
        own = [brute_option_logprob(lm, inp, o[:-1]) for o in opt_ids]  # the text alone, no EOS
        rules = {
            "sum": total,
            "acc_norm": [x / len(o) for x, o in zip(own, options, strict=True)],
            "per_char_eos": [x / len(o) for x, o in zip(total, options, strict=True)],
            "per_token": [x / len(o) for x, o in zip(total, opt_ids, strict=True)],
        }
        for rule, score in rules.items():
            want[rule].append(options[max(range(len(score)), key=score.__getitem__)])
    assert len({tuple(p) for p in want.values()}) == 4  # the rules disagree here, so a mix-up would show
    got = predict_shard(lm, sp, shard, inputs_length, targets_length, 4)
    for rule, preds in want.items():
        assert got[f"prediction_{rule}"].to_list() == preds
    assert got["prediction"].to_list() == want["sum"]

    by_sum = evaluate_shard(lm, sp, shard, "accuracy", inputs_length, targets_length, batch_size=4)
    norm = RankConfig(scoring="acc_norm")
    by_norm = evaluate_shard(lm, sp, shard, "accuracy", inputs_length, targets_length, batch_size=4, rank=norm)
    assert by_sum["scoring"] == "sum" and by_norm["scoring"] == "acc_norm"
    assert by_sum["chance"] == pytest.approx(20.0)  # five options everywhere
    assert by_sum["scorings"] == by_norm["scorings"] and set(by_sum["scorings"]) == set(want)
    for result in (by_sum, by_norm):
        assert result["mean"] == pytest.approx(result["scorings"][result["scoring"]]["mean"])
    with pytest.raises(ValueError, match="unknown eval.scoring 'per_char'"):
        RankConfig(scoring="per_char")
