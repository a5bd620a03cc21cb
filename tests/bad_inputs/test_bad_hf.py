"""Bad HF checkpoints in and out (base.hf, ``flanpipe import-hf`` / ``export-hf``): each refused with the file and
the token, tensor or key named, at plan time where the headers tell (no torch, no job), and nothing half-written.

The checkpoints are built here from a tiny Llama config with random weights and a tokenizer trained on a few
sentences (``tokenizers`` only): no download, no ``transformers``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_bad_inputs import (
    assert_failed_before_any_job,
    default_config,
    dry_run,
    leftovers,
    raw_config,
    registry_dir,
)

from flanpipe.cli import main
from flanpipe.data.hf_tokenizer import load_hf_tokenizer
from flanpipe.model import hf_export
from flanpipe.model.hf_format import HFFormatError
from flanpipe.model.hf_import import import_hf
from flanpipe.plan.checks import PlanError, PlanWarning
from flanpipe.plan.config import ConfigError, validate_config
from flanpipe.plan.experiments import plan_experiment

torch = pytest.importorskip("torch")

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
TEXTS = [f"the model {i} reads a review and answers yes or no {i * 7}" for i in range(60)]


def _weights(cfg: dict) -> dict[str, torch.Tensor]:
    """Every tensor a Llama of ``cfg`` has, in HF's names and shapes (random: only shapes matter here)."""
    g = torch.Generator().manual_seed(0)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    for i in range(cfg["num_hidden_layers"]):
        out |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    return {n: torch.randn(shape, generator=g) * 0.05 for n, shape in out.items()}


def _tokenizer(out: Path, specials: list[str], **config: object) -> None:
    """A byte-level BPE ``tokenizer.json`` with ``specials`` first (ids 0..), and a tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=100, special_tokens=specials))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "tiny-llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    save_file(_weights(CONFIG), d / "model.safetensors", metadata={"format": "pt"})
    _tokenizer(d, ["<unk>", "<s>", "</s>"], bos_token="<s>", eos_token="</s>", add_bos_token=False)
    return d


@pytest.fixture(scope="module")
def imported(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "base"
    import_hf(hf_dir, out)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _plan(tmp_path: Path, hf: Path):
    """The bad-inputs test registry planned on base.hf (no model YAML): what `snakemake -n` runs."""
    registry_dir(tmp_path)
    cfg = raw_config(tmp_path, base={"hf": str(hf)})
    cfg.pop("model")
    return plan_experiment(validate_config(cfg))


# ------------------------------------------------------------------------------------------- tokenizer


def test_foreign_tokenizer_json_is_refused_naming_file_and_token(hf_dir: Path, tmp_path: Path) -> None:
    """Another model's byte-level BPE beside a Llama tokenizer_config.json that names </s> and <s>: EOS used to
    fall back to config.json's id 2, an ordinary byte piece, and BOS was silently not added."""
    d = _copy(hf_dir, tmp_path / "hf")
    _tokenizer(d, ["<|endoftext|>"], bos_token="<s>", eos_token="</s>", add_bos_token=True)
    want = r"tokenizer_config.json names eos_token '</s>', bos_token '<s>', which .*tokenizer.json does not have"
    with pytest.raises(ValueError, match=want):
        load_hf_tokenizer(d)
    with pytest.raises(HFFormatError, match=want):
        import_hf(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(PlanError, match=r"config key tokenizer.model: .*names eos_token '</s>'"):
        _plan(tmp_path / "plan", d)  # planning (snakemake -n) refuses it, before the import job


def test_bos_asked_for_but_absent(hf_dir: Path, tmp_path: Path) -> None:
    d = _copy(hf_dir, tmp_path / "hf")
    _tokenizer(d, ["<unk>", "</s>"], eos_token="</s>", add_bos_token=True)
    with pytest.raises(
        ValueError, match=r"tokenizer_config.json: add_bos_token is true but .*tokenizer.json has no BOS"
    ):
        load_hf_tokenizer(d)


def test_fallback_eos_id_outside_the_vocabulary(hf_dir: Path, tmp_path: Path) -> None:
    d = _copy(hf_dir, tmp_path / "hf")
    _tokenizer(d, ["<unk>", "</s>"])  # tokenizer_config.json names no EOS: config.json's eos_token_id is used
    (d / "config.json").write_text(json.dumps({**CONFIG, "eos_token_id": 5000}))
    with pytest.raises(ValueError, match=r"config.json: eos_token_id 5000 is not an id of .*tokenizer.json \(0..99\)"):
        load_hf_tokenizer(d)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_unreadable_tokenizer_file_is_named(hf_dir: Path, tmp_path: Path, name: str) -> None:
    d = _copy(hf_dir, tmp_path / "hf")
    (d / name).write_text('{"model": ')
    with pytest.raises(ValueError, match=rf"{name}: not "):
        load_hf_tokenizer(d)


# ------------------------------------------------------------------------------------------- weights


def test_truncated_safetensors_is_named_at_plan_and_import(hf_dir: Path, tmp_path: Path) -> None:
    """A copy cut short gave a raw SafetensorError traceback without the file's name, in the import job."""
    d = _copy(hf_dir, tmp_path / "hf")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 1000])
    want = r"model.safetensors: truncated or half-written: the header says \d+ bytes, the file has \d+"
    with pytest.raises(HFFormatError, match=want):
        import_hf(d, tmp_path / "out")
    with pytest.raises(ConfigError, match="config key base.hf: .*" + want):
        _plan(tmp_path / "plan", d)
    (d / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(ConfigError, match=r"model.safetensors: not a safetensors file \(truncated or empty: 5 bytes\)"):
        _plan(tmp_path / "plan", d)


def test_missing_shard_found_while_planning(hf_dir: Path, tmp_path: Path) -> None:
    d = _copy(hf_dir, tmp_path / "hf")
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    files = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    save_file(
        {n: tensors[n] for n in names if files[n].startswith("model-00001")}, d / "model-00001-of-00002.safetensors"
    )
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
    with pytest.raises(ConfigError, match=r"base.hf: .*index.json: shard 'model-00002-of-00002.safetensors'.* missing"):
        _plan(tmp_path / "plan", d)


def test_pytorch_bin_only_checkpoint_says_how_to_convert(hf_dir: Path, tmp_path: Path) -> None:
    d = _copy(hf_dir, tmp_path / "hf")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"no model.safetensors.*pytorch_model.bin.*safe_serialization=True"):
        _plan(tmp_path / "plan", d)


