"""`flanpipe sources check` against local dataset repositories that imitate the hub's layouts (no network):
parquet directories, a dataset card with features, a GEM-like challenge directory, a script-only repo,
and a label order that disagrees with the registry's options."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from dag import run_snakemake

from flanpipe.cli import main
from flanpipe.core.registry import DatasetSpec, SourceSpec
from flanpipe.data.sources import check_hub_entry, check_sources, file_family, folded, format_table

LABELS = datasets.ClassLabel(names=["negative", "positive"])
FEATURES = datasets.Features(
    {"text": datasets.Value("string"), "label": LABELS, "meta": {"title": datasets.Value("string")}}
)


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is never asked: every repository here is a local directory."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def write_split(path: Path, labels: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {"text": [f"t{i}" for i in range(len(labels))], "label": labels, "meta": [{"title": "x"}] * len(labels)}
    datasets.Dataset.from_dict(rows, features=FEATURES).to_parquet(str(path))  # HF features in the footer


def parquet_repo(root: Path) -> Path:
    """The hub's parquet-on-main layout, no card: data/<split>-00000-of-00001.parquet; test labels hidden."""
    write_split(root / "data" / "train-00000-of-00001.parquet", [0, 1, 0, 1])
    write_split(root / "data" / "validation-00000-of-00001.parquet", [1, 0])
    write_split(root / "data" / "test-00000-of-00001.parquet", [-1, -1])
    return root


def card_repo(root: Path, names: list[str]) -> Path:
    """A dataset card whose features list the labels (here in the order ``names``)."""
    write_split(root / "data" / "train-00000-of-00001.parquet", [0, 1])
    write_split(root / "data" / "test-00000-of-00001.parquet", [1, 0])
    card = {
        "dataset_info": {
            "features": [
                {"name": "text", "dtype": "string"},
                {"name": "label", "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}},
                {"name": "meta", "struct": [{"name": "title", "dtype": "string"}]},
            ],
            "splits": [{"name": s, "num_bytes": 10, "num_examples": 2} for s in ("train", "test")],
        },
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"data/{s}-*"} for s in ("train", "test")],
            }
        ],
    }
    (root / "README.md").write_text("---\n" + yaml.safe_dump(card, sort_keys=False) + "---\n# a card\n")
    return root


def gem_repo(root: Path) -> Path:
    """A parquet conversion's layout with a challenge directory beside train/ (no card)."""
    for split in ("train", "validation", "challenge_train_sample"):
        write_split(root / "en" / split / "0000.parquet", [0, 1])
    return root


def script_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / f"{root.name}.py").write_text("import datasets  # a loading script, never run\n")
    return root


def spec(source: SourceSpec, **kw) -> DatasetSpec:
    base = dict(
        name="toy",
        cluster="sentiment",
        source=source,
        splits={"train": "train", "validation": "validation", "test": "validation"},
        fields={"text": "text", "title": "meta.title", "answer": "label"},
        options=("negative", "positive"),
        metric="accuracy",
        templates=Path("unused.yaml"),
    )
    base.update(kw)
    return DatasetSpec(**base)


def blocking(check) -> list[str]:  # noqa: ANN001
    return [f.text for f in check.findings if f.level == "block"]


def test_parquet_directories_resolve_with_labels_beside_the_options(tmp_path: Path) -> None:
    check = check_hub_entry(spec(SourceSpec(type="hf", path=str(parquet_repo(tmp_path / "p")))))
    assert (check.loads, check.status, blocking(check)) == ("yes", "ok", [])
    assert check.columns == "all present"
    assert check.labels == "0 negative -> negative; 1 positive -> positive"
    assert check.splits == "train<-train (1 file), validation<-validation (1 file), test<-validation (1 file)"


def test_hidden_labels_and_missing_splits_and_columns_block(tmp_path: Path) -> None:
    repo = SourceSpec(type="hf", path=str(parquet_repo(tmp_path / "p")))
    hidden = check_hub_entry(spec(repo, splits={"train": "train[:-1]", "validation": "train[-1:]", "test": "test"}))
    assert any("role test reads split 'test', whose labels are all hidden (-1)" in t for t in blocking(hidden))
    missing = check_hub_entry(spec(repo, splits={"train": "train", "validation": "dev", "test": "validation"}))
    assert any("role validation reads split 'dev'" in t for t in blocking(missing))
    nested = check_hub_entry(spec(repo, fields={"text": "text", "title": "meta.name", "answer": "label"}))
    assert blocking(nested) == ["field title <- 'meta.name': 'meta' has no field 'name' (fields: ['title'])"]
    assert nested.columns == "missing: title <- 'meta.name'"


def test_a_card_with_features_and_a_flipped_label_order(tmp_path: Path) -> None:
    splits = {"train": "train", "validation": "train[-1:]", "test": "test"}
    good = check_hub_entry(
        spec(SourceSpec(type="hf", path=str(card_repo(tmp_path / "c", ["negative", "positive"]))), splits=splits)
    )
    assert good.status == "ok", good.findings
    flipped_repo = SourceSpec(type="hf", path=str(card_repo(tmp_path / "f", ["positive", "negative"])))
    flipped = check_hub_entry(spec(flipped_repo, splits=splits))
    assert flipped.labels == "0 positive -> negative; 1 negative -> positive"  # visible at a glance
    assert any(
        "option 'negative' is label 1 ('negative') of the source, but option 0 here" in t for t in blocking(flipped)
    )
    other = SourceSpec(type="hf", path=flipped_repo.path, name="other")
    unknown_config = check_hub_entry(spec(other, splits=splits))
    assert unknown_config.loads == "no" and "BuilderConfig 'other' not found" in blocking(unknown_config)[0]


