"""flanpipe's lm_eval convention against lm-evaluation-harness itself (a bench extra, installed in CI): the bench's
task and tiny local Llama, scored in one process by lm-eval's own pipeline (simple_evaluate over the task YAML
``flanpipe bench eval --peer`` writes) and by flanpipe's predict_shard, give the same log-likelihoods and picks."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")


def test_lm_eval_convention_equals_lm_evaluation_harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from flanpipe.bench.peer_eval import TASK, bbh_style_examples, compare, write_task, write_tiny_llama
    from flanpipe.data.tokenize import open_tokenizer
    from flanpipe.eval.evaluate import RankConfig, predict_shard

    for var, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}.items():
        monkeypatch.setenv(var, value)
    data = bbh_style_examples(12, seed=1)
    corpus = [e["inputs"] + " " + o for e in data for o in e["options"]]
    hf = write_tiny_llama(tmp_path / "hf", corpus, layers=2, hidden=64, heads=4, ffn=128, max_positions=1024)
    shard, tasks = write_task(tmp_path, data)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf, local_files_only=True)

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
    tm = TaskManager(include_path=str(tasks), include_defaults=False)  # not lm-eval's ~14k built-in task YAMLs
    out = simple_evaluate(model=lm, tasks=[TASK], task_manager=tm, log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])

    class HFScorer:  # the same transformers model seen through flanpipe's Scorer protocol
        max_positions = 1024

        @torch.inference_mode()
        def logits(self, tokens: torch.Tensor) -> torch.Tensor:
            return model(tokens).logits

    record = predict_shard(HFScorer(), open_tokenizer(hf), pl.read_parquet(shard), 1024, 8, 8,
                           RankConfig(convention="lm_eval"))  # fmt: skip
    agreement = compare(record, samples, data)
    assert agreement["same_pick_acc"] == agreement["same_pick_acc_norm"] == 1.0
    assert agreement["lm_eval_picks_match_its_logged_metrics"] == 1.0
    assert agreement["max_abs_logprob_diff"] < 1e-4
    # not vacuous: the options' scores differ, and acc_norm picks differently from acc somewhere
    assert record["chosen_sum"].n_unique() > 1
    assert (record["chosen_sum"] != record["chosen_acc_norm"]).any()
    # lm-eval's scores, recomputed from its samples, are flanpipe's acc and acc_norm
    acc = 100 * out["results"][TASK]["acc,none"]
    assert acc == pytest.approx(100 * (record["chosen_sum"] == record["gold"]).mean())
    assert 100 * out["results"][TASK]["acc_norm,none"] == pytest.approx(
        100 * (record["chosen_acc_norm"] == record["gold"]).mean()
    )
