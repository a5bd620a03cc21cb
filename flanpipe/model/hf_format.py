"""HuggingFace checkpoint format, shared by ``hf_import`` and ``hf_export``: config.json <-> ``ModelConfig``,
tensor names and shapes per architecture, the layout conversions, and a lazy safetensors reader.

Torch-free at import (the plan reads ``config.json`` through ``model_config_from_hf`` and checks headers
with ``SafetensorsReader``); torch is imported only inside the tensor conversions.

The layouts (see /work/shared/notes/hf-megatron.md):
- QKV: Megatron's ``linear_qkv`` is grouped per query group (its heads' queries, then its key, then its
  value head); HF keeps q, k, v apart (GPT-2: one ``c_attn``, q|k|v concatenated). ``fuse_qkv`` /
  ``split_qkv`` are the one place this is written.
- SwiGLU: Megatron's gated fc1 is ``cat(gate, up)`` (it computes ``act(first half) * second half``).
- GPT-2's Conv1D weights are stored ``[in, out]``: transposed here.
- The vocabulary is padded to a multiple of ``VOCAB_MULTIPLE`` rows (Megatron's practice: every power-of-two
  TP size up to 128 divides it); ``ModelConfig.tokenizer_vocab_size`` keeps the real size and the model
  masks the padding logits to -inf, so the padded model predicts and scores exactly as the original.

"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from flanpipe.core.io import read_json_object
from flanpipe.core.model_config import ModelConfig, load_model_config

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


def read_config_json(path: Path) -> dict[str, Any]:
    """An HF ``config.json`` as a dict; a broken one names itself."""
    return read_json_object(path, HFFormatError)


def load_model_file(path: str | os.PathLike[str]) -> ModelConfig:
    """Any model file a config may name: flanpipe's YAML / model.json, or an HF checkpoint's ``config.json``
    (base.hf), converted here so that the plan reads it like a YAML (torch-free)."""
    if Path(path).name == "config.json":
        return model_config_from_hf(read_config_json(Path(path)), Path(path))[1]
    return load_model_config(path)


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


def layer_names(arch: str, prefix: str, i: int, cfg: ModelConfig) -> dict[str, list[str]]:
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


def hf_shapes(arch: str, names: list[str], cfg: ModelConfig) -> list[tuple[int, ...]]:
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


def to_megatron(arch: str, local: str, parts: list, cfg: ModelConfig):  # noqa: ANN001, ANN202
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


def to_hf(arch: str, local: str, t, cfg: ModelConfig) -> list:  # noqa: ANN001
    """Inverse of ``to_megatron``: one Megatron layer tensor -> its HF tensors."""
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


def global_names(arch: str, prefix: str, cfg: ModelConfig) -> dict[str, str]:
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


# bytes per element of each safetensors dtype (the format's own names)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one ``.safetensors`` file, from its header alone (torch-free, a few KB read).

    The format: an 8-byte little-endian header size, a JSON header giving each tensor's dtype, shape and
    byte range, then the data. The file must end exactly where the last range ends, so a truncated or
    half-written file (a copy cut short) is named here, not deep inside a conversion job."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 0 < n <= size - 8:
                raise HFFormatError(f"{path}: not a safetensors file (truncated or empty: {size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        if isinstance(e, HFFormatError):
            raise
        raise HFFormatError(f"{path}: unreadable safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise HFFormatError(f"{path}: unreadable safetensors header: not a JSON object")
    shapes: dict[str, tuple[int, ...]] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (begin, stop) = tuple(int(x) for x in entry["shape"]), entry["data_offsets"]
            itemsize = _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise HFFormatError(f"{path}: tensor '{name}' has a malformed header entry {entry!r}") from None
        if stop - begin != itemsize * math.prod(shape):
            raise HFFormatError(f"{path}: tensor '{name}' spans {stop - begin} bytes, not {shape} x {itemsize}")
        shapes[name], end = shape, max(end, stop)
    if size != 8 + n + end:
        raise HFFormatError(
            f"{path}: truncated or half-written: the header says {8 + n + end} bytes, the file has {size} "
            "(copy it again)"
        )
    return shapes


def _weights_hint(directory: Path) -> str:
    """What a directory without safetensors holds instead, and how to convert it."""
    other = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".h5", ".msgpack"))
    if not other:
        return ""
    return (
        f" (it holds {other[:4]}: flanpipe reads safetensors only; convert once with transformers: "
        "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True))"
    )


class SafetensorsReader:
    """Tensors of an HF directory by name, read one at a time with safetensors' lazy ``safe_open``.

    Opening reads only the headers (``read_safetensors_header``: torch-free, so planning checks a checkpoint
    with it). Each tensor read opens its file anew: the file's mapping is dropped after every tensor, so
    reading a multi-GB shard never keeps it resident in this process.
    """

    def __init__(self, hf_dir: str | os.PathLike[str]):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        self.shapes: dict[str, tuple[int, ...]] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map")
            except (ValueError, AttributeError) as e:
                raise HFFormatError(f"{index}: not a safetensors index: {e}") from None
            if not isinstance(weight_map, dict):
                raise HFFormatError(f"{index}: missing field 'weight_map'")
            headers = {}
            for file in sorted(set(weight_map.values())):
                if not (self.dir / file).exists():
                    raise HFFormatError(f"{index}: shard '{file}' named in weight_map is missing from {self.dir}")
                headers[file] = read_safetensors_header(self.dir / file)
            for name, file in weight_map.items():
                if name not in headers[file]:
                    raise HFFormatError(f"{self.dir / file}: tensor '{name}' named in {index.name} is not in this file")
                self.shapes[name] = headers[file][name]
            self.files = {name: self.dir / file for name, file in weight_map.items()}
        elif single.exists():
            self.shapes = read_safetensors_header(single)
            self.files = dict.fromkeys(self.shapes, single)
        else:
            hint = _weights_hint(self.dir)
            raise HFFormatError(f"{self.dir}: no model.safetensors or model.safetensors.index.json{hint}")
        self.read: set[str] = set()

    def names(self) -> list[str]:
        return sorted(self.files)

    def has(self, name: str) -> bool:
        return name in self.files

    def check(self, name: str, shape: tuple[int, ...]) -> Path:
        """The file holding ``name``, after checking it is there with ``shape`` (from the header)."""
        if name not in self.files:
            raise HFFormatError(f"{self.dir}: tensor '{name}' not found in the checkpoint")
        path = self.files[name]
        if self.shapes[name] != tuple(shape):
            raise HFFormatError(f"{path}: tensor '{name}' has shape {list(self.shapes[name])}, expected {list(shape)}")
        return path

    def get(self, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None):  # noqa: ANN201
        """Tensor ``name`` (a torch tensor), or only its ``rows`` [start, stop) through safetensors'
        lazy ``get_slice``, after ``check`` (the error names the tensor and its file)."""
        from safetensors import SafetensorError, safe_open

        path = self.check(name, shape)
        try:
            with safe_open(path, "pt") as f:
                t = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0] : rows[1]]
        except SafetensorError as e:  # changed under us since the header was read
            raise HFFormatError(f"{path}: tensor '{name}' cannot be read: {e}") from None
        self.read.add(name)
        return t


# Buffers some checkpoints carry that are no weights (recomputed by the model).
_IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq")


def read_hf_config(hf_dir: str | os.PathLike[str]) -> tuple[str, ModelConfig, dict[str, Any], str]:
    """(architecture, ModelConfig, raw config.json, tensor-name prefix) of an HF checkpoint directory."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise HFFormatError(f"{path}: not found")
    raw = read_config_json(path)
    arch, cfg = model_config_from_hf(raw, path)
    prefix = ""
    if arch == "GPT2LMHeadModel":
        reader = SafetensorsReader(hf_dir)
        prefix = "transformer." if reader.has("transformer.wte.weight") else ""
    return arch, cfg, raw, prefix


