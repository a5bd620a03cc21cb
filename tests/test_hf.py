"""HF checkpoints in and out (flanpipe.model.hf_import): logits parity, exact round trip, refusals with named fields.

Every HF model here is built locally from a tiny config with random weights (no hub download).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flanpipe.core.model_config import ModelConfig, param_count
from flanpipe.model import hf_export, hf_format, hf_import
from flanpipe.model.gpt import load_scorer

transformers = pytest.importorskip("transformers")  # in the dev extra: CI runs these

VOCAB = 100  # padded to 128 rows on import


def _hf_config(arch: str):
    common = dict(vocab_size=VOCAB)
    if arch == "llama":  # GQA, untied, Llama 3's rope theta
        return transformers.LlamaConfig(
            **common, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0, tie_word_embeddings=False,
        )  # fmt: skip
    if arch == "qwen2":  # GQA, tied, QKV bias only
        return transformers.Qwen2Config(
            **common, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
        )  # fmt: skip
    return transformers.GPT2Config(**common, n_embd=64, n_layer=2, n_head=4, n_positions=64)


def _make_hf(arch: str, out: Path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch)).float().eval()
    with torch.no_grad():  # init leaves biases and norms at 0/1: perturb so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = _make_hf(request.param, root / "hf")
    # Vocabulary tables are written in row chunks: 24 rows of 64 fp32 here, so the 128-row tables are 6
    # chunks, one of them straddling the tokenizer's 100 rows and the zero padding. Every test below
    # (logits, round trip, TP, PP) reads a checkpoint written that way.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_import, "TABLE_CHUNK_BYTES", 24 * 64 * 4)
        cfg = hf_import.import_hf(root / "hf", root / "base")
    return request.param, model, cfg, root


def test_import_gives_the_same_logits(converted):
    arch, model, cfg, root = converted
    assert cfg.vocab_size == 128 and cfg.tokenizer_vocab_size == VOCAB
    scorer = load_scorer(root / "base")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    got = scorer.logits(ids)
    assert (got[..., :VOCAB] - ref).abs().max().item() <= 1e-4
    assert torch.isneginf(got[..., VOCAB:]).all()  # padding rows never win


def test_greedy_decodes_agree(converted):
    arch, model, cfg, root = converted
    scorer = load_scorer(root / "base")
    prompt = torch.tensor([[5, 17, 42, 8]])
    ref = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    tokens = prompt
    for _ in range(10):
        nxt = scorer.logits(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    assert tokens.tolist() == ref.tolist()


def test_export_round_trip_is_exact_and_loads(converted, tmp_path):
    arch, model, cfg, root = converted
    out = hf_export.export_hf(root / "base", tmp_path / "export")
    original = load_file(root / "hf" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert set(exported) == set(original)
    for name, t in original.items():
        assert torch.equal(exported[name], t), name
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_export_shards_past_the_size_limit(converted, tmp_path):
    arch, model, cfg, root = converted
    if arch != "llama":
        pytest.skip("one architecture is enough")
    out = hf_export.export_hf(root / "base", tmp_path / "export", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert (again(ids).logits - model(ids).logits).abs().max() == 0
    # ... and a sharded checkpoint imports too, to the same weights.
    hf_import.import_hf(out, tmp_path / "reimport")
    assert (tmp_path / "reimport" / "model.json").read_text() == (root / "base" / "model.json").read_text()


# --------------------------------------------------------------------------- layouts and config


def test_qkv_fusion_groups_heads_and_inverts():
    heads, groups, hd, h = 4, 2, 3, 5
    q = torch.arange(heads * hd * h).reshape(heads * hd, h).float()
    k, v = -torch.ones(groups * hd, h), torch.zeros(groups * hd, h)
    fused = hf_format.fuse_qkv(q, k, v, heads, groups, hd)
    # group 0: queries of heads 0 and 1, then its key, then its value
    assert torch.equal(fused[: 2 * hd], q[: 2 * hd])
    assert torch.equal(fused[2 * hd : 3 * hd], k[:hd]) and torch.equal(fused[3 * hd : 4 * hd], v[:hd])
    assert all(torch.equal(a, b) for a, b in zip(hf_format.split_qkv(fused, heads, groups, hd), (q, k, v), strict=True))


def test_param_count_follows_the_shape_switches():
    """param_count equals the Megatron model's parameter count for GQA, tied, bias-free shapes."""
    from flanpipe.model.gpt import init_single_process, model_provider

    init_single_process()
    for kw in (
        dict(num_query_groups=2, add_bias_linear=False, gated_linear_unit=True, normalization="RMSNorm"),
        dict(add_bias_linear=False, add_qkv_bias=True, share_embeddings_and_output_weights=True),
        dict(position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True),
    ):
        cfg = ModelConfig(
            num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, vocab_size=64,
            max_position_embeddings=16, **kw,
        )  # fmt: skip
        model = model_provider(cfg)
        assert param_count(cfg) == sum(p.numel() for p in model.parameters()), kw


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(num_query_groups=3), "num_query_groups"),
        (dict(rotary_base=0), "rotary_base"),
        (dict(norm_epsilon=0.0), "norm_epsilon"),
        (dict(tokenizer_vocab_size=65), "tokenizer_vocab_size"),
        (dict(rope_scaling_factor=8.0, position_embedding_type="learned_absolute"), "rope_scaling_factor"),
        (dict(add_qkv_bias="yes"), "add_qkv_bias"),
    ],
)
def test_model_config_refuses_bad_shapes(kw, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(
            num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, vocab_size=64,
            max_position_embeddings=16, **kw,
        )  # fmt: skip


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad") / "hf"
    _make_hf("llama", d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_named(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "hf")
    tensors = load_file(d / "model.safetensors")
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors").unlink()
    weight_map = {n: ("model-00001-of-00002.safetensors" if i < 5 else "model-00002-of-00002.safetensors")
                  for i, n in enumerate(names)}  # fmt: skip
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(hf_format.HFFormatError, match="model-00002-of-00002.safetensors"):
        hf_import.import_hf(d, tmp_path / "out")


def test_wrong_shape_names_the_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "hf")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # MHA-shaped in a GQA model
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    want = r"model.layers.1.self_attn.k_proj.weight.*\[64, 64\].*\[32, 64\]"
    with pytest.raises(hf_format.HFFormatError, match=want):
        hf_import.import_hf(d, tmp_path / "out")


def test_unknown_architecture_is_refused(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "hf")
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_format.HFFormatError, match=r"config.json.*architectures.*GPTNeoXForCausalLM"):
        hf_import.import_hf(d, tmp_path / "out")


