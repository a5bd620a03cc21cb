"""Peak memory of ``flanpipe import-hf`` against the size of the checkpoint it converts.

Writes a Llama-shaped checkpoint of random bf16 weights straight with safetensors (one shard per
layer plus an index: no transformers model is ever materialised), imports it in one child process, and
reports that process's peak RSS beside the checkpoint's bytes on disk, and beside the peak RSS of a child
that only loads what the import loads (interpreter, torch, Megatron, flanpipe.model.hf_import): the difference is
what the conversion itself holds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def write_random_llama(out: Path, *, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> int:
    """A sharded bf16 Llama checkpoint of random weights; returns its bytes of tensors."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    hd = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": rand(vocab, hidden)},
        {"lm_head.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)},
    ]
    weight_map, total = {}, 0
    n_files = layers + len(shards)
    for i in range(n_files):
        if i < len(shards):
            shard = shards[i]
        else:
            p = f"model.layers.{i - len(shards)}."
            shard = {
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "self_attn.q_proj.weight": rand(heads * hd, hidden),
                p + "self_attn.k_proj.weight": rand(kv_heads * hd, hidden),
                p + "self_attn.v_proj.weight": rand(kv_heads * hd, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, heads * hd),
                p + "mlp.gate_proj.weight": rand(ffn, hidden),
                p + "mlp.up_proj.weight": rand(ffn, hidden),
                p + "mlp.down_proj.weight": rand(hidden, ffn),
            }
        name = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
        shard.clear()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


LOAD_ONLY = (
    "import torch, torch.distributed.checkpoint; import megatron.core.dist_checkpointing.mapping; "
    "import flanpipe.model.hf_import, flanpipe.model.gpt; flanpipe.model.gpt.init_single_process()"
)
# The child reports its own high-water mark. VmHWM belongs to the process's address space, which exec
# replaces; ru_maxrss (getrusage of self or of children) would also count the pages the child shared
# with this parent between fork and exec -- the generator's gigabytes.
REPORT_HWM = "; print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"


def _child_peak(code: str, *args: str) -> tuple[int, float]:
    """Peak RSS (bytes) and wall seconds of ``python -c code args`` in a fresh interpreter."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code + REPORT_HWM, *args], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024, time.perf_counter() - start  # kB


def run(
    *, layers: int = 20, hidden: int = 2048, heads: int = 16, kv_heads: int = 8, ffn: int = 5632,
    vocab: int = 32000, workdir: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Generate, import, measure; the work dir is removed unless given."""
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench_import_hf_"))
    try:
        size = write_random_llama(
            root / "hf", layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn, vocab=vocab
        )
        files = sum(p.stat().st_size for p in (root / "hf").glob("*.safetensors"))
        # A fresh interpreter, so that its peak RSS is the import's alone, not the generator's; it counts
        # the interpreter, torch and Megatron themselves (the baseline below measures those).
        code = "import sys; from flanpipe.model.hf_import import import_hf; import_hf(sys.argv[1], sys.argv[2])"
        peak, seconds = _child_peak(code, str(root / "hf"), str(root / "base"))
        out_bytes = sum(p.stat().st_size for p in (root / "base" / "checkpoint").rglob("*") if p.is_file())
        # The same imports, nothing converted: what any process that runs Megatron pays.
        baseline, _ = _child_peak(LOAD_ONLY)
        return {
            "checkpoint_bytes": files,
            "tensor_bytes": size,
            "converted_fp32_bytes": out_bytes,
            "peak_rss_bytes": peak,
            "peak_rss_fraction_of_checkpoint": peak / files,
            "baseline_rss_bytes": baseline,
            "conversion_rss_bytes": peak - baseline,
            "conversion_rss_fraction_of_checkpoint": (peak - baseline) / files,
            "seconds": seconds,
        }
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)


def main(as_json: bool = False, **shape: int) -> None:
    result = run(**shape)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    gib = 2**30
    print(
        f"checkpoint {result['checkpoint_bytes'] / gib:.2f} GiB bf16 -> {result['converted_fp32_bytes'] / gib:.2f} GiB "
        f"fp32 dist checkpoint in {result['seconds']:.0f} s in one process; peak RSS "
        f"{result['peak_rss_bytes'] / gib:.2f} GiB ({100 * result['peak_rss_fraction_of_checkpoint']:.0f}% of the "
        f"checkpoint), of which {result['baseline_rss_bytes'] / gib:.2f} GiB is the interpreter with torch and "
        f"Megatron loaded: the conversion holds {result['conversion_rss_bytes'] / gib:.2f} GiB "
        f"({100 * result['conversion_rss_fraction_of_checkpoint']:.0f}%)"
    )
