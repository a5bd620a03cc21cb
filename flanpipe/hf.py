"""HuggingFace checkpoints in and out: ``import_hf`` (HF dir -> model.json + checkpoint/) and ``export_hf``.

The layouts (see /work/shared/notes/hf-megatron.md):
- QKV: Megatron's ``linear_qkv`` is grouped per query group (its heads' queries, then its key, then its
  value head); HF keeps q, k, v apart (GPT-2: one ``c_attn``, q|k|v concatenated). ``fuse_qkv`` /
  ``split_qkv`` are the one place this is written.
- SwiGLU: Megatron's gated fc1 is ``cat(gate, up)`` (it computes ``act(first half) * second half``).
- GPT-2's Conv1D weights are stored ``[in, out]``: transposed here.
- The vocabulary is padded to a multiple of ``VOCAB_MULTIPLE`` rows (Megatron's practice: every power-of-two
  TP size up to 128 divides it); ``ModelConfig.tokenizer_vocab_size`` keeps the real size and the model
  masks the padding logits to -inf, so the padded model predicts and scores exactly as the original.

Memory: one process writes the whole dist_checkpointing (torch_dist) checkpoint while holding about
one tensor. torch_dist is torch.distributed.checkpoint (DCP) files + Megatron's metadata.json/common.pt;
``stream_checkpoint`` builds the Megatron model on the ``meta`` device (no storage) only to learn the
sharded keys, global shapes and chunk offsets the real saver would write (so they cannot drift from
Megatron's), hands DCP one write item per chunk, and a planner's ``resolve_data`` reads that chunk's
HF tensors through safetensors' ``safe_open`` only when DCP writes it (QKV fuse, SwiGLU halves, GPT-2
transpose, vocab padding, fp32 cast there). On CPU, DCP's FileSystemWriter with thread_count=1 uses
its serial loader: one item resolved, written, dropped. The vocabulary tables are cut into ~32 MiB row
chunks (DCP stores and loads any chunking), each read as just those rows (``get_slice``), and so are the
Llama/Qwen2 layer weights whose rows are HF's rows (SwiGLU halves read only gate's or up's rows, o_proj,
down_proj); other items are built in the source dtype and only their own slice is cast to fp32.
Resident = interpreter + torch + Megatron (0.35 GiB, measured alone) + about one layer's
largest tensors: a constant set by the layer shape, not by depth or vocabulary.
Measured (``flanpipe bench import-hf``; the child's own VmHWM, since ru_maxrss would also count the
pages it shared with the generating parent before exec; 2-core machine, load ~1-4), before -> now
(row chunks for the tables and row-mapped layer weights, glibc's mmap threshold fixed):
- 2.00 GiB bf16 Llama (20 layers, 2048 wide, vocab 32,000): peak 1.15 -> 0.54 GiB (58% -> 27%); beyond
  the 0.35 GiB baseline the conversion holds 0.80 -> 0.19 GiB (9% of the checkpoint).
- 3.58 GiB bf16, Llama 3 8B's layer and vocab shapes (4 layers, 4096 wide, ffn 14,336, vocab 128,256):
  peak 5.94 -> 0.68 GiB (166% -> 19%; the conversion's own 0.33 GiB is 9%). Items are resolved one at a
  time, so a 32-layer 8B (16 GB) should add layers, not resident memory (not measured at that depth here:
  48 GB of disk per run).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flanpipe.model_config import ModelConfig, load_model_config

VOCAB_MULTIPLE = 128
SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")
# Files that travel with the weights: the tokenizer and decoding defaults.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)


class HFFormatError(ValueError):
    """An HF checkpoint flanpipe cannot convert exactly; the message names the file and field/tensor."""


# --------------------------------------------------------------------------- config


def padded_vocab_size(vocab: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Rows of the embedding table: ``vocab`` rounded up to ``multiple``."""
    return -(-vocab // multiple) * multiple


def _get(config: dict[str, Any], path: Path, key: str) -> Any:
    if key not in config:
        raise HFFormatError(f"{path}: missing field '{key}'")
    return config[key]


def _refuse(path: Path, field: str, value: Any, why: str) -> HFFormatError:
    return HFFormatError(f"{path}: unsupported {field}={value!r}: {why}")


def architecture(config: dict[str, Any], path: Path) -> str:
    archs = _get(config, path, "architectures")
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in SUPPORTED:
        raise _refuse(path, "architectures", archs, f"flanpipe converts exactly one of {list(SUPPORTED)}")
    return archs[0]


def _rope(config: dict[str, Any], path: Path) -> tuple[int, float | None]:
    """(rotary base, Llama 3.1 scaling factor or None) from ``rope_parameters`` (transformers 5) or
    ``rope_theta`` / ``rope_scaling`` (transformers 4).

    Megatron-Core reproduces only Llama 3.1's scaling with low/high frequency factors 1 and 4 and an
    original context of 8192; anything else would be converted approximately, so it is refused."""
    params = config.get("rope_parameters") or {}
    field = "rope_parameters" if params else "rope_scaling"
    theta = params.get("rope_theta", config.get("rope_theta", 10000))
    if float(theta) != int(theta):
        raise _refuse(path, "rope_theta", theta, "Megatron's rotary_base is an integer")
    rs = params or config.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return int(theta), None
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kind != "llama3" or any(float(rs.get(k, -1)) != v for k, v in fixed.items()):
        raise _refuse(path, field, rs, f"Megatron-Core implements only rope_type 'llama3' with {fixed}")
    return int(theta), float(rs["factor"])


def model_config_from_hf(config: dict[str, Any], path: Path) -> tuple[str, ModelConfig]:
    """(architecture, ModelConfig) for an HF ``config.json``; refuses what would not convert exactly."""
    arch = architecture(config, path)
    vocab = int(_get(config, path, "vocab_size"))
    if arch == "GPT2LMHeadModel":
        act = config.get("activation_function", "gelu_new")
        acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
        if act not in acts:
            raise _refuse(path, "activation_function", act, f"supported: {sorted(acts)}")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if config.get(key):
                raise _refuse(path, key, config[key], "Megatron's attention has no such option")
        if config.get("scale_attn_weights", True) is not True:
            raise _refuse(path, "scale_attn_weights", config["scale_attn_weights"], "Megatron always scales")
        h = int(_get(config, path, "n_embd"))
        cfg = ModelConfig(
            num_layers=int(_get(config, path, "n_layer")),
            hidden_size=h,
            num_attention_heads=int(_get(config, path, "n_head")),
            ffn_hidden_size=int(config.get("n_inner") or 4 * h),
            vocab_size=padded_vocab_size(vocab),
            max_position_embeddings=int(_get(config, path, "n_positions")),
            position_embedding_type="learned_absolute",
            activation=acts[act],
            normalization="LayerNorm",
            norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
            add_bias_linear=True,
            share_embeddings_and_output_weights=bool(config.get("tie_word_embeddings", True)),
            tokenizer_vocab_size=vocab,
        )
        return arch, cfg
    kinds = sorted(set(config.get("layer_types") or ["full_attention"]))
    if kinds != ["full_attention"]:  # transformers 5 marks sliding-window layers here
        raise _refuse(path, "layer_types", kinds, "only full attention converts exactly")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(path, "hidden_act", act, "SwiGLU (silu) is the supported gated MLP")
    if config.get("pretraining_tp", 1) != 1:
        raise _refuse(path, "pretraining_tp", config["pretraining_tp"], "only 1 is supported")
    if arch == "Qwen2ForCausalLM":
        if config.get("use_sliding_window"):
            raise _refuse(path, "use_sliding_window", True, "Megatron's window_size is not Qwen2's per-layer window")
        bias, qkv_bias = False, True
    else:
        attention_bias, mlp_bias = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise _refuse(
                path, "attention_bias/mlp_bias", (attention_bias, mlp_bias), "Megatron has one switch for both"
            )
        bias, qkv_bias = attention_bias, False
    heads = int(_get(config, path, "num_attention_heads"))
    h = int(_get(config, path, "hidden_size"))
    head_dim = config.get("head_dim") or h // heads
    theta, scaling = _rope(config, path)
    cfg = ModelConfig(
        num_layers=int(_get(config, path, "num_hidden_layers")),
        hidden_size=h,
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        kv_channels=int(head_dim),
        ffn_hidden_size=int(_get(config, path, "intermediate_size")),
        vocab_size=padded_vocab_size(vocab),
        max_position_embeddings=int(_get(config, path, "max_position_embeddings")),
        position_embedding_type="rope",
        gated_linear_unit=True,
        activation="silu",
        normalization="RMSNorm",
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        add_bias_linear=bias,
        add_qkv_bias=qkv_bias,
        share_embeddings_and_output_weights=bool(config.get("tie_word_embeddings", False)),
        rotary_base=theta,
        rope_scaling_factor=scaling,
        tokenizer_vocab_size=vocab,
    )
    return arch, cfg


def hf_config_from_model(cfg: ModelConfig, arch: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` describing ``cfg`` (fields of ``base``, the imported original, kept)."""
    out = dict(base or {})
    vocab = cfg.tokenizer_vocab_size or cfg.vocab_size
    out.update(
        {"architectures": [arch], "vocab_size": vocab, "tie_word_embeddings": cfg.share_embeddings_and_output_weights}
    )
    if arch == "GPT2LMHeadModel":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.activation]
        out.update(
            model_type="gpt2",
            n_layer=cfg.num_layers,
            n_embd=cfg.hidden_size,
            n_head=cfg.num_attention_heads,
            n_inner=cfg.ffn_hidden_size,
            n_positions=cfg.max_position_embeddings,
            activation_function=act,
            layer_norm_epsilon=cfg.norm_epsilon,
        )
    else:
        out.update(
            model_type="qwen2" if arch == "Qwen2ForCausalLM" else "llama",
            num_hidden_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_query_groups,
            head_dim=cfg.kv_channels,
            intermediate_size=cfg.ffn_hidden_size,
            max_position_embeddings=cfg.max_position_embeddings,
            hidden_act="silu",
            rms_norm_eps=cfg.norm_epsilon,
            rope_theta=float(cfg.rotary_base),
        )
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
        if arch == "LlamaForCausalLM":
            out.update(attention_bias=cfg.add_bias_linear, mlp_bias=cfg.add_bias_linear)
        if cfg.rope_scaling_factor is not None:
            rope = rope | {
                "rope_type": "llama3",
                "factor": cfg.rope_scaling_factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        out["rope_parameters"] = rope  # transformers 5
        out["rope_scaling"] = None if rope["rope_type"] == "default" else rope  # transformers 4
    out["torch_dtype"] = out["dtype"] = "float32"  # the weights written (transformers 4 / 5 spelling)
    return out


def check_exportable(cfg: ModelConfig, arch: str, where: str) -> None:
    """Raise unless ``arch``'s HF modeling code computes what ``cfg`` describes (a flanpipe-native
    model with LayerNorm + GELU + RoPE, say, is no Llama and no GPT-2): names the model.json field."""
    if arch == "GPT2LMHeadModel":
        want = {"normalization": "LayerNorm", "position_embedding_type": "learned_absolute", "gated_linear_unit": False,
                "add_bias_linear": True, "rope_scaling_factor": None}  # fmt: skip
        acts = ("gelu_tanh", "gelu", "relu")
    else:
        want = {"normalization": "RMSNorm", "position_embedding_type": "rope", "gated_linear_unit": True}
        if arch == "Qwen2ForCausalLM":
            want |= {"add_bias_linear": False, "add_qkv_bias": True}
        else:
            want |= {"add_qkv_bias": False}
        acts = ("silu",)
    bad = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if cfg.activation not in acts:
        bad["activation"] = cfg.activation
    if bad:
        raise ValueError(f"{where}: {bad} cannot be exported as {arch} (it needs {want}, activation in {acts})")


def architecture_of(cfg: ModelConfig) -> str:
    """The HF class a flanpipe model exports as, when no imported config.json says it."""
    if cfg.position_embedding_type == "learned_absolute":
        return "GPT2LMHeadModel"
    return "Qwen2ForCausalLM" if cfg.add_qkv_bias and not cfg.add_bias_linear else "LlamaForCausalLM"


# --------------------------------------------------------------------------- layouts


def fuse_qkv(q, k, v, heads: int, groups: int, head_dim: int):  # noqa: ANN001, ANN201 - torch tensors
    """HF q [heads*hd, ...], k/v [groups*hd, ...] -> Megatron's linear_qkv, grouped per query group."""
    import torch

    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * head_dim, *rest)
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv, heads: int, groups: int, head_dim: int):  # noqa: ANN001, ANN201
    """Inverse of ``fuse_qkv``: (q, k, v)."""
    rest = qkv.shape[1:]
    per = heads // groups * head_dim
    g = qkv.reshape(groups, per + 2 * head_dim, *rest)
    q, k, v = g.split([per, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _layer_names(arch: str, prefix: str, i: int, cfg: ModelConfig) -> dict[str, list[str]]:
    """Megatron layer-local parameter -> the HF tensors it is made of (in fusion order)."""
    if arch == "GPT2LMHeadModel":
        p = f"{prefix}h.{i}."
        return {
            "input_layernorm.weight": [p + "ln_1.weight"],
            "input_layernorm.bias": [p + "ln_1.bias"],
            "self_attention.linear_qkv.weight": [p + "attn.c_attn.weight"],
            "self_attention.linear_qkv.bias": [p + "attn.c_attn.bias"],
            "self_attention.linear_proj.weight": [p + "attn.c_proj.weight"],
            "self_attention.linear_proj.bias": [p + "attn.c_proj.bias"],
            "pre_mlp_layernorm.weight": [p + "ln_2.weight"],
            "pre_mlp_layernorm.bias": [p + "ln_2.bias"],
            "mlp.linear_fc1.weight": [p + "mlp.c_fc.weight"],
            "mlp.linear_fc1.bias": [p + "mlp.c_fc.bias"],
            "mlp.linear_fc2.weight": [p + "mlp.c_proj.weight"],
            "mlp.linear_fc2.bias": [p + "mlp.c_proj.bias"],
        }
    p = f"model.layers.{i}."
    names = {
        "input_layernorm.weight": [p + "input_layernorm.weight"],
        "self_attention.linear_qkv.weight": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
        "self_attention.linear_proj.weight": [p + "self_attn.o_proj.weight"],
        "pre_mlp_layernorm.weight": [p + "post_attention_layernorm.weight"],
        "mlp.linear_fc1.weight": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        "mlp.linear_fc2.weight": [p + "mlp.down_proj.weight"],
    }
    if cfg.add_bias_linear or cfg.add_qkv_bias:
        names["self_attention.linear_qkv.bias"] = [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    if cfg.add_bias_linear:
        names["self_attention.linear_proj.bias"] = [p + "self_attn.o_proj.bias"]
        names["mlp.linear_fc1.bias"] = [p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"]
        names["mlp.linear_fc2.bias"] = [p + "mlp.down_proj.bias"]
    return names


def _hf_shapes(arch: str, names: list[str], cfg: ModelConfig) -> list[tuple[int, ...]]:
    """The shape each HF tensor must have (checked before it is read)."""
    h, f, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels
    d, g = cfg.num_attention_heads * hd, cfg.num_query_groups * hd
    out = []
    for n in names:
        leaf = n.rsplit(".", 2)[-2:]
        key = ".".join(leaf)
        if arch == "GPT2LMHeadModel":
            table = {
                "c_attn.weight": (h, 3 * h),
                "c_attn.bias": (3 * h,),
                "c_fc.weight": (h, f),
                "c_fc.bias": (f,),
                "ln_1.weight": (h,),
                "ln_1.bias": (h,),
                "ln_2.weight": (h,),
                "ln_2.bias": (h,),
            }
            if key in table:
                out.append(table[key])
            elif "attn.c_proj" in n:
                out.append((h, h) if key.endswith("weight") else (h,))
            else:  # mlp.c_proj
                out.append((f, h) if key.endswith("weight") else (h,))
            continue
        table = {
            "q_proj.weight": (d, h),
            "k_proj.weight": (g, h),
            "v_proj.weight": (g, h),
            "q_proj.bias": (d,),
            "k_proj.bias": (g,),
            "v_proj.bias": (g,),
            "o_proj.weight": (h, d),
            "o_proj.bias": (h,),
            "gate_proj.weight": (f, h),
            "up_proj.weight": (f, h),
            "down_proj.weight": (h, f),
            "gate_proj.bias": (f,),
            "up_proj.bias": (f,),
            "down_proj.bias": (h,),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
        }
        out.append(table[key])
    return out


def _to_megatron(arch: str, local: str, parts: list, cfg: ModelConfig):  # noqa: ANN001, ANN202
    """HF tensors -> one Megatron layer tensor."""
    import torch

    heads, groups, hd = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    if arch == "GPT2LMHeadModel":
        t = parts[0]
        if local.endswith("weight") and "layernorm" not in local:
            t = t.t()  # Conv1D stores [in, out]
        if local.startswith("self_attention.linear_qkv"):
            t = fuse_qkv(*t.chunk(3, dim=0), heads, groups, hd)
        return t.contiguous()
    if local.startswith("self_attention.linear_qkv"):
        return fuse_qkv(*parts, heads, groups, hd)
    if local.startswith("mlp.linear_fc1"):
        return torch.cat(parts, dim=0)
    return parts[0]


def _to_hf(arch: str, local: str, t, cfg: ModelConfig) -> list:  # noqa: ANN001
    """Inverse of ``_to_megatron``: one Megatron layer tensor -> its HF tensors."""
    import torch

    heads, groups, hd = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    if arch == "GPT2LMHeadModel":
        if local.startswith("self_attention.linear_qkv"):
            t = torch.cat(split_qkv(t, heads, groups, hd), dim=0)
        if local.endswith("weight") and "layernorm" not in local:
            t = t.t()
        return [t.contiguous()]
    if local.startswith("self_attention.linear_qkv"):
        return [x.contiguous() for x in split_qkv(t, heads, groups, hd)]
    if local.startswith("mlp.linear_fc1"):
        return [x.contiguous() for x in t.chunk(2, dim=0)]
    return [t]


def _global_names(arch: str, prefix: str, cfg: ModelConfig) -> dict[str, str]:
    """Megatron non-layer parameter -> HF tensor."""
    if arch == "GPT2LMHeadModel":
        names = {
            "embedding.word_embeddings.weight": prefix + "wte.weight",
            "embedding.position_embeddings.weight": prefix + "wpe.weight",
            "decoder.final_layernorm.weight": prefix + "ln_f.weight",
            "decoder.final_layernorm.bias": prefix + "ln_f.bias",
        }
    else:
        names = {
            "embedding.word_embeddings.weight": "model.embed_tokens.weight",
            "decoder.final_layernorm.weight": "model.norm.weight",
        }
    if not cfg.share_embeddings_and_output_weights:
        names["output_layer.weight"] = "lm_head.weight"
    return names


# --------------------------------------------------------------------------- reading


class SafetensorsReader:
    """Tensors of an HF directory by name, read one at a time with safetensors' lazy ``safe_open``.

    Each read opens the file anew: the file's mapping is dropped after every tensor, so reading a
    multi-GB shard never keeps it resident in this process.
    """

    def __init__(self, hf_dir: str | os.PathLike[str]):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFFormatError(f"{index}: missing field 'weight_map'")
            for file in sorted(set(weight_map.values())):
                if not (self.dir / file).exists():
                    raise HFFormatError(f"{index}: shard '{file}' named in weight_map is missing from {self.dir}")
            self.files = {name: self.dir / file for name, file in weight_map.items()}
        elif single.exists():
            from safetensors import safe_open

            with safe_open(single, "pt") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise HFFormatError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self.read: set[str] = set()

    def names(self) -> list[str]:
        return sorted(self.files)

    def has(self, name: str) -> bool:
        return name in self.files

    def check(self, name: str, shape: tuple[int, ...]) -> Path:
        """The file holding ``name``, after checking it is there with ``shape`` (reads the header only)."""
        from safetensors import safe_open

        if name not in self.files:
            raise HFFormatError(f"{self.dir}: tensor '{name}' not found in the checkpoint")
        path = self.files[name]
        with safe_open(path, "pt") as f:
            if name not in f.keys():
                raise HFFormatError(f"{path}: tensor '{name}' named in the index is not in this file")
            got = tuple(f.get_slice(name).get_shape())
        if got != tuple(shape):
            raise HFFormatError(f"{path}: tensor '{name}' has shape {list(got)}, expected {list(shape)}")
        return path

    def get(self, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None):  # noqa: ANN201
        """Tensor ``name`` (a torch tensor), or only its ``rows`` [start, stop) through safetensors'
        lazy ``get_slice``, after ``check`` (the error names the tensor and its file)."""
        from safetensors import safe_open

        with safe_open(self.check(name, shape), "pt") as f:
            t = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0] : rows[1]]
        self.read.add(name)
        return t


# Buffers some checkpoints carry that are no weights (recomputed by the model).
_IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq")


def read_hf_config(hf_dir: str | os.PathLike[str]) -> tuple[str, ModelConfig, dict[str, Any], str]:
    """(architecture, ModelConfig, raw config.json, tensor-name prefix) of an HF checkpoint directory."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise HFFormatError(f"{path}: not found")
    raw = json.loads(path.read_text())
    arch, cfg = model_config_from_hf(raw, path)
    prefix = ""
    if arch == "GPT2LMHeadModel":
        reader = SafetensorsReader(hf_dir)
        prefix = "transformer." if reader.has("transformer.wte.weight") else ""
    return arch, cfg, raw, prefix


def unused_tensors(reader: SafetensorsReader, arch: str, prefix: str, cfg: ModelConfig) -> list[str]:
    """HF tensors the conversion would not use (besides recomputed buffers): refusing them keeps a
    checkpoint with an unexpected extra part (a bias, a head) from being converted approximately."""
    wanted = set(_global_names(arch, prefix, cfg).values())
    for i in range(cfg.num_layers):
        for names in _layer_names(arch, prefix, i, cfg).values():
            wanted.update(names)
    return [n for n in reader.names() if n not in wanted and not n.endswith(_IGNORED_SUFFIXES)]


# --------------------------------------------------------------------------- import


def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (*TOKENIZER_FILES, "config.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def import_hf(hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> ModelConfig:
    """HF checkpoint directory -> flanpipe base model dir (model.json, checkpoint/, hf/ side files).

    One process streams the checkpoint tensor by tensor (``stream_checkpoint``); the checkpoint loads at
    any TP/PP.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    arch, cfg, _, prefix = read_hf_config(hf_dir)
    reader = SafetensorsReader(hf_dir)
    extra = unused_tensors(reader, arch, prefix, cfg)
    if extra:
        raise HFFormatError(f"{hf_dir}: tensors flanpipe's {arch} mapping does not use: {extra[:8]}")
    _check_tokenizer(hf_dir, cfg)
    if out.exists():
        if any(out.iterdir()) and not (out / "model.json").exists():
            raise ValueError(f"{out}: exists and is not an import-hf output (no model.json); not overwriting it")
        shutil.rmtree(out)
    _check_shapes(reader, arch, prefix, cfg)
    out.mkdir(parents=True)
    stream_checkpoint(hf_dir, out / "checkpoint")
    (out / "model.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    _copy_side_files(hf_dir, out / "hf")
    (out / "hf" / "architecture").write_text(arch + "\n")
    return cfg


def _check_tokenizer(hf_dir: Path, cfg: ModelConfig) -> None:
    """The tokenizer's ids must all have an embedding row."""
    from flanpipe.hf_tokenizer import load_hf_tokenizer

    try:
        tok = load_hf_tokenizer(hf_dir)
    except FileNotFoundError:
        return
    rows = cfg.tokenizer_vocab_size or cfg.vocab_size
    if tok.vocab_size > rows:
        raise HFFormatError(
            f"{tok.source}: tokenizer has {tok.vocab_size} ids but config.json vocab_size (embedding rows) is {rows}"
        )


def megatron_to_hf_tensors(state: dict[str, Any], arch: str, cfg: ModelConfig) -> Iterator[tuple[str, Any]]:
    """(HF name, tensor) for a full TP=1/PP=1 Megatron state dict; padding rows dropped."""
    prefix = "transformer." if arch == "GPT2LMHeadModel" else ""
    v = cfg.tokenizer_vocab_size or cfg.vocab_size
    for local, hf_name in _global_names(arch, prefix, cfg).items():
        t = state[local]
        if local in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = t[:v]
        yield hf_name, t.contiguous()
    for i in range(cfg.num_layers):
        for local, hf_names in _layer_names(arch, prefix, i, cfg).items():
            yield from zip(hf_names, _to_hf(arch, local, state[f"decoder.layers.{i}.{local}"], cfg), strict=True)


def write_safetensors(tensors: Iterator[tuple[str, Any]], out: Path, max_shard_bytes: int) -> list[str]:
    """Write ``model.safetensors`` or, past ``max_shard_bytes``, numbered shards plus the index."""
    from safetensors.torch import save_file

    shards: list[dict[str, Any]] = [{}]
    sizes = [0]
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards, strict=True):
        save_file(shard, str(out / file), metadata=meta)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def export_hf(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """flanpipe model dir (model.json + checkpoint/) -> an HF directory ``from_pretrained`` loads.

    Tokenizer files, generation_config.json and the original config.json's other fields come from
    ``base`` (an ``import_hf`` output dir, or an HF dir), default ``run_dir`` itself.
    """
    from flanpipe.model import load_scorer

    run, out = Path(run_dir), Path(out_dir)
    cfg = load_model_config(run / "model.json")
    side = _side_dir(Path(base) if base else run)
    base_config = json.loads((side / "config.json").read_text()) if side and (side / "config.json").exists() else None
    arch = base_config["architectures"][0] if base_config else architecture_of(cfg)
    check_exportable(cfg, arch, str(run / "model.json"))
    scorer = load_scorer(run)
    state = {k: v.detach().float() for k, v in scorer.model.state_dict().items() if not k.endswith("_extra_state")}
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(megatron_to_hf_tensors(state, arch, cfg), out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_config_from_model(cfg, arch, base_config), indent=2) + "\n")
    if side:
        for name in TOKENIZER_FILES:
            if (side / name).exists():
                shutil.copy2(side / name, out / name)
    if not (out / "generation_config.json").exists() and base_config:
        gen = {k: base_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in base_config}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def _side_dir(path: Path) -> Path | None:
    """Where the tokenizer/config side files are: ``path/hf`` (an imported base) or ``path`` itself."""
    for cand in (path / "hf", path):
        if (cand / "config.json").exists() or any((cand / n).exists() for n in TOKENIZER_FILES):
            return cand
    return None


# --------------------------------------------------------------------------- streaming writer


# The vocabulary tables are the largest tensors of most checkpoints (Llama 3 8B: 128,256 x 4,096 = 2 GiB
# in fp32 each), so they, and the layer weights whose rows map to HF rows one to one (SwiGLU halves,
# o_proj, down_proj), are written in row chunks of about this many bytes: one chunk is resident, never a
# whole tensor. QKV (grouped interleave) and GPT-2's transposed weights are built whole per item.
TABLE_CHUNK_BYTES = 32 << 20
VOCAB_TABLES = ("embedding.word_embeddings.weight", "output_layer.weight")


def _table_rows(reader: SafetensorsReader, arch: str, prefix: str, cfg: ModelConfig, name: str, rows: tuple[int, int]):  # noqa: ANN202
    """Rows [start, stop) of a vocabulary table in fp32, read as just those rows of the HF tensor; the
    padding rows past the tokenizer's vocabulary are zero (their logits are masked)."""
    import torch

    h, v = cfg.hidden_size, cfg.tokenizer_vocab_size or cfg.vocab_size
    glob = _global_names(arch, prefix, cfg)
    src = glob.get(name, glob["embedding.word_embeddings.weight"])  # tied: the embedding's table
    start, stop = rows
    t = torch.zeros(stop - start, h, dtype=torch.float32)
    if start < v:
        t[: min(stop, v) - start].copy_(reader.get(src, (v, h), rows=(start, min(stop, v))))
    return t


def _layer_sources(arch: str, prefix: str, cfg: ModelConfig, name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of the tensors a Megatron layer tensor (unsplit model's name) is built from."""
    _, _, layer, local = name.split(".", 3)
    hf_names = _layer_names(arch, prefix, int(layer), cfg)[local]
    return list(zip(hf_names, _hf_shapes(arch, hf_names, cfg), strict=True))


def _glu_rows(reader: SafetensorsReader, arch: str, prefix: str, cfg: ModelConfig, name: str, rows: tuple[int, int]):  # noqa: ANN202
    """Rows [start, stop) of a gated fc1 (``cat(gate, up)``), read as just those rows of gate and/or up:
    Megatron saves the two halves as separate items, so each reads one HF tensor, never the fused pair."""
    import torch

    (gate, shape_gate), (up, shape_up) = _layer_sources(arch, prefix, cfg, name)
    ffn, (start, stop) = shape_gate[0], rows
    pieces = []
    if start < ffn:
        pieces.append(reader.get(gate, shape_gate, rows=(start, min(stop, ffn))))
    if stop > ffn:
        pieces.append(reader.get(up, shape_up, rows=(max(start, ffn) - ffn, stop - ffn)))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _is_glu_fc1(arch: str, name: str) -> bool:
    return arch != "GPT2LMHeadModel" and name.endswith(".mlp.linear_fc1.weight")


def _is_plain_rows(arch: str, name: str) -> bool:
    """Layer weights stored row for row as in HF (Llama/Qwen2 o_proj, down_proj): any rows read directly."""
    return arch != "GPT2LMHeadModel" and name.endswith((".self_attention.linear_proj.weight", ".mlp.linear_fc2.weight"))


def _plain_rows(reader: SafetensorsReader, arch: str, prefix: str, cfg: ModelConfig, name: str, rows: tuple[int, int]):  # noqa: ANN202
    ((hf_name, shape),) = _layer_sources(arch, prefix, cfg, name)
    return reader.get(hf_name, shape, rows=rows)


def _row_reader(arch: str, name: str):  # noqa: ANN202
    """How an item of ``name`` reads only its own rows, or None (built whole: QKV, GPT-2, norms)."""
    if name in VOCAB_TABLES:
        return _table_rows
    if _is_glu_fc1(arch, name):
        return _glu_rows
    if _is_plain_rows(arch, name):
        return _plain_rows
    return None


def _megatron_tensor(reader: SafetensorsReader, arch: str, prefix: str, cfg: ModelConfig, name: str):  # noqa: ANN202
    """One Megatron state-dict tensor (unsplit model's name) that has no row reader (QKV, norms, biases,
    GPT-2's weights, position embeddings), built from its HF tensors in their own dtype: the caller casts
    only the slice it writes to fp32."""
    h = cfg.hidden_size
    glob = _global_names(arch, prefix, cfg)
    if name in glob:
        shape = (cfg.max_position_embeddings, h) if "position" in name else (h,)
        return reader.get(glob[name], shape)
    local = name.split(".", 3)[3]
    parts = [reader.get(n, shape) for n, shape in _layer_sources(arch, prefix, cfg, name)]
    return _to_megatron(arch, local, parts, cfg)


def _check_shapes(reader: SafetensorsReader, arch: str, prefix: str, cfg: ModelConfig) -> None:
    """Every HF tensor the conversion reads exists with its expected shape (only headers are read), so a
    bad checkpoint is named before anything is written."""

    h, v = cfg.hidden_size, cfg.tokenizer_vocab_size or cfg.vocab_size
    want: dict[str, tuple[int, ...]] = {}
    for local, hf_name in _global_names(arch, prefix, cfg).items():
        big = {"embedding.word_embeddings.weight": (v, h), "output_layer.weight": (v, h),
               "embedding.position_embeddings.weight": (cfg.max_position_embeddings, h)}  # fmt: skip
        want[hf_name] = big.get(local, (h,))
    for i in range(cfg.num_layers):
        for names in _layer_names(arch, prefix, i, cfg).values():
            want.update(zip(names, _hf_shapes(arch, names, cfg), strict=True))
    for name, shape in want.items():
        reader.check(name, shape)


def _return_large_frees_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB: every tensor the import allocates then lives in its own mapping
    and goes back to the OS when freed. Left dynamic, glibc raises the threshold after each freed mapping
    (up to 32 MiB), so chunks of a few MB to 32 MB land in the heap, which only shrinks from its top: the
    2 GiB bench import held 0.44 GiB beyond the interpreter that way, 0.25 GiB with the threshold fixed.
    A no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        pass


def stream_checkpoint(hf_dir: Path, ckpt_dir: Path) -> None:
    """Write the torch_dist checkpoint ``save_weights`` would write for the whole model, in this one
    process, one tensor resident at a time (see the module docstring).

    The sharded keys, global shapes and offsets come from Megatron itself: the model is built on the
    ``meta`` device (no storage) and its ``sharded_state_dict`` lists what the real saver writes. A DCP
    planner then resolves each write item by reading its HF tensors just then."""
    import io

    import torch
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    from flanpipe import megatron_compat
    from flanpipe.model import init_single_process, model_provider

    megatron_compat.quiet_warnings()
    _return_large_frees_to_the_os()
    arch, cfg, _, prefix = read_hf_config(hf_dir)
    reader = SafetensorsReader(hf_dir)
    init_single_process()
    with torch.device("meta"):
        model = model_provider(cfg, pre_process=True, post_process=True, pp=1, init_weights=False)
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    items: list[WriteItem] = []
    sources: dict[MetadataIndex, Any] = {}

    def leaves(x: Any) -> Iterator[Any]:
        if isinstance(x, dict):
            for y in x.values():
                yield from leaves(y)
        elif isinstance(x, list | tuple):
            for y in x:
                yield from leaves(y)
        else:
            yield x

    for name, entry in sharded.items():
        for leaf in leaves(entry):
            if isinstance(leaf, ShardedObject):
                idx = MetadataIndex(leaf.unique_key)  # the name Megatron's saver gives it
                buf = io.BytesIO()
                torch.save([leaf.data], buf)  # what Megatron's torch_dist saver writes for one object
                sources[idx] = buf
                items.append(WriteItem(index=idx, type=WriteItemType.BYTE_IO))
                continue
            assert isinstance(leaf, ShardedTensor), (name, type(leaf))
            pre = leaf.prepend_axis_num
            rows, rest = leaf.local_shape[0], tuple(leaf.local_shape[1:])
            # DCP stores any chunking of a tensor and loads across chunks: a tensor with a row reader
            # (vocabulary tables, row-mapped layer weights) is written as row chunks, each read on its own.
            step = rows
            if _row_reader(arch, name) is not None:
                step = max(1, TABLE_CHUNK_BYTES // (4 * math.prod(rest)))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                offsets = list(leaf.global_offset)
                offsets[pre] += r0
                sizes = torch.Size((1,) * pre + (r1 - r0, *rest))
                idx = MetadataIndex(leaf.key, torch.Size(offsets))
                row0 = leaf.global_offset[pre]
                within = (
                    slice(row0 + r0, row0 + r1),
                    *(slice(o, o + n) for o, n in zip(leaf.global_offset[pre + 1 :], rest, strict=True)),
                )
                sources[idx] = (name, within, sizes)
                props = TensorProperties(dtype=torch.float32)
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=sizes)
                data = TensorWriteData(chunk=chunk, properties=props, size=torch.Size(leaf.global_shape))
                items.append(WriteItem(index=idx, type=WriteItemType.SHARD, tensor_data=data))

    class LazyPlanner(DefaultSavePlanner):
        """Hands DCP our write items; ``resolve_data`` reads an item's HF tensors only when it is written."""

        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> Any:
            src = sources[MetadataIndex(write_item.index.fqn, write_item.index.offset)]
            if isinstance(src, io.BytesIO):
                return src
            name, within, sizes = src
            read_rows = _row_reader(arch, name)
            if read_rows is not None:  # only this chunk's rows, straight from the HF file
                rows = read_rows(reader, arch, prefix, cfg, name, (within[0].start, within[0].stop))
                return rows[(slice(None), *within[1:])].reshape(sizes).float().contiguous()
            return _megatron_tensor(reader, arch, prefix, cfg, name)[within].reshape(sizes).float().contiguous()

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    writer = dcp.FileSystemWriter(str(ckpt_dir), thread_count=1, single_file_per_rank=True)
    dcp.save({}, storage_writer=writer, planner=LazyPlanner(flatten_state_dict=False), no_dist=True)
    torch.save({}, ckpt_dir / "common.pt")  # the saver's non-sharded part: nothing for model weights
    meta = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
            "common_backend_version": 1}  # fmt: skip
    (ckpt_dir / "metadata.json").write_text(json.dumps(meta))