def test_unsupported_rope_scaling_is_refused(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "hf")
    config = json.loads((d / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_format.HFFormatError, match=r"config.json.*rope_parameters.*yarn"):
        hf_import.import_hf(d, tmp_path / "out")


def test_sliding_window_layers_are_refused(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "hf")
    config = json.loads((d / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "full_attention"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_format.HFFormatError, match=r"config.json.*layer_types.*sliding_attention"):
        hf_import.import_hf(d, tmp_path / "out")


def test_vocab_larger_than_the_embedding_is_refused(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "hf")
    config = json.loads((d / "config.json").read_text())
    config["vocab_size"] = 120  # the embedding has 100 rows
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_format.HFFormatError, match=r"model.embed_tokens.weight.*\[100, 64\].*\[120, 64\]"):
        hf_import.import_hf(d, tmp_path / "out")


def test_unused_tensor_is_refused(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "hf")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf_format.HFFormatError, match="o_proj.bias"):
        hf_import.import_hf(d, tmp_path / "out")


def test_tokenizer_larger_than_the_embedding_is_refused(llama_dir, tmp_path):
    from tokenizers import Tokenizer, models, trainers

    d = _copy(llama_dir, tmp_path / "hf")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    words = [f"word{i} other{i * 7} thing{i * 13}" for i in range(300)]
    tok.train_from_iterator(words, trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "</s>"]))
    assert tok.get_vocab_size() > VOCAB
    tok.save(str(d / "tokenizer.json"))
    with pytest.raises(hf_format.HFFormatError, match=r"tokenizer.json.*ids.*vocab_size"):
        hf_import.import_hf(d, tmp_path / "out")


def test_cli_import_and_export(llama_dir, tmp_path):
    """Weights and the tokenizer travel: base dir's hf/ -> the export, which AutoTokenizer loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from flanpipe.cli import main

    src = _copy(llama_dir, tmp_path / "hf")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [f"the model {i} reads tokens" for i in range(50)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(src)
    main(["import-hf", str(src), "--out", str(tmp_path / "base")])
    main(["export-hf", str(tmp_path / "base"), "--out", str(tmp_path / "export")])
    original = load_file(llama_dir / "model.safetensors")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert all(torch.equal(exported[n], t) for n, t in original.items())
    assert json.loads((tmp_path / "export" / "generation_config.json").read_text())["eos_token_id"] == 2
    exported_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    original_tok = transformers.AutoTokenizer.from_pretrained(src)
    assert exported_tok("the model 7 reads")["input_ids"] == original_tok("the model 7 reads")["input_ids"]


def _parallel_logits(model_dir: Path, tp: int, pp: int, tokens: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Logits of the imported model loaded at TP x PP by flanpipe's parallel scorer (tp*pp gloo ranks)."""
    import os
    import socket
    import subprocess
    import sys

    torch.save(tokens, tmp_path / "tokens.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    worker = Path(__file__).with_name("hf_tp_worker.py")
    world = tp * pp
    args = [str(model_dir), str(tp), str(pp), str(tmp_path / "tokens.pt"), str(tmp_path / "out.pt")]
    env = {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), *args],
            env=os.environ | env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_forward_matches_hf(converted, tmp_path, tp, pp):
    """The imported checkpoint loaded at TP=2 (QKV groups, GLU halves and vocab rows split over two ranks;
    each masks the padding rows of its own vocab slice) or PP=2 (one layer per stage; a tied table is
    held by both end stages) gives HF's logits."""
    arch, model, cfg, root = converted
    if arch == "gpt2" and tp > 1:
        pytest.skip("Llama (GQA) and Qwen2 (QKV bias, tied) cover the TP split")
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    got = _parallel_logits(root / "base", tp, pp, tokens, tmp_path)
    with torch.no_grad():
        ref = model(tokens).logits
    assert got.shape == (2, 16, cfg.vocab_size)
    assert (got[..., :VOCAB] - ref).abs().max().item() <= 1e-4
    assert torch.isneginf(got[..., VOCAB:]).all()


