"""HuggingFace checkpoint out: ``export_hf`` (flanpipe model dir -> a directory ``from_pretrained`` loads).

The tuned model is loaded whole at TP=1/PP=1 (fp32) and written as safetensors in HF's names and layout
(``hf_format``), padding rows dropped; tokenizer and generation config come from the base.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flanpipe.core.io import atomic_path
from flanpipe.core.model_config import CHECKPOINT_FILES, ModelConfig, load_model_config
from flanpipe.model.hf_format import (
    TOKENIZER_FILES,
    architecture,
    architecture_of,
    check_exportable,
    check_tokenizer,
    global_names,
    hf_config_from_model,
    layer_names,
    read_config_json,
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


# What an export writes besides the weights: anything else in an --out dir is someone else's file.
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
EXPORT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", *TOKENIZER_FILES)


def is_export_file(name: str) -> bool:
    """A file name ``export_hf`` writes (weights, shards, index, config, tokenizer and generation files)."""
    return name in EXPORT_FILES or bool(_SHARD.fullmatch(name))


def check_out_dir(out: Path, force: bool) -> None:
    """An export directory holds exactly one export. An existing one is replaced only with ``force`` (an older
    export with other sharding would leave weights ``from_pretrained`` loads instead of the new ones); a
    directory holding anything an export does not write is never touched."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; not overwriting it")
    present = sorted(p.name for p in out.iterdir())
    foreign = [n for n in present if not is_export_file(n)]
    if foreign:
        raise ValueError(
            f"{out}: holds {foreign[:8]}, which export-hf does not write: not an export-hf output, not overwriting it"
        )
    if present and not force:
        raise ValueError(
            f"{out}: holds an earlier export ({present[:6]}); pass --force to replace it (the whole directory: "
            "no file of the earlier export is kept)"
        )


def _check_run_dir(run: Path, *names: str) -> None:
    """The model dir must be a finished one: model.json, and dist_checkpointing's files under checkpoint/."""
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: model dir not found (model.json + checkpoint/, e.g. results/models/RUN)")
    missing = [n for n in names if not (run / n).exists()]
    if missing:
        raise FileNotFoundError(f"{run}: not a finished model dir, it lacks {missing} (model.json + checkpoint/)")


def _base_side_dir(base: Path, cfg: ModelConfig, run: Path) -> Path:
    """``--base``'s side files (``base/hf`` of an import, or an HF dir): it must exist and hold them, and its
    tokenizer must give no id past the model's rows, as import checks."""
    if not base.is_dir():
        raise FileNotFoundError(f"--base {base}: not found (an import-hf output dir, or an HF checkpoint dir)")
    side = _side_dir(base)
    if side is None:
        raise ValueError(
            f"--base {base}: holds no config.json or tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) "
            f"nor an hf/ dir with them; point it at the import-hf output the run was tuned from"
        )
    check_tokenizer(side, cfg, where=f"the embedding rows of {run / 'model.json'}")
    return side


def export_hf(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = 5 * 2**30,
    force: bool = False,
) -> Path:
    """flanpipe model dir (model.json + checkpoint/) -> an HF directory ``from_pretrained`` loads.

    Tokenizer files, generation_config.json and the original config.json's other fields come from
    ``base`` (an ``import_hf`` output dir, or an HF dir), default ``run_dir`` itself. Written into a temporary
    sibling and renamed into place whole, so a failed export leaves nothing and a replaced one (``force``)
    leaves no file of the old one.
    """
    from flanpipe.model.gpt import load_scorer

    run, out = Path(run_dir), Path(out_dir)
    if max_shard_bytes <= 0:
        raise ValueError(f"max shard size must be positive, got {max_shard_bytes} bytes")
    _check_run_dir(run, "model.json")
    check_out_dir(out, force)
    cfg = load_model_config(run / "model.json")
    side = _base_side_dir(Path(base), cfg, run) if base else _side_dir(run)
    base_config = read_config_json(side / "config.json") if side and (side / "config.json").exists() else None
    arch = architecture(base_config, side / "config.json") if side and base_config else architecture_of(cfg)
    check_exportable(cfg, arch, str(run / "model.json"))
    _check_run_dir(run, *(f"checkpoint/{n}" for n in CHECKPOINT_FILES))
    scorer = load_scorer(run)
    state = {k: v.detach().float() for k, v in scorer.model.state_dict().items() if not k.endswith("_extra_state")}
    with atomic_path(out, directory=True) as tmp:
        write_safetensors(megatron_to_hf_tensors(state, arch, cfg), tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config_from_model(cfg, arch, base_config), indent=2) + "\n")
        if side:
            for name in TOKENIZER_FILES:
                if (side / name).exists():
                    shutil.copy2(side / name, tmp / name)
        if not (tmp / "generation_config.json").exists() and base_config:
            gen = {k: base_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in base_config}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def _side_dir(path: Path) -> Path | None:
    """Where the tokenizer/config side files are: ``path/hf`` (an imported base) or ``path`` itself."""
    for cand in (path / "hf", path):
        if (cand / "config.json").exists() or any((cand / n).exists() for n in TOKENIZER_FILES):
            return cand
    return None
