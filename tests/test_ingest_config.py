"""Ingest (local and hf sources on local files) and config validation."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from dag import write_jsonl as jsonl

from flanpipe.core.registry import DatasetSpec, SourceSpec
from flanpipe.data.ingest import DataError, ingest_split
from flanpipe.plan.config import ConfigError, load_config, validate_config


def spec(path: str, **kw) -> DatasetSpec:
    base = dict(
        name="toy",
        cluster="nli",
        source=SourceSpec(type="local", path=path, format="jsonl"),
        fields={"premise": "p", "answer": "label"},
        options=("yes", "no"),
        metric="accuracy",
        templates=Path("unused.yaml"),
    )
    base.update(kw)
    return DatasetSpec(**base)


def test_local_ingest_maps_labels_to_option_text(tmp_path: Path) -> None:
    jsonl(tmp_path / "toy" / "train.jsonl", [{"p": "a", "label": 0}, {"p": "b", "label": 1}])
    s = spec(str(tmp_path / "toy" / "{split}.jsonl"))
    report = ingest_split(s, "train", tmp_path / "out.parquet")
    df = pl.read_parquet(tmp_path / "out.parquet")
    assert df.to_dicts() == [
        {"example_id": 0, "premise": "a", "answer": "yes"},
        {"example_id": 1, "premise": "b", "answer": "no"},
    ]
    assert report["rows"] == 2 and report["dropped"] == {}


def test_bad_labels_fail_or_drop_counted(tmp_path: Path) -> None:
    jsonl(tmp_path / "toy" / "train.jsonl", [{"p": "a", "label": 0}, {"p": "b", "label": -1}, {"p": None, "label": 1}])
    s = spec(str(tmp_path / "toy" / "{split}.jsonl"))
    with pytest.raises(DataError, match=r"dataset 'toy' split 'train'.*2 bad row.*first at example_id 1"):
        ingest_split(s, "train", tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()  # nothing partial left behind
    report = ingest_split(s, "train", tmp_path / "out.parquet", policy="drop")
    assert report["rows"] == 1 and report["dropped"] == {"null answer": 1, "null premise": 1}


def test_missing_source_names_dataset_and_path(tmp_path: Path) -> None:
    s = spec(str(tmp_path / "nowhere" / "{split}.jsonl"))
    with pytest.raises(DataError, match=r"dataset 'toy' \(train\): source file .*nowhere/train.jsonl does not exist"):
        ingest_split(s, "train", tmp_path / "out.parquet")


def test_hf_source_on_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `hf` loader goes through datasets.load_dataset; a local data directory keeps the hub out."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = tmp_path / "hfdata"
    jsonl(data / "train.jsonl", [{"p": "x", "label": 1, "meta": {"q": "nested"}}])
    s = spec(
        "unused",
        source=SourceSpec(type="hf", path=str(data)),
        fields={"premise": "p", "question": "meta.q", "answer": "label"},
    )
    ingest_split(s, "train", tmp_path / "out.parquet")
    assert pl.read_parquet(tmp_path / "out.parquet").to_dicts() == [
        {"example_id": 0, "premise": "x", "question": "nested", "answer": "no"}
    ]


def test_config_defaults_and_errors() -> None:
    cfg = validate_config({"registry": ["r.yaml"], "held_out": ["nli"], "model": "m.yaml"})
    assert cfg["mixture"]["cap"] == 30_000 and cfg["mixture"]["max_rate"] == 3_000
    assert cfg["lengths"] == {"inputs": 1024, "targets": 256, "pack": 1280}
    assert cfg["train"]["lr"] == 3e-5
    with pytest.raises(ConfigError, match="config key mixture.cpa"):
        validate_config({"registry": ["r"], "held_out": ["nli"], "model": "m", "mixture": {"cpa": 3}})
    with pytest.raises(ConfigError, match="config key train.steps: 'many' is not of type 'integer'"):
        validate_config({"registry": ["r"], "held_out": ["nli"], "model": "m", "train": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"'held_out' is a required property"):
        validate_config({"registry": ["r"], "model": "m"})
    with pytest.raises(ConfigError, match=r"lengths.pack: 100 is smaller than .* = 64 \+ 64 = 128"):
        validate_config(
            {"registry": ["r"], "held_out": ["x"], "model": "m", "lengths": {"inputs": 64, "targets": 64, "pack": 100}}
        )


def test_shipped_configs_validate() -> None:
    assert load_config("config/config.yaml")["held_out"]


def test_answer_transforms(tmp_path: Path) -> None:
    """Registry-level answer fixes used by the FLAN catalogue (no code per dataset)."""
    # Sentiment140: 0/4 labels, neutral 2 dropped (per-dataset bad_rows override).
    rows = [{"p": "a", "label": 0}, {"p": "b", "label": 4}, {"p": "c", "label": 2}]
    jsonl(tmp_path / "s" / "train.jsonl", rows)
    s = spec(
        str(tmp_path / "s" / "{split}.jsonl"),
        label_map={"0": 0, "4": 1},
        bad_rows="drop",
        options=("negative", "positive"),
    )
    report = ingest_split(s, "train", tmp_path / "s.parquet")
    assert pl.read_parquet(tmp_path / "s.parquet")["answer"].to_list() == ["negative", "positive"]
    assert report["dropped"] == {"null answer": 1}
    # Winogrande: 1-based string labels over per-example options.
    jsonl(tmp_path / "w" / "train.jsonl", [{"p": "x", "o1": "u", "o2": "v", "label": "2"}])
    w = spec(
        str(tmp_path / "w" / "{split}.jsonl"),
        options=None,
        options_field="options",
        answer_is_index=True,
        answer_offset=1,
        fields={"premise": "p", "options": ("o1", "o2"), "answer": "label"},
    )
    ingest_split(w, "train", tmp_path / "w.parquet")
    assert pl.read_parquet(tmp_path / "w.parquet")["answer"].to_list() == ["v"]
    # ARC: the answer key names an entry of choices.label; STS-B-like rounding; CommonGen-like joins.
    jsonl(
        tmp_path / "a" / "train.jsonl",
        [
            {
                "q": "q1",
                "choices": {"text": ["t1", "t2", "t3"], "label": ["A", "B", "C"]},
                "key": "C",
                "concepts": ["dog", "run"],
                "triples": [["s", "r", "o"], ["s2", "r2", "o2"]],
            },
        ],
    )
    a = spec(
        str(tmp_path / "a" / "{split}.jsonl"),
        options=None,
        options_field="options",
        answer_key_field="choices.label",
        join={"concepts": ", ", "triples": "; "},
        fields={
            "question": "q",
            "options": "choices.text",
            "concepts": "concepts",
            "triples": "triples",
            "answer": "key",
        },
    )
    ingest_split(a, "train", tmp_path / "a.parquet")
    row = pl.read_parquet(tmp_path / "a.parquet").row(0, named=True)
    assert row["answer"] == "t3" and row["concepts"] == "dog, run" and row["triples"] == "s | r | o; s2 | r2 | o2"
    jsonl(tmp_path / "r" / "train.jsonl", [{"p": "a", "label": 3.8}, {"p": "b", "label": 0.2}])
    r = spec(str(tmp_path / "r" / "{split}.jsonl"), answer_round=True, options=("0", "1", "2", "3", "4", "5"))
    ingest_split(r, "train", tmp_path / "r.parquet")
    assert pl.read_parquet(tmp_path / "r.parquet")["answer"].to_list() == ["4", "0"]
