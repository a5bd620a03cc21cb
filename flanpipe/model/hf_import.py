"""HuggingFace checkpoint in: ``import_hf`` (HF dir -> model.json + checkpoint/ + hf/ side files).

The format's facts (names, shapes, QKV/SwiGLU/Conv1D layouts, vocabulary padding) are ``hf_format``'s.

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

from flanpipe.core import heap
from flanpipe.core.io import atomic_path
from flanpipe.core.model_config import ModelConfig
from flanpipe.model.hf_format import (
    TOKENIZER_FILES,
    SafetensorsReader,
    check_hf_checkpoint,
    check_tokenizer,
    global_names,
    hf_shapes,
    layer_names,
    read_hf_config,
    to_megatron,
)


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
    arch, cfg, _, prefix = check_hf_checkpoint(hf_dir)  # headers only: nothing is written for a bad checkpoint
    check_tokenizer(hf_dir, cfg)
    if out.exists() and any(out.iterdir()) and not (out / "model.json").exists():
        raise ValueError(f"{out}: exists and is not an import-hf output (no model.json); not overwriting it")
    # written beside and renamed into place whole: a killed import leaves no checkpoint without model.json
    # (which a rerun would refuse as foreign) and replaces an earlier import only once it is complete
    with atomic_path(out, directory=True) as tmp:
        stream_checkpoint(hf_dir, tmp / "checkpoint")
        (tmp / "model.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        _copy_side_files(hf_dir, tmp / "hf")
        (tmp / "hf" / "architecture").write_text(arch + "\n")
    return cfg


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
    glob = global_names(arch, prefix, cfg)
    src = glob.get(name, glob["embedding.word_embeddings.weight"])  # tied: the embedding's table
    start, stop = rows
    t = torch.zeros(stop - start, h, dtype=torch.float32)
    if start < v:
        t[: min(stop, v) - start].copy_(reader.get(src, (v, h), rows=(start, min(stop, v))))
    return t


def _layer_sources(arch: str, prefix: str, cfg: ModelConfig, name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of the tensors a Megatron layer tensor (unsplit model's name) is built from."""
    _, _, layer, local = name.split(".", 3)
    hf_names = layer_names(arch, prefix, int(layer), cfg)[local]
    return list(zip(hf_names, hf_shapes(arch, hf_names, cfg), strict=True))


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
    glob = global_names(arch, prefix, cfg)
    if name in glob:
        shape = (cfg.max_position_embeddings, h) if "position" in name else (h,)
        return reader.get(glob[name], shape)
    local = name.split(".", 3)[3]
    parts = [reader.get(n, shape) for n, shape in _layer_sources(arch, prefix, cfg, name)]
    return to_megatron(arch, local, parts, cfg)


def stream_checkpoint(hf_dir: Path, ckpt_dir: Path) -> None:
    """Write the torch_dist checkpoint ``save_weights`` would write for the whole model, in this one
    process, one tensor resident at a time (see the module docstring).

    The sharded keys, global shapes and offsets come from Megatron itself: the model is built on the
    ``meta`` device (no storage) and its ``sharded_state_dict`` lists what the real saver writes. A DCP
    planner then resolves each write item by reading its HF tensors just then. Long because the planner and
    the storage-writer shims are closures over this call's reader and model: moved out, they would need the
    same state threaded through DCP's planner interface."""
    import io

    import torch
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    from flanpipe.model import megatron_compat
    from flanpipe.model.gpt import init_single_process, model_provider

    megatron_compat.quiet_warnings()
    heap.return_large_frees_to_the_os()  # one tensor at a time: give each back when freed
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
