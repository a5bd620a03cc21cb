"""The eval bench's peer: one multiple-choice task scored by flanpipe and by lm-evaluation-harness.

    flanpipe bench eval --peer

Everything is local, nothing is downloaded: a byte-level BPE tokenizer trained here on the task's text (BOS
first, as Llama's), a random ``LlamaForCausalLM`` saved with ``transformers``, imported with flanpipe's
``import_hf`` (the evaluate rule's model), and BIG-Bench-Hard-style prompts (Boolean expressions, sentence
plausibility, logical deduction with sentence options) written once as a flanpipe eval shard and once as
JSONL behind an lm-eval task YAML (``dataset_path: json`` with local ``data_files``).

Both score in lm-evaluation-harness's convention (flanpipe ``eval.convention: lm_eval``: input + " " + option,
no EOS, split as its ``_encode_pair`` splits it), so the picks under ``acc`` (summed log-prob) and ``acc_norm``
(flanpipe's rule of that name) and each option's log-likelihood are compared one to one, from flanpipe's
per-example record and lm-eval's ``--log_samples``.

Timing is of whole processes, as a user runs them: ``python -m flanpipe.eval.evaluate`` (the evaluate rule's
entry point) and ``python -m lm_eval run --model hf``, each with one thread (OMP/MKL/Rayon/Polars pools of 1),
alternating flanpipe / lm-eval for ``rounds`` rounds after one untimed warm-up of each (file caches, lm-eval's
dataset cache), so machine load from other work hits both alike. Examples/s = examples / process wall time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PEER_PACKAGES = ("lm_eval", "transformers")
TASK = "flanpipe_peer"

_NAMES = ["Joao Moutinho", "Kyle Tucker", "Mookie Betts", "Tyler Herro", "Sam Darnold", "Ryan Tannehill"]
_ACTS = ["caught the screen pass", "hit a three pointer", "was called for icing", "scored a touchdown",
         "hit the back of the net", "threw a touchdown pass", "took a corner kick", "was safe at first"]  # fmt: skip
_BIRDS = ["owl", "robin", "crow", "hawk", "finch", "raven", "quail"]


def missing_peer_packages() -> list[str]:
    """The peer's packages that are not installed (``pip install 'flanpipe[bench]'`` brings them)."""
    return [p for p in PEER_PACKAGES if importlib.util.find_spec(p) is None]


def _boolean(rng: random.Random) -> tuple[str, list[str], int]:
    expr = " ".join(rng.choice(["not True", "True", "False", "not False"]) + f" {rng.choice(['and', 'or'])}"
                    for _ in range(2)) + " " + rng.choice(["True", "False"])  # fmt: skip
    return f"{expr} is", ["False", "True"], int(eval(expr))  # noqa: S307 (True/False/not/and/or only, built here)


def _plausible(rng: random.Random) -> tuple[str, list[str], int]:
    sentence = f"{rng.choice(_NAMES)} {rng.choice(_ACTS)}."
    return f'Is the following sentence plausible? "{sentence}"', ["no", "yes"], rng.randrange(2)


def _deduction(rng: random.Random) -> tuple[str, list[str], int]:
    birds = rng.sample(_BIRDS, 3)
    question = (
        f"On a branch, there are three birds: a {birds[0]}, a {birds[1]}, and a {birds[2]}. The {birds[0]} is to "
        f"the left of the {birds[1]}. The {birds[2]} is the rightmost. Which bird is the leftmost?"
    )
    return question, [f"The {b} is the leftmost." for b in birds], 0


_KINDS = (
    ("Evaluate the result of a random Boolean expression.", _boolean),
    ("Determine whether an artificially constructed sentence relating to sports is plausible or not.", _plausible),
    ("A logical deduction task which requires deducing the order of a sequence of objects.", _deduction),
)