def test_bf16_checkpoint_converts_to_fp32(tmp_path):
    """A bf16 source becomes the fp32 base model: same logits as HF upcasting the same weights."""
    model = _make_hf("llama", tmp_path / "fp32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert next(iter(load_file(tmp_path / "bf16" / "model.safetensors").values())).dtype == torch.bfloat16
    hf_import.import_hf(tmp_path / "bf16", tmp_path / "base")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").float().eval()
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        ref = ref_model(ids).logits
    got = load_scorer(tmp_path / "base").logits(ids)
    assert got.dtype == torch.float32 and (got[..., :VOCAB] - ref).abs().max().item() <= 1e-4


def test_import_bench_reports_peak_rss_beside_checkpoint_size(tmp_path):
    from flanpipe.bench.import_hf import run

    result = run(layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=100, workdir=str(tmp_path))
    assert result["checkpoint_bytes"] > 0 and result["converted_fp32_bytes"] > result["tensor_bytes"]
    assert 0 < result["peak_rss_bytes"] and result["peak_rss_fraction_of_checkpoint"] > 0
    assert 0 < result["baseline_rss_bytes"] <= result["peak_rss_bytes"]


def test_padding_rows_carry_no_loss_and_get_no_gradient():
    """Training's per-token loss over a padded vocabulary equals cross entropy over the real ids only."""
    from flanpipe.model.gpt import init_single_process, model_provider

    init_single_process()
    cfg = ModelConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, vocab_size=128,
        max_position_embeddings=16, tokenizer_vocab_size=VOCAB, share_embeddings_and_output_weights=True,
    )  # fmt: skip
    model = model_provider(cfg)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(8).expand(2, 8)
    loss = model(input_ids=ids, position_ids=positions, attention_mask=None, labels=labels)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, attention_mask=None)[..., :VOCAB]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    assert torch.allclose(loss.reshape(-1), ref, atol=1e-5)
    loss.sum().backward()
    grad = model.embedding.word_embeddings.weight.grad
    assert torch.isfinite(grad).all() and grad[VOCAB:].abs().max() == 0 and grad[:VOCAB].abs().max() > 0


def test_llama31_rope_scaling_gives_the_same_logits(tmp_path):
    """Llama 3.1's frequency scaling (factor 8, low/high 1 and 4, original context 8192) is Megatron's
    rope_scaling: the import is exact, not approximate. Long wavelengths need a big theta and positions."""
    config = _hf_config("llama")
    config.max_position_embeddings = 256
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = rope
    else:
        config.rope_scaling, config.rope_theta = rope, rope["rope_theta"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # sharp attention, so that the rotation angles show in the logits
        for name, p in model.named_parameters():
            p.mul_(8.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0)
    model.save_pretrained(tmp_path / "hf")
    cfg = hf_import.import_hf(tmp_path / "hf", tmp_path / "base")
    assert cfg.rope_scaling_factor == 8.0 and cfg.rotary_base == 500000
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    got = load_scorer(tmp_path / "base").logits(ids)
    assert (got[..., :VOCAB] - ref).abs().max().item() <= 1e-4
    unscaled = json.loads((tmp_path / "base" / "model.json").read_text()) | {"rope_scaling_factor": None}
    shutil.copytree(tmp_path / "base", tmp_path / "unscaled")
    (tmp_path / "unscaled" / "model.json").write_text(json.dumps(unscaled))
    wrong = load_scorer(tmp_path / "unscaled").logits(ids)
    assert (wrong[..., :VOCAB] - ref).abs().max().item() > 1e-3  # the test can tell scaling from none
    exported = hf_export.export_hf(tmp_path / "base", tmp_path / "export")
    again = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)


def test_export_refuses_a_model_no_hf_class_computes(tmp_path):
    """flanpipe's own default shape (LayerNorm, GELU MLP, RoPE) is neither Llama nor GPT-2."""
    (tmp_path / "run").mkdir()
    cfg = ModelConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=48,
        vocab_size=64,
        max_position_embeddings=16,
    )
    (tmp_path / "run" / "model.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(ValueError, match=r"model.json.*normalization.*LlamaForCausalLM"):
        hf_export.export_hf(tmp_path / "run", tmp_path / "out")


def test_import_never_overwrites_a_foreign_directory(llama_dir, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an import-hf output"):
        hf_import.import_hf(llama_dir, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
