"""Model-parallel evaluation: TP=2 x PP=2 and DP=2 under flanpipe.train.launch (torchrun, gloo) give the same
predictions and scores as TP=1 in one process, on the same checkpoint, for option and generation tasks."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import sentencepiece as spm
import torch
from test_evaluate import make_shard, sentiment_rows, sp  # noqa: F401 (sp: the tokenizer fixture)
from test_train import TORCHRUN_VARS

from flanpipe.core.model_config import ModelConfig
from flanpipe.eval.evaluate import eval_argv, evaluate_many
from flanpipe.eval.layout import check_eval_layout

MODEL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "ffn_hidden_size": 128,
    "vocab_size": 304,  # >= the test tokenizer's 300, divisible by TP=2
    "max_position_embeddings": 64,
    "position_embedding_type": "rope",
    "gated_linear_unit": False,
    "activation": "gelu",
    "normalization": "LayerNorm",
    "init_method_std": 0.3,  # logits far from ties: argmax decisions are robust to TP's reduction order
}
LENGTHS = {"inputs": 24, "targets": 5}
METRICS = {"toy_sentiment": "accuracy", "toy_gen": "rouge"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, sp: spm.SentencePieceProcessor):  # noqa: F811
    """A saved random model (model.json + dist_checkpointing checkpoint), a tokenizer and two eval shards."""
    from flanpipe.core.io import write_json
    from flanpipe.model.checkpointing import save_weights
    from flanpipe.model.gpt import init_single_process, model_provider

    root = tmp_path_factory.mktemp("evalpar")
    init_single_process()
    cfg = ModelConfig(**MODEL)
    torch.manual_seed(0)
    save_weights(model_provider(cfg), root / "model" / "checkpoint")
    write_json(root / "model" / "model.json", cfg.to_dict())
    (root / "spm.model").write_bytes(sp.serialized_model_proto())
    shards = {"toy_sentiment": root / "cls.parquet", "toy_gen": root / "gen.parquet"}
    make_shard(sentiment_rows(n=5, templates=2, options=[])).write_parquet(shards["toy_sentiment"])
    gen = make_shard(sentiment_rows(n=3, templates=2, options=None)).with_columns(dataset=pl.lit("toy_gen"))
    gen.write_parquet(shards["toy_gen"])
    return root, shards


def run_launched(root: Path, shards: dict, out: Path, nproc: int, tp: int, pp: int, monkeypatch) -> None:  # noqa: ANN001
    from flanpipe.train.launch import launch

    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = eval_argv(
        root / "model", root / "spm.model", shards, METRICS, out, lengths=LENGTHS, batch_size=4, tp=tp, pp=pp
    )
    assert launch(argv, nproc, "", module="flanpipe.eval.evaluate") == 0


def test_tp_pp_dp_evaluation_equals_tp1(setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, shards = setup
    ref = tmp_path / "tp1"
    evaluate_many(root / "model", root / "spm.model", shards, METRICS, ref, lengths=LENGTHS, batch_size=4)
    runs = {"tp2_pp2": (4, 2, 2), "dp2": (2, 1, 1)}
    for name, (nproc, tp, pp) in runs.items():
        run_launched(root, shards, tmp_path / name, nproc, tp, pp, monkeypatch)
    for dataset in METRICS:
        want_preds = pl.read_parquet(ref / f"{dataset}.predictions.parquet")
        want = json.loads((ref / f"{dataset}.json").read_text())
        assert want_preds["prediction"].n_unique() > 1  # a row mix-up would show
        for name in runs:
            got = json.loads((tmp_path / name / f"{dataset}.json").read_text())
            got_preds = pl.read_parquet(tmp_path / name / f"{dataset}.predictions.parquet")
            floats = ["logprob", "eos_logprob"]  # TP's reduction order moves the last bits of a log-prob
            assert got_preds.drop(floats).equals(want_preds.drop(floats)), name
            for col in floats:
                got_f, want_f = (p[col].explode().drop_nulls().to_numpy() for p in (got_preds, want_preds))
                assert got_f == pytest.approx(want_f, abs=1e-4), (name, col)
            for key in ("per_template", "mean", "std", "best_dev_template", "best_dev_test"):
                assert got[key] == want[key], (name, dataset, key)


def test_bad_layouts_fail_with_a_reason() -> None:
    cfg = ModelConfig(**MODEL)
    assert check_eval_layout(cfg, 2, 2, 8, examples=60) == 2
    with pytest.raises(ValueError, match="tensor_model_parallel_size=3 must divide num_attention_heads=4"):
        check_eval_layout(cfg, 3, 1, 3)
    with pytest.raises(ValueError, match="pipeline_model_parallel_size=4 must divide num_layers=2"):
        check_eval_layout(cfg, 1, 4, 4)
    with pytest.raises(ValueError, match="6 ranks: not a multiple of TP x PP = 2 x 2"):
        check_eval_layout(cfg, 2, 2, 6)
    with pytest.raises(ValueError, match="DP = 8 / \\(1 x 1\\) = 8 ranks > 5 examples"):
        check_eval_layout(cfg, 1, 1, 8, examples=5)


def test_workflow_refuses_a_bad_eval_layout_before_any_job(tmp_path: Path) -> None:
    """eval.layout that does not divide the model, or more DP ranks than examples: the dry run fails."""
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parent.parent
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    cases = {
        "tensor_model_parallel_size=3 must divide num_attention_heads=4": ({"layout": {"tensor_model_parallel_size": 3,
                                                                           "pipeline_model_parallel_size": 1}}, []),
        "DP = 100 / (1 x 1) = 100 ranks > 60 examples": ({}, ["--set-resources", "evaluate:tasks=100"]),
    }  # fmt: skip
    for message, (eval_extra, args) in cases.items():
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({**config, "eval": {**config["eval"], **eval_extra}}))
        cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(tmp_path)]
        cmd += ["--configfile", str(path), "-n", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode != 0 and message in done.stdout + done.stderr, (done.stdout + done.stderr)[-2000:]