def unused_tensors(reader: SafetensorsReader, arch: str, prefix: str, cfg: ModelConfig) -> list[str]:
    """HF tensors the conversion would not use (besides recomputed buffers): refusing them keeps a
    checkpoint with an unexpected extra part (a bias, a head) from being converted approximately."""
    wanted = set(global_names(arch, prefix, cfg).values())
    for i in range(cfg.num_layers):
        for names in layer_names(arch, prefix, i, cfg).values():
            wanted.update(names)
    return [n for n in reader.names() if n not in wanted and not n.endswith(_IGNORED_SUFFIXES)]


def expected_shapes(arch: str, prefix: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the conversion reads, with the shape config.json implies."""
    h, v = cfg.hidden_size, cfg.tokenizer_vocab_size or cfg.vocab_size
    want: dict[str, tuple[int, ...]] = {}
    for local, hf_name in global_names(arch, prefix, cfg).items():
        big = {"embedding.word_embeddings.weight": (v, h), "output_layer.weight": (v, h),
               "embedding.position_embeddings.weight": (cfg.max_position_embeddings, h)}  # fmt: skip
        want[hf_name] = big.get(local, (h,))
    for i in range(cfg.num_layers):
        for names in layer_names(arch, prefix, i, cfg).values():
            want.update(zip(names, hf_shapes(arch, names, cfg), strict=True))
    return want


def check_hf_checkpoint(hf_dir: str | os.PathLike[str]) -> tuple[str, ModelConfig, dict[str, Any], str]:
    """``read_hf_config`` plus every weight check that needs only the headers: each file whole (not truncated),
    every tensor the conversion reads present with its shape, no tensor it would leave unused, the output layer
    as ``tie_word_embeddings`` says. Torch-free and cheap (headers only), so planning runs it for base.hf and
    the import job runs it again before writing anything."""
    arch, cfg, raw, prefix = read_hf_config(hf_dir)
    reader = SafetensorsReader(hf_dir)
    tied = cfg.share_embeddings_and_output_weights
    if arch != "GPT2LMHeadModel" and reader.has("lm_head.weight") == tied:
        state = "true" if tied else "false (or unset)"
        has = "has" if tied else "has no"
        raise HFFormatError(
            f"{Path(hf_dir) / 'config.json'}: tie_word_embeddings is {state} but the checkpoint {has} "
            "lm_head.weight: the output layer would be converted wrong; fix tie_word_embeddings in config.json"
        )
    extra = unused_tensors(reader, arch, prefix, cfg)
    if extra:
        raise HFFormatError(f"{hf_dir}: tensors flanpipe's {arch} mapping does not use: {extra[:8]}")
    for name, shape in expected_shapes(arch, prefix, cfg).items():
        reader.check(name, shape)
    return arch, cfg, raw, prefix


def check_tokenizer(hf_dir: Path, cfg: ModelConfig, where: str = "config.json vocab_size (embedding rows)") -> None:
    """A checkpoint directory's tokenizer (if it has one) must load, name special tokens it has, and give
    no id past the model's embedding rows (``where`` says whose rows, for the message)."""
    from flanpipe.data.hf_tokenizer import load_hf_tokenizer

    try:
        tok = load_hf_tokenizer(hf_dir)
    except FileNotFoundError:
        return
    except ValueError as e:
        raise HFFormatError(str(e)) from None
    rows = cfg.tokenizer_vocab_size or cfg.vocab_size
    if tok.vocab_size > rows:
        raise HFFormatError(f"{tok.source}: tokenizer has {tok.vocab_size} ids but {where} is {rows}")
