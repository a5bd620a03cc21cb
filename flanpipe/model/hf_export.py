"""HuggingFace checkpoint out: ``export_hf`` (flanpipe model dir -> a directory ``from_pretrained`` loads).

The tuned model is loaded whole at TP=1/PP=1 (fp32) and written as safetensors in HF's names and layout
(``hf_format``), padding rows dropped; tokenizer and generation config come from the base.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flanpipe.core.model_config import ModelConfig, load_model_config
from flanpipe.model.hf_format import (
    TOKENIZER_FILES,
    architecture_of,
    check_exportable,
    global_names,
    hf_config_from_model,
    layer_names,
    to_hf,
)


def megatron_to_hf_tensors(state: dict[str, Any], arch: str, cfg: ModelConfig) -> Iterator[tuple[str, Any]]:
    """(HF name, tensor) for a full TP=1/PP=1 Megatron state dict; padding rows dropped."""
    prefix = "transformer." if arch == "GPT2LMHeadModel" else ""
    v = cfg.tokenizer_vocab_size or cfg.vocab_size
    for local, hf_name in global_names(arch, prefix, cfg).items():
        t = state[local]
        if local in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = t[:v]
        yield hf_name, t.contiguous()
    for i in range(cfg.num_layers):
        for local, hf_names in layer_names(arch, prefix, i, cfg).items():
            yield from zip(hf_names, to_hf(arch, local, state[f"decoder.layers.{i}.{local}"], cfg), strict=True)


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
    from flanpipe.model.gpt import load_scorer

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