@pytest.mark.parametrize("tied", [True, False])
def test_tie_word_embeddings_disagreeing_with_the_weights(hf_dir: Path, tmp_path: Path, tied: bool) -> None:
    d = _copy(hf_dir, tmp_path / "hf")
    (d / "config.json").write_text(json.dumps({**CONFIG, "tie_word_embeddings": tied}))
    if not tied:  # the weights of a tied model: no lm_head.weight
        tensors = load_file(d / "model.safetensors")
        del tensors["lm_head.weight"]
        save_file(tensors, d / "model.safetensors")
    want = rf"config.json: tie_word_embeddings is {'true' if tied else 'false'}.* lm_head.weight"
    with pytest.raises(ConfigError, match=want):
        _plan(tmp_path / "plan", d)
    with pytest.raises(HFFormatError, match=want):
        import_hf(d, tmp_path / "out")


def test_good_checkpoint_plans(hf_dir: Path, tmp_path: Path) -> None:
    assert _plan(tmp_path, hf_dir).hf_base is not None


# ------------------------------------------------------------------------------------------- export


def test_export_over_an_earlier_export_refuses_then_replaces_it_whole(imported: Path, tmp_path: Path) -> None:
    """An export with other sharding into the same dir left the old model.safetensors beside the new shards
    and index, and from_pretrained loaded the old weights."""
    out = tmp_path / "export"
    hf_export.export_hf(imported, out)
    assert (out / "model.safetensors").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"holds an earlier export .*model.safetensors.*pass --force"):
        hf_export.export_hf(imported, out, max_shard_bytes=20_000)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched
    hf_export.export_hf(imported, out, max_shard_bytes=20_000, force=True)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names, names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert {p for p in names if p.endswith(".safetensors")} == set(index["weight_map"].values())
    assert leftovers(tmp_path) == []


