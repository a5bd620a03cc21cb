"""base.hf through the DAG: a tiny local Llama (GQA) is imported once, tuned, evaluated and exported, and the
export loads in transformers with logits equal to flanpipe's scorer. Plus the plan-time rules of base.hf."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dag import ROOT, run_snakemake
from test_hf_tokenizer import _bpe_dir

from flanpipe.core.io import read_yaml
from flanpipe.plan.config import ConfigError, validate_config
from flanpipe.plan.experiments import plan_experiment

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama with GQA (2 KV heads for 4 query heads) and a locally trained tokenizer.json beside it."""
    out = _bpe_dir(tmp_path_factory.mktemp("hf") / "tiny-llama", pad=True)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(out)
    return out


def _config(hf: Path, **over) -> dict:
    """The embedded default on base.hf: no model YAML, no pretraining, few steps."""
    raw = read_yaml(ROOT / "config" / "config.yaml")
    raw.pop("model")
    raw.pop("ablations")
    raw["base"] = {"hf": str(hf), "pretrain_steps": 0, "fewshot": 0}
    raw["train"] = {**raw["train"], "steps": 4, "warmup_steps": 0, "lr": 1e-3, "log_interval": 1}
    raw["synthetic"] = {**raw["synthetic"], "train": 40, "validation": 8, "test": 8}
    raw["lengths"] = {"inputs": 96, "targets": 24, "pack": 128}
    raw["eval"] = {"examples": 8, "batch_size": 16}
    return {**raw, **over}


def test_disagreeing_model_lists_the_keys(hf_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"config key model: .*hidden_size: 128 vs 32") as e:
        validate_config(_config(hf_dir, model="config/models/tiny.yaml"))
    assert "num_query_groups" in str(e.value)


def test_missing_config_json_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"base.hf: {tmp_path}/config.json not found"):
        validate_config(_config(tmp_path))


def test_pretraining_with_base_hf_is_refused(hf_dir: Path) -> None:
    raw = _config(hf_dir)
    raw["base"]["pretrain_steps"] = 10
    with pytest.raises(ConfigError, match="base.pretrain_steps"):
        validate_config(raw)


def test_plan_tunes_every_run_from_the_import(hf_dir: Path) -> None:
    plan = plan_experiment(validate_config(_config(hf_dir)))
    base = plan.hf_base
    assert base is not None and base.name == "base-tiny-llama"
    assert plan.model_dir(base.name) == "results/base/hf/tiny-llama"
    tuned = [r for r in plan.runs.values() if r.is_main]
    assert tuned and all(r.init == base.name for r in tuned)
    spec = plan.train_spec(tuned[0].name)
    assert spec["model"]["num_query_groups"] == 2 and spec["train"]["init_checkpoint"] == "results/base/hf/tiny-llama"


def _write(workdir: Path, hf: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "hf.yaml"
    path.write_text(yaml.safe_dump(_config(hf)), encoding="utf-8")
    return path


def test_dry_run_imports_once_and_trains_no_tokenizer(hf_dir: Path, tmp_path: Path) -> None:
    done = run_snakemake(tmp_path, _write(tmp_path, hf_dir), "-n", "--cores", "2", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "import_hf" in out and "export_hf" in out
    assert "train_tokenizer" not in out and "pretrain" not in out


def test_tune_evaluate_export_equals_transformers(hf_dir: Path, tmp_path: Path) -> None:
    """The whole default DAG on base.hf; the exported tuned run's transformers logits equal flanpipe's scorer."""
    import json

    from flanpipe.model.gpt import load_scorer

    done = run_snakemake(tmp_path, _write(tmp_path, hf_dir), "--cores", "2", timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary
    run = "heldout_sentiment"
    assert any((tmp_path / "results" / "eval" / run).rglob("*.json"))
    export = tmp_path / "results" / "hf" / run
    model = transformers.AutoModelForCausalLM.from_pretrained(export, local_files_only=True).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(export, local_files_only=True)
    ids = torch.tensor([tok("Is this review positive? great film").input_ids[:16]])
    scorer = load_scorer(tmp_path / "results" / "models" / run)
    with torch.no_grad():
        ref = model(ids).logits
    got = scorer.logits(ids)[..., : ref.shape[-1]]
    assert (got - ref).abs().max().item() <= 1e-4
    tuned = load_scorer(tmp_path / "results" / "base" / "hf" / "tiny-llama").logits(ids)[..., : ref.shape[-1]]
    assert (tuned - ref).abs().max().item() > 1e-4  # the export is the tuned model, not the base


def test_flan_hf_recipe_plans_on_the_fixture_mirror(hf_dir: Path, tmp_path: Path) -> None:
    """config/flan_hf.yaml as flan137b.yaml is tested (tests/test_flan_fixtures.py): the local mirror, base.hf
    pointed at the tiny checkpoint, TP/PP 1 for its 2 layers; one import, six exports, no tokenizer training."""
    import re

    raw = read_yaml(ROOT / "config" / "flan_hf.yaml")
    raw["data"] = {**(raw.get("data") or {}), "local_mirror": str(ROOT / "tests" / "fixtures" / "flan")}
    raw["base"] = {**raw["base"], "hf": str(hf_dir)}
    raw["train"] = {**raw["train"], "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                    "global_batch_size": 4}  # fmt: skip
    raw["eval"] = {**raw["eval"], "layout": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}}
    (tmp_path / "flan_hf.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    done = run_snakemake(tmp_path, tmp_path / "flan_hf.yaml", "-n", "--cores", "2", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", done.stdout, flags=re.MULTILINE)}
    assert stats["import_hf"] == 1 and stats["export_hf"] == len(raw["held_out"]) == 6
    assert "train_tokenizer" not in stats and stats["train"] == 6