def bbh_style_examples(n: int, seed: int = 0, shots: int = 3) -> list[dict[str, Any]]:
    """``n`` multiple-choice prompts in BIG-Bench-Hard's style and shape: a task description, ``shots`` solved
    exemplars of the same kind (BBH's prompts are 3-shot), then the question; ``options`` (2-3, one to five words
    each) and ``gold`` (index). Boolean expressions carry their true value, the other kinds a random gold: the
    model is random, and agreement between harnesses, not accuracy, is what is measured."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        description, make = _KINDS[i % len(_KINDS)]
        exemplars = [make(rng) for _ in range(shots)]
        question, options, gold = make(rng)
        solved = "".join(f"Q: {q}\nA: {o[g]}\n\n" for q, o, g in exemplars)
        out.append({"inputs": f"{description}\n\n{solved}Q: {question}\nA:", "options": options, "gold": gold})
    return out


def write_tiny_llama(
    out: Path, corpus: list[str], *, layers: int = 4, hidden: int = 256, heads: int = 4, ffn: int = 704,
    vocab: int = 1024, max_positions: int = 512, seed: int = 0,
) -> Path:  # fmt: skip
    """A random LlamaForCausalLM and a byte-level BPE tokenizer trained on ``corpus`` (BOS added to every
    encoding, as Llama's), saved in HF format in ``out``. init std 0.1 keeps option scores far from ties."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")  # fmt: skip
    fast.save_pretrained(out)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(out)
    return out


def write_task(root: Path, examples: list[dict[str, Any]]) -> tuple[Path, Path]:
    """The same examples as a flanpipe eval shard (split test, one template) and as an lm-eval task directory
    (JSONL + YAML); returns (shard path, task directory)."""
    import polars as pl

    from flanpipe.data.patterns import SHARD_SCHEMA

    shard = root / f"{TASK}.parquet"
    pl.DataFrame(
        [
            {"dataset": TASK, "cluster": "bbh", "split": "test", "example_id": i, "template_id": 0,
             "turned_around": False, "inputs": e["inputs"], "targets": e["options"][e["gold"]], "options": e["options"]}
            for i, e in enumerate(examples)
        ],
        schema=SHARD_SCHEMA,
    ).write_parquet(shard)  # fmt: skip
    tasks = root / "lm_eval_tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    data = tasks / "test.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    # doc_to_text / doc_to_choice / doc_to_target name the fields themselves: no Jinja over the prompt text
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: inputs\ndoc_to_choice: options\ndoc_to_target: gold\n"
        'target_delimiter: " "\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
        encoding="utf-8",
    )
    return shard, tasks


def _env(root: Path) -> dict[str, str]:
    """One thread per pool, offline, caches inside the bench's directory."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "POLARS_MAX_THREADS"):
        env[var] = "1"
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(root / "hf_home"))  # fmt: skip
    return env


def _flanpipe_cmd(base: Path, shard: Path, out: Path, inputs_length: int, batch_size: int) -> list[str]:
    from flanpipe.eval.evaluate import RankConfig, eval_argv

    argv = eval_argv(base, base, {TASK: shard}, {TASK: "accuracy"}, out, lengths={"inputs": inputs_length,
                     "targets": 8}, batch_size=batch_size, rank=RankConfig(convention="lm_eval"))  # fmt: skip
    return [sys.executable, "-m", "flanpipe.eval.evaluate", *argv]


def _lm_eval_cmd(hf: Path, tasks: Path, out: Path, batch_size: int) -> list[str]:
    return [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32",
            "--device", "cpu", "--tasks", TASK, "--include_path", str(tasks), "--batch_size", str(batch_size),
            "--output_path", str(out), "--log_samples"]  # fmt: skip


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{cmd[2]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def _lm_eval_samples(out: Path) -> list[dict[str, Any]]:
    """lm-eval's logged samples, by doc_id: each choice's log-likelihood (filtered_resps holds [ll, is_greedy])."""
    files = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no lm-eval samples under {out}")
    rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["doc_id"])


def _lm_eval_results(out: Path) -> dict[str, Any]:
    return json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())


def _lm_eval_accuracy(out: Path) -> dict[str, float]:
    """lm-eval's acc and acc_norm for the task, x100 (its results JSON)."""
    results = _lm_eval_results(out)["results"][TASK]
    return {k: 100 * results[f"{k},none"] for k in ("acc", "acc_norm")}


def _lm_eval_seconds(out: Path) -> float:
    return float(_lm_eval_results(out)["total_evaluation_time_seconds"])


