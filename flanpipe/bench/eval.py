"""``flanpipe bench eval``: the embedded default's evaluations before and after, side by side, one run.

Before: one job per (model, variant, dataset), each a fresh process that imports Megatron and loads the
model, scoring without a cache (every option scored with its whole input, generation re-running the
prefix per new token). After: one job per (model, variant, cluster) (flanpipe.plan.eval_plan), the KV cache
(flanpipe.eval.inference) for generation (one token per step); options as ParallelLM scores them by default
(one packed row per example: input + all options under a block mask, evaluate.option_logprobs_packed;
``share_prefix=True`` with packing off, options sharing their input's encoding through the KV cache, is
measured as a third side).

Measured in this process after a warm-up load and forward: model loads (flanpipe.eval.inference.load_parallel_lm)
and scoring; a job's process start and imports are measured once (a fresh ``python -c 'import ...'``)
and counted once per job.
Rank classification scores the default's eval shards as planned; generation greedily decodes
``gen_rows`` rows of each shard of one group with their options removed (the default has no generative
held-out task), up to the configured target length. Both ways must give the same predictions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

from flanpipe.core.io import resolve_config_path
from flanpipe.plan.config import load_config
from flanpipe.plan.eval_plan import eval_groups
from flanpipe.plan.experiments import plan_experiment

IMPORTS = (
    "import flanpipe.eval.evaluate, flanpipe.eval.inference, megatron.core.models.gpt, megatron.core.dist_checkpointing"
)


class _CacheFree:
    """A model seen only through ``logits``: evaluate's cache-free paths (the 'before')."""

    def __init__(self, lm: Any) -> None:
        self.logits = lm.logits


def _import_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], check=True, capture_output=True)
    return time.perf_counter() - t0


def _side(loads: int, load_s: float, score_s: float, examples: int, import_s: float) -> dict[str, Any]:
    """One side's figures: examples/s of scoring alone and of whole jobs (process start + load + scoring)."""
    job_s = loads * import_s + load_s + score_s
    return {
        "model_loads": loads,
        "examples": examples,
        "imports_s": loads * import_s,
        "load_s": load_s,
        "score_s": score_s,
        "job_s": job_s,
        "scoring_examples_per_s": examples / score_s,
        "examples_per_s": examples / job_s,
    }