def test_a_challenge_directory_folded_into_train_blocks_until_the_files_are_named(tmp_path: Path) -> None:
    repo = str(gem_repo(tmp_path / "g"))
    splits = {"train": "train[:-1]", "validation": "train[-1:]", "test": "validation"}
    folded_check = check_hub_entry(spec(SourceSpec(type="hf", path=repo, data_dir="en"), splits=splits))
    assert folded_check.splits.startswith("train<-train[:-1] (2 files)")
    assert any(
        "split 'train' is made of files of 2 kinds" in t and "challenge_train_sample" in t
        for t in blocking(folded_check)
    )
    named = SourceSpec(
        type="hf", path=repo, data_files={"train": ("en/train/*.parquet",), "validation": ("en/validation/*.parquet",)}
    )
    assert check_hub_entry(spec(named, splits=splits)).status == "ok"
    assert folded(["a/train/0000.parquet", "a/train/0001.parquet"]) == []
    assert file_family("data/train-00001-of-00002.parquet") == "data/train"


def test_a_script_only_repo_says_what_to_set_instead(tmp_path: Path) -> None:
    check = check_hub_entry(spec(SourceSpec(type="hf", path=str(script_repo(tmp_path / "scripted")))))
    assert check.loads == "script only" and check.status == "BLOCK"
    text = blocking(check)[0]
    assert "loading script, which datasets>=4 does not run" in text
    assert "source.revision: refs/convert/parquet" in text and "source.data_files" in text and "local files" in text


def experiment(tmp_path: Path, datasets_: list[str] | None = None) -> Path:
    """A small experiment whose registry has a hub entry on a parquet repo (good) and a script-only one."""
    good = tmp_path / "good" if (tmp_path / "good").exists() else parquet_repo(tmp_path / "good")
    scripted = tmp_path / "scripted" if (tmp_path / "scripted").exists() else script_repo(tmp_path / "scripted")
    (tmp_path / "t.yaml").write_text('templates:\n  - {inputs: "{text} {title}", targets: "{answer}"}\n')
    entry = {
        "cluster": "sentiment",
        "splits": {"train": "train", "validation": "validation", "test": "validation"},
        "fields": {"text": "text", "title": "meta.title", "answer": "label"},
        "options": ["negative", "positive"],
        "metric": "accuracy",
        "templates": str(tmp_path / "t.yaml"),
    }
    registry = {
        "good": {**entry, "source": {"type": "hf", "path": str(good)}},
        "scripted": {**entry, "cluster": "misc", "source": {"type": "hf", "path": str(scripted)}},
        "good_too": {**entry, "cluster": "misc", "source": {"type": "hf", "path": str(good)}},  # trains in the DAG
    }
    (tmp_path / "reg.yaml").write_text(yaml.safe_dump({"datasets": registry}))
    config = yaml.safe_load(Path("tests/config/workflow.yaml").read_text())  # a small experiment's facts
    config.pop("datasets", None)
    config.update(registry=[str(tmp_path / "reg.yaml")], held_out=["sentiment"])
    if datasets_:
        config["datasets"] = datasets_
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "c.yaml"


def test_one_table_and_the_cli_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = experiment(tmp_path)
    table = format_table(check_sources({"good": spec(SourceSpec(type="hf", path=str(tmp_path / "good")))}))
    assert table.splitlines()[0].startswith("| dataset | status | source | route | loads | splits | columns | labels")
    out = tmp_path / "check.md"
    with pytest.raises(SystemExit) as e:
        main(["--config", str(config), "sources", "check", "--out", str(out)])
    assert e.value.code == 1
    printed = capsys.readouterr().out
    assert (
        "| scripted | BLOCK |" in printed and "| good | ok |" in printed and printed == out.read_text()
    )  # the table, as written
    assert "3 entries, 1 with a blocking finding" in printed
    statuses = {c["dataset"]: c["status"] for c in json.loads(out.with_suffix(".json").read_text())}
    assert statuses == {"good": "ok", "good_too": "ok", "scripted": "BLOCK"}
    main(["--config", str(config), "sources", "check", "--datasets", "good"])  # no exit: nothing blocks
    assert "| good | ok |" in capsys.readouterr().out


def test_the_dag_checks_the_sources_before_any_download(tmp_path: Path) -> None:
    """Rule sources_check is the first job of a DAG that downloads; a blocking finding stops it there."""
    work = tmp_path / "work"
    config = experiment(tmp_path, ["good", "good_too", "scripted"])
    planned = run_snakemake(work, config, "-n", "--cores", "1", "results/ingest/good/train.parquet", timeout=300)
    assert planned.returncode == 0, planned.stderr[-3000:]
    downloads = planned.stdout.split("rule download:")[1:]
    assert len(downloads) == 3 and all("results/sources/check.md" in d.split("output:")[0] for d in downloads)
    blocked = run_snakemake(work, config, "--cores", "1", "results/ingest/scripted/train.parquet", timeout=300)
    assert blocked.returncode != 0
    log = (work / "logs/sources_check/sources_check.log").read_text()
    assert "| scripted | BLOCK |" in log and "loads only through a loading script" in log
    assert not (work / "results/ingest").exists() and not (work / "results/sources/check.md").exists()