def compare(record: Any, samples: list[dict[str, Any]], examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Pick agreement under acc and acc_norm and the largest log-likelihood difference, example by example.

    lm-eval's picks are recomputed from its logged log-likelihoods with its own rules (argmax of lls, and of
    lls / len(choice)) and checked against the acc / acc_norm it logged."""
    import numpy as np

    same_acc = same_norm = logged = 0
    max_diff = 0.0
    rows = record.sort("example_id").rows(named=True)
    if len(rows) != len(samples) or len(rows) != len(examples):
        raise ValueError(f"{len(rows)} flanpipe rows, {len(samples)} lm-eval samples, {len(examples)} examples")
    for ours, theirs, ex in zip(rows, samples, examples, strict=True):
        lls = np.array([float(r[0]) for r in theirs["filtered_resps"]])
        chars = np.array([len(c) for c in ex["options"]], dtype=float)
        acc_pick, norm_pick = int(np.argmax(lls)), int(np.argmax(lls / chars))
        logged += (float(theirs["acc"]) == float(acc_pick == ex["gold"])) and (
            float(theirs["acc_norm"]) == float(norm_pick == ex["gold"])
        )
        same_acc += ours["chosen_sum"] == acc_pick
        same_norm += ours["chosen_acc_norm"] == norm_pick
        max_diff = max(max_diff, float(np.abs(np.array(ours["logprob"]) - lls).max()))
    n = len(rows)
    return {
        "examples": n,
        "same_pick_acc": same_acc / n,
        "same_pick_acc_norm": same_norm / n,
        "max_abs_logprob_diff": max_diff,
        "lm_eval_picks_match_its_logged_metrics": logged / n,
    }


def bench_eval_peer(
    *, examples: int = 300, rounds: int = 2, batch_size: int = 32, inputs_length: int = 256, seed: int = 0,
    workdir: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Build the model and task, run each harness ``rounds`` times alternately, compare and time them."""
    import polars as pl

    from flanpipe.model.hf_import import import_hf

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench_eval_peer_"))
    try:
        data = bbh_style_examples(examples, seed)
        corpus = [e["inputs"] + " " + o for e in data for o in e["options"]]
        hf = write_tiny_llama(root / "hf", corpus, max_positions=2 * inputs_length, seed=seed)
        import_hf(hf, root / "base")
        shard, tasks = write_task(root, data)
        env = _env(root)
        cmds = {
            "flanpipe": lambda out: _flanpipe_cmd(root / "base", shard, out, inputs_length, batch_size),
            "lm_eval": lambda out: _lm_eval_cmd(hf, tasks, out, batch_size),
        }
        for name, cmd in cmds.items():  # warm-up, untimed: page cache, lm-eval's dataset cache
            _timed(cmd(root / "warmup" / name), env)
        seconds: dict[str, list[float]] = {name: [] for name in cmds}
        load = [Path("/proc/loadavg").read_text().split()[0]]
        for r in range(rounds):
            for name, cmd in cmds.items():
                seconds[name].append(_timed(cmd(root / f"round{r}" / name), env))
            load.append(Path("/proc/loadavg").read_text().split()[0])
        last = root / f"round{rounds - 1}"
        record = pl.read_parquet(last / "flanpipe" / f"{TASK}.predictions.parquet")
        ours = json.loads((last / "flanpipe" / f"{TASK}.json").read_text())
        agreement = compare(record, _lm_eval_samples(last / "lm_eval"), data)
        hf_config = json.loads((hf / "config.json").read_text())
        per_s = {name: [examples / s for s in secs] for name, secs in seconds.items()}
        median = {name: statistics.median(v) for name, v in per_s.items()}
        paired = [b / a for a, b in zip(seconds["flanpipe"], seconds["lm_eval"], strict=True)]  # same round
        return {
            "task": TASK,
            "convention": ours["convention"],
            "model": {k: hf_config[k] for k in ("num_hidden_layers", "hidden_size", "vocab_size")},
            "agreement": agreement,
            "accuracy": {
                "flanpipe": {"acc": ours["scorings"]["sum"]["mean"], "acc_norm": ours["scorings"]["acc_norm"]["mean"]},
                "lm_eval": _lm_eval_accuracy(last / "lm_eval"),
            },
            "seconds": seconds,
            "examples_per_s": per_s,
            "examples_per_s_median": median,
            "ratio_flanpipe_over_lm_eval": median["flanpipe"] / median["lm_eval"],
            "ratio_per_round": paired,
            "ratio_per_round_median": statistics.median(paired),
            # inside the processes: flanpipe's scoring alone; lm-eval's time after its imports (task index,
            # model load, scoring: its results JSON's total_evaluation_time_seconds)
            "flanpipe_scoring_examples_per_s": ours["examples_per_s"],
            "lm_eval_after_imports_s": _lm_eval_seconds(last / "lm_eval"),
            "batch_size": batch_size,
            "threads": 1,
            "loadavg_1min": load,
        }
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)


def main(examples: int, rounds: int, batch_size: int, as_json: bool, workdir: str | None = None) -> None:
    r = bench_eval_peer(examples=examples, rounds=rounds, batch_size=batch_size, workdir=workdir)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    a = r["agreement"]
    print(f"{r['task']}: {a['examples']} examples, convention {r['convention']}, one thread per process")
    print(f"same pick: acc {100 * a['same_pick_acc']:.1f}%, acc_norm {100 * a['same_pick_acc_norm']:.1f}%; "
          f"max |log-prob difference| {a['max_abs_logprob_diff']:.2e}")  # fmt: skip
    for name in ("flanpipe", "lm_eval"):
        runs = ", ".join(f"{x:.1f}" for x in r["examples_per_s"][name])
        print(f"{name:<9} {r['examples_per_s_median'][name]:7.1f} examples/s whole process (rounds: {runs})")
    load = " -> ".join(r["loadavg_1min"])
    rounds = ", ".join(f"{x:.2f}" for x in r["ratio_per_round"])
    print(f"flanpipe / lm_eval = {r['ratio_flanpipe_over_lm_eval']:.2f}x of the medians; per round {rounds} "
          f"(1-min load average {load})")  # fmt: skip
    print(f"inside the processes: flanpipe scores {r['flanpipe_scoring_examples_per_s']:.1f} examples/s; "
          f"lm-eval spends {r['lm_eval_after_imports_s']:.1f} s after its imports (tasks, model, scoring)")  # fmt: skip