def bench_eval(workdir: Path, config: Path, *, gen_rows: int = 16, max_groups: int | None = None) -> dict[str, Any]:
    """Before/after figures for ``workdir`` (a directory where ``snakemake`` built the default's models
    and eval shards). Long on purpose: the before and after paths are measured side by side in one
    sequence, so that both see the same machine state."""
    from flanpipe.data.tokenize import open_tokenizer
    from flanpipe.eval.evaluate import predict_shard
    from flanpipe.eval.inference import load_parallel_lm

    cfg = load_config(config)
    plan = plan_experiment(cfg)
    cluster_of = {name: spec.cluster for name, spec in plan.registry.items()}
    groups = list(eval_groups(plan.evaluations, cluster_of).items())[:max_groups]
    workdir = Path(workdir)
    tok = workdir / "results" / "tokenizer" / "spm.model"
    missing = [p for p in [tok] + [workdir / plan.model_dir(run) for (run, _, _), _ in groups] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} missing: build the default first (snakemake --cores 2 in {workdir})")
    sp = open_tokenizer(tok)
    inl, tgl, bs = cfg["lengths"]["inputs"], cfg["lengths"]["targets"], cfg["eval"]["batch_size"]
    import_s = _import_seconds()

    def shard(variant: str, dataset: str) -> pl.DataFrame:
        return pl.read_parquet(workdir / "results" / "shards" / dataset / "eval" / f"{variant}.parquet")

    def timed_load(run: str) -> tuple[Any, float]:
        t0 = time.perf_counter()
        lm = load_parallel_lm(workdir / plan.model_dir(run))
        return lm, time.perf_counter() - t0

    # Warm up (first load's lazy imports, first forwards) outside the timings, both code paths.
    (run0, variant0, _), datasets0 = groups[0]
    warm, _ = timed_load(run0)
    head = shard(variant0, datasets0[0]).head(8)
    for scorer in (warm, _CacheFree(warm)):
        predict_shard(scorer, sp, head, inl, tgl, bs)
        predict_shard(scorer, sp, head.with_columns(options=pl.lit([], dtype=pl.List(pl.Utf8))), inl, 4, bs)

    cls: dict[str, list[float]] = {s: [0, 0.0, 0.0, 0] for s in ("before", "after", "after_shared_prefix")}
    same = True
    for (run, variant, _), datasets in groups:
        lm, load_s = timed_load(run)
        for side in ("after", "after_shared_prefix"):
            cls[side][0] += 1
            cls[side][1] += load_s
        for d in datasets:
            df = shard(variant, d)
            t0 = time.perf_counter()
            after = predict_shard(lm, sp, df, inl, tgl, bs)
            cls["after"][2] += time.perf_counter() - t0
            lm.share_prefix, lm.pack_options = True, False  # the KV-cache prefix path, not the packed rows
            t0 = time.perf_counter()
            shared = predict_shard(lm, sp, df, inl, tgl, bs)
            cls["after_shared_prefix"][2] += time.perf_counter() - t0
            lm.share_prefix, lm.pack_options = False, True
            lm_b, load_b = timed_load(run)  # the per-dataset job loads its own model
            t0 = time.perf_counter()
            before = predict_shard(_CacheFree(lm_b), sp, df, inl, tgl, bs)
            cls["before"][2] += time.perf_counter() - t0
            cls["before"][0] += 1
            cls["before"][1] += load_b
            for side in cls:
                cls[side][3] += after.height
            same &= before["prediction"].to_list() == after["prediction"].to_list() == shared["prediction"].to_list()

    (run, variant, _), datasets = groups[0]
    lm, _ = timed_load(run)
    gen = {"before": [1, 0.0, 0.0, 0], "after": [1, 0.0, 0.0, 0]}
    for d in datasets:
        df = shard(variant, d).filter(~pl.col("turned_around")).head(gen_rows)
        df = df.with_columns(options=pl.lit([], dtype=pl.List(pl.Utf8)))
        for side, scorer in (("after", lm), ("before", _CacheFree(lm))):
            t0 = time.perf_counter()
            out = predict_shard(scorer, sp, df, inl, tgl, bs)
            gen[side][2] += time.perf_counter() - t0
            gen[side][3] += out.height
            if side == "after":
                want = out["prediction"].to_list()
            else:
                same &= out["prediction"].to_list() == want
    result: dict[str, Any] = {"workdir": str(workdir), "import_s_per_job": import_s, "same_predictions": same}
    for name, table in (("rank_classification", cls), ("generation", gen)):
        b, a = (_side(*table[s][:3], int(table[s][3]), import_s) for s in ("before", "after"))
        if name == "generation":  # one model serves both sides: compare scoring alone
            b, a = ({**x, "examples_per_s": x["scoring_examples_per_s"]} for x in (b, a))
        result[name] = {"before": b, "after": a, "ratio": a["examples_per_s"] / b["examples_per_s"]}
        if name == "rank_classification":
            sh = _side(*table["after_shared_prefix"][:3], int(table["after_shared_prefix"][3]), import_s)
            result[name]["after_shared_prefix"] = sh
            result[name]["ratio_shared_prefix"] = sh["examples_per_s"] / b["examples_per_s"]
    return result


def main(workdir: str, config: str, gen_rows: int, max_groups: int | None, as_json: bool) -> None:
    result = bench_eval(Path(workdir), resolve_config_path(config), gen_rows=gen_rows, max_groups=max_groups)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for name in ("rank_classification", "generation"):
        r = result[name]
        for side in ("before", "after"):
            s = r[side]
            alone = s["scoring_examples_per_s"]
            print(f"{name:<20} {side:<6} {s['model_loads']:>3} loads {s['examples']:>6} examples"
                  f" {s['examples_per_s']:>9.1f} examples/s (scoring alone {alone:.1f})")  # fmt: skip
        print(f"{name:<20} after / before = {r['ratio']:.2f}")
    print(f"same predictions: {result['same_predictions']}")
