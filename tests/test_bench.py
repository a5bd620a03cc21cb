"""`flanpipe bench data`: the JSON it prints is complete and self-consistent; the workload is FLAN-shaped.

No timing asserts: on a shared CI machine they measure the neighbours, not the code.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from flanpipe.bench import data as bench
from flanpipe.cli import main
from flanpipe.data.templates import load_templates, validate_templates

REQUIRED = {
    "examples",
    "tokens",
    "render_examples_per_s",
    "mix_s",
    "tokenize_tokens_per_s",
    "pack_s",
    "packing_efficiency",
    "baseline_next_fit_efficiency",
    "baseline_padded_efficiency",
    "peak_rss_mb",
    "wall_s",
    "stage_s",
}
STAGES = {"generate", "render", "mix", "tokenizer_train", "tokenize", "pack"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One tiny run through the CLI, as a user would start it; the workdir is kept for inspection."""
    work = tmp_path_factory.mktemp("bench")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["bench", "data", "--json", "--scale", "0.005", "--workdir", str(work)])
    lines = [line for line in buf.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1, "--json prints exactly one JSON object"
    return json.loads(lines[0]), work


def test_json_keys_and_counts(run: tuple[dict, Path]) -> None:
    stats, _ = run
    assert REQUIRED <= set(stats)
    assert STAGES <= set(stats["stage_s"])
    assert stats["datasets"] == 62 and stats["clusters"] == 12
    assert stats["examples"] > 0 and stats["tokens"] > stats["examples"]
    # the mixture is sized to at least scale x 1M examples
    assert stats["examples"] >= round(1_000_000 * stats["scale"])
    assert stats["raw_examples"] >= stats["capped_examples"] > 0
    assert stats["peak_rss_mb"] > 0 and stats["wall_s"] > 0


def test_efficiencies_are_ordered(run: tuple[dict, Path]) -> None:
    stats, _ = run
    keys = ("packing_efficiency", "baseline_next_fit_efficiency", "baseline_padded_efficiency")
    best, nf, pad = (stats[k] for k in keys)
    for e in (best, nf, pad):
        assert 0 < e <= 1
    assert best >= nf >= pad


def test_packed_output_matches_stats(run: tuple[dict, Path]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    stats, work = run
    packed = work / "packed" / "bench"
    info = json.loads((packed / "packing.json").read_text())
    assert info["examples"] == stats["examples"] and info["real_tokens"] == stats["tokens"]
    tokens, segments = IndexedDataset(str(packed / "tokens")), IndexedDataset(str(packed / "segments"))
    assert len(tokens) == len(segments) == stats["rows"]
    row, seg = np.asarray(tokens[0]), np.asarray(segments[0])
    assert row.shape == seg.shape == (stats["pack_length"],)
    assert seg[0] == 1 and (row[seg == 0] == 0).all()  # a row starts with example 1; padding is pad id 0


def test_every_profile_has_valid_templates(tmp_path: Path) -> None:
    for p in bench.PROFILES:
        path = tmp_path / f"{p.name}.yaml"
        path.write_text(yaml.safe_dump({"templates": bench.templates_for(p)}))
        spec = bench.profile_dataset_spec(p, tmp_path, path)
        validate_templates(load_templates(path), spec, path)


def test_scale_one_workload_is_flan_sized() -> None:
    """At scale 1.0 the capped total is >= 1M (so the mixture is not mostly repeats) and the cap bites."""
    cfg = bench.BenchConfig()
    sizes = [cfg.raw_size(p) for p in bench.PROFILES]
    assert len(bench.PROFILES) == 62 and len({p.name for p in bench.PROFILES}) == 62
    assert sum(min(n, cfg.cap) for n in sizes) >= 1_000_000
    assert sum(n > cfg.cap for n in sizes) >= 20


def test_generation_is_deterministic_and_shaped() -> None:
    rng = np.random.default_rng(0)
    english = bench.make_lexicon(rng, 2_000, bench.ENGLISH, bench.ENGLISH_FREQ)
    foreign = bench.make_lexicon(rng, 2_000, bench.FOREIGN, bench.FOREIGN_FREQ)
    profile = next(p for p in bench.PROFILES if p.name == "hellaswag")
    a = bench.synth_chunk(profile, english, foreign, np.random.default_rng(1), 0, 500)
    b = bench.synth_chunk(profile, english, foreign, np.random.default_rng(1), 0, 500)
    assert a.equals(b)
    assert a.column_names == ["example_id", "context", "choices", "answer"]
    # the answer is one of the example's own choices
    choices, answers = a["choices"].to_pylist(), a["answer"].to_pylist()
    assert all(ans in ch and len(ch) == 4 for ch, ans in zip(choices, answers, strict=True))
    # mean context length is near the profile's 35 words
    words = np.array([len(t.split(" ")) for t in a["context"].to_pylist()])
    assert 28 < words.mean() < 42


def test_mix_scaling_check_runs_each_size_in_its_own_process(run: tuple[dict, Path]) -> None:
    stats, work = run
    by_factor = {m["factor"]: m for m in stats["mix_scaling"]}
    assert set(by_factor) == {1, 4}
    # the x1 child redoes the measured mix: same size; x4 draws four times as many (epochs past the caps)
    assert by_factor[1]["examples"] == stats["examples"]
    assert abs(by_factor[4]["examples"] / by_factor[1]["examples"] - 4) < 0.01
    assert all(m["peak_rss_mb"] > 0 and m["shuffle_buckets"] >= 1 for m in by_factor.values())
    assert not list((work / "mixtures").glob("scaling_*")), "the check's mixtures are removed"


def test_peer_tokenize_and_pack_same_mixture(run: tuple[dict, Path]) -> None:
    """``bench data --peer``'s comparison on the kept workdir: datasets map + TRL bfd vs flanpipe, same tokens."""
    pytest.importorskip("trl", reason="the peer needs TRL: pip install 'flanpipe[bench]'")
    from flanpipe.bench.peer_data import compare

    stats, work = run
    cfg = stats["config"]
    p = compare(
        work / "mixtures" / "bench" / "mixture.parquet",
        work / "tokenizer" / "spm.model",
        work,
        inputs_length=cfg["inputs_length"],
        targets_length=cfg["targets_length"],
        pack_length=cfg["pack_length"],
    )
    ours, hf = p["flanpipe"], p["hf_datasets_trl_bfd"]
    # same SentencePiece model, same truncation + EOS rule: identical token counts, every example kept
    assert p["same_tokens"] and ours["tokens"] == hf["tokens"] == stats["tokens"]
    assert ours["examples"] == hf["examples"] == stats["examples"]
    for side in (ours, hf):
        fill = side["tokens"] / (side["rows"] * cfg["pack_length"])
        assert side["packing_efficiency"] == pytest.approx(fill, abs=1e-5)
        assert side["wall_s"] > 0 and side["peak_rss_mb"] > 0
    assert ours["rows"] == stats["rows"]
    assert ours["packing_efficiency"] >= hf["packing_efficiency"]  # equal or better packing, never worse
    assert p["speedup"] == pytest.approx(hf["wall_s"] / ours["wall_s"], rel=0.01)


@pytest.mark.parametrize("command", [["bench", "data", "--scale", "0.005"], ["bench", "train"], ["bench", "eval"]])
def test_peer_absent_says_so_and_fails(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the peer's packages, ``--peer`` names them and exits non-zero before doing any work."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("trl", "transformers", "lm_eval") else real(name, *a),
    )
    with pytest.raises(SystemExit) as e:
        main([*command, "--peer"])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "not installed" in err and "flanpipe[bench]" in err
    assert any(p in err for p in ("trl", "transformers", "lm_eval"))


def test_heavy_imports_read_from_importtime() -> None:
    """``bench dag``'s import check parses ``python -X importtime`` lines (module name last)."""
    from flanpipe.bench.dag import heavy_imports

    log = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       120 |        120 |   polars\n"
        "import time:       300 |       4000 |     torch._C\n"
        "import time:        50 |         50 | megatron.core\n"
    )
    assert heavy_imports(log) == ["megatron", "torch"]
    assert heavy_imports(log.replace("torch._C", "yaml").replace("megatron.core", "jsonschema")) == []