def test_export_never_touches_a_foreign_directory(imported: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(ValueError, match=r"holds \['notes.txt'\], which export-hf does not write"):
            hf_export.export_hf(imported, out, force=force)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_failed_export_leaves_nothing(imported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_written(tensors, out, max_shard_bytes):  # noqa: ANN001
        (out / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_export, "write_safetensors", half_written)
    with pytest.raises(KeyboardInterrupt):
        hf_export.export_hf(imported, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_export_base_mistyped_is_named(imported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped --base exported silently without tokenizer or generation config."""
    missing = tmp_path / "resuts" / "base"
    with pytest.raises(SystemExit) as e:
        main(["export-hf", str(imported), "--out", str(tmp_path / "export"), "--base", str(missing)])
    assert e.value.code == 2
    assert f"--base {missing}: not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"--base .*empty: holds no config.json or tokenizer files"):
        hf_export.export_hf(imported, tmp_path / "export", base=empty)
    assert not (tmp_path / "export").exists()


def test_export_base_tokenizer_larger_than_the_model(imported: Path, tmp_path: Path) -> None:
    """A base whose tokenizer has more ids than the model has rows was exported unchecked (import checks it)."""
    from tokenizers import Tokenizer, models, trainers

    base = tmp_path / "other"
    base.mkdir()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    words = [f"word{i} other{i * 7} thing{i * 13}" for i in range(300)]
    tok.train_from_iterator(words, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"]))
    tok.save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(
        HFFormatError, match=r"tokenizer.json: tokenizer has \d+ ids but the embedding rows of .*model.json is 100"
    ):
        hf_export.export_hf(imported, tmp_path / "export", base=base)


def test_export_of_an_unfinished_model_dir(imported: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(imported / "model.json", run / "model.json")
    (run / "hf").mkdir()
    shutil.copy(imported / "hf" / "config.json", run / "hf" / "config.json")
    with pytest.raises(
        FileNotFoundError, match=r"run: not a finished model dir, it lacks \['checkpoint/metadata.json'"
    ):
        hf_export.export_hf(run, tmp_path / "export")
    with pytest.raises(ValueError, match="max shard size must be positive"):
        hf_export.export_hf(imported, tmp_path / "export", max_shard_bytes=0)


# ------------------------------------------------------------------------------------------- base.hf config


def test_suggested_remedy_model_null_works(hf_dir: Path, tmp_path: Path) -> None:
    """The error suggested `--config model=null`, which Snakemake passes as the string "null": then a missing file."""
    cfg = default_config()
    cfg["base"] = {"hf": str(hf_dir), "pretrain_steps": 0, "fewshot": 0}
    r = dry_run(tmp_path / "w", cfg)
    assert_failed_before_any_job(r, tmp_path / "w", "config key model: ", "leave model unset (--config model=null)")
    ok = dry_run(tmp_path / "w", cfg, "--config", "model=null")
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    assert "import_hf" in ok.stdout


def test_fewshot_baseline_of_base_hf_does_not_warn(hf_dir: Path, tmp_path: Path) -> None:
    """base.hf with base.fewshot: 2 warned that few-shot "has no effect" while planning the few-shot evaluations."""
    registry_dir(tmp_path)
    cfg = raw_config(tmp_path, base={"hf": str(hf_dir), "fewshot": 2})
    cfg.pop("model")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanWarning)
        p = plan_experiment(validate_config(cfg))
    assert any(e.variant.endswith("2shot") for e in p.evaluations)


def test_killed_import_leaves_nothing_and_keeps_the_earlier_one(
    hf_dir: Path, imported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed import left checkpoint/ without model.json, which the rerun then refused as a foreign dir."""
    from flanpipe.model import hf_import

    def killed(src: Path, ckpt: Path) -> None:
        ckpt.mkdir(parents=True)
        (ckpt / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_import, "stream_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        import_hf(hf_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    earlier = _copy(imported, tmp_path / "earlier")
    with pytest.raises(KeyboardInterrupt):
        import_hf(hf_dir, earlier)
    assert sorted(p.name for p in earlier.iterdir()) == ["checkpoint", "hf", "model.json"]
    assert sorted(p.name for p in (earlier / "checkpoint").iterdir()) == sorted(
        p.name for p in (imported / "checkpoint").iterdir()
    )


def test_base_hf_and_base_checkpoint_swapped_say_which_is_which(hf_dir: Path, imported: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"base.hf: .*config.json not found.*holds model.json.*give it as base.checkpoint"
    ):
        _plan(tmp_path / "a", imported)
    registry_dir(tmp_path / "b")
    with pytest.raises(PlanError, match=r"base.checkpoint: .* holds an HF config.json but no model.json.*base.hf"):
        plan_experiment(validate_config(raw_config(tmp_path / "b", base={"checkpoint": str(hf_dir)})))
