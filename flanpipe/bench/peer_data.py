"""The data bench's peer: tokenize + pack the same mixture as a Hugging Face user would.

    flanpipe bench data --peer

The peer is what the HF stack's documentation leads to: ``datasets.Dataset.from_parquet``, a batched
``map`` that encodes with the same SentencePiece model under the same truncation rule (inputs cut to
``inputs_length``, targets to ``targets_length - 1`` plus EOS, a completion mask for the loss), then
TRL's best-fit-decreasing ``pack_dataset(..., strategy="bfd")`` into rows of ``pack_length``.
flanpipe's side is rule pack's two calls (``encode_parquet``, ``pack_to_indexed_dataset``).

Each side runs in a fresh interpreter so that its peak RSS (Linux VmHWM) is its own, and both get
the whole machine. Packing efficiency = tokens / (rows x pack_length) on both sides.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PEER_PACKAGES = ("datasets", "trl")


def missing_peer_packages(packages: tuple[str, ...] = PEER_PACKAGES) -> list[str]:
    """The peer's packages that are not installed (``pip install 'flanpipe[bench]'`` brings them)."""
    return [p for p in packages if importlib.util.find_spec(p) is None]


def _high_water_mb() -> float:
    """This process's own peak RSS in MB (VmHWM belongs to this address space, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flanpipe_side(a: dict[str, Any]) -> dict[str, Any]:
    """Rule pack's path: encode the mixture on every core, BFD-pack, write the IndexedDatasets."""
    from flanpipe.data.packing import pack_to_indexed_dataset
    from flanpipe.data.tokenize import encode_parquet, open_tokenizer

    t0, c0 = time.perf_counter(), time.process_time()
    sp = open_tokenizer(a["tokenizer"])
    encoded = encode_parquet(sp, a["mixture"], a["inputs_length"], a["targets_length"], os.cpu_count())
    packed = pack_to_indexed_dataset(encoded, a["pack_length"], Path(a["out"]), order_seed=0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = int(encoded.offsets[-1])
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),  # all threads: on a loaded machine wall time grows, CPU time much less
        "examples": len(encoded),
        "tokens": tokens,
        "rows": int(packed["rows"]),
        "packing_efficiency": round(tokens / (packed["rows"] * a["pack_length"]), 5),
    }


def hf_side(a: dict[str, Any]) -> dict[str, Any]:
    """What a datasets + TRL user writes: map-tokenize, then ``trl.pack_dataset(strategy="bfd")``."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import sentencepiece as spm
    from datasets import Dataset
    from trl import pack_dataset

    t0, c0 = time.perf_counter(), time.process_time()
    sp = spm.SentencePieceProcessor(model_file=a["tokenizer"])
    eos, n_in, n_tg = sp.eos_id(), a["inputs_length"], a["targets_length"]

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ins = sp.encode(batch["inputs"], out_type=int)
        tgs = sp.encode(batch["targets"], out_type=int)
        ids, masks = [], []
        for i, t in zip(ins, tgs, strict=True):
            i, t = i[:n_in], t[: n_tg - 1] + [eos]
            ids.append(i + t)
            masks.append([0] * len(i) + [1] * len(t))
        return {"input_ids": ids, "completion_mask": masks}

    ds = Dataset.from_parquet(a["mixture"], columns=["inputs", "targets"], cache_dir=a["cache"])
    ds = ds.map(tokenize, batched=True, remove_columns=["inputs", "targets"])
    packed = pack_dataset(ds, a["pack_length"], strategy="bfd")
    packed.save_to_disk(a["out"])  # flanpipe's side writes its rows too
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(x) for x in ds["input_ids"])  # after the clock: not part of the user's job
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "examples": len(ds),
        "tokens": tokens,
        "rows": len(packed),
        "packing_efficiency": round(tokens / (len(packed) * a["pack_length"]), 5),
    }


def child(argv: list[str]) -> None:
    """Child-process entry: run one side, print its figures and its own peak RSS as JSON."""
    side, args = argv[0], json.loads(argv[1])
    out = {"flanpipe": flanpipe_side, "hf": hf_side}[side](args)
    print(json.dumps({**out, "peak_rss_mb": round(_high_water_mb(), 1)}))


def run_side(side: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run ``side`` ("flanpipe" or "hf") in a fresh interpreter; return its JSON figures."""
    code = "import sys; from flanpipe.bench.peer_data import child; child(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", code, side, json.dumps(args)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"peer bench side {side!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(
    mixture: Path, tokenizer: Path, work: Path, *, inputs_length: int, targets_length: int, pack_length: int
) -> dict[str, Any]:
    """Both sides on the same mixture and tokenizer, one after the other; speed and memory ratios."""
    base = {
        "mixture": str(mixture),
        "tokenizer": str(tokenizer),
        "inputs_length": inputs_length,
        "targets_length": targets_length,
        "pack_length": pack_length,
    }
    ours = run_side("flanpipe", {**base, "out": str(work / "peer" / "flanpipe")})
    hf = run_side("hf", {**base, "out": str(work / "peer" / "hf"), "cache": str(work / "peer" / "hf_cache")})
    return {
        "flanpipe": ours,
        "hf_datasets_trl_bfd": hf,
        "speedup": round(hf["wall_s"] / ours["wall_s"], 2),
        "cpu_ratio_hf_over_flanpipe": round(hf["cpu_s"] / max(ours["cpu_s"], 1e-9), 2),
        "peak_rss_ratio_hf_over_flanpipe": round(hf["peak_rss_mb"] / ours["peak_rss_mb"], 2),
        "same_tokens": ours["tokens"] == hf["tokens"],
    }
