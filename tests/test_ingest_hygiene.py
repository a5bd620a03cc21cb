"""Ingest as real sources need it: answers of mixed shape as references, explicit split files, seeded
holdouts, and split hygiene (exact duplicates within a split and between train and the eval splits)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from dag import write_jsonl as jsonl

from flanpipe.cli import main
from flanpipe.core.registry import REFERENCES, DatasetSpec, Holdout, RegistryError, SourceSpec, load_registry
from flanpipe.data.contamination import split_hygiene
from flanpipe.data.ingest import DataError, holdout_ids, ingest_split, read_ingest_report
from flanpipe.eval.evaluate import per_example_scores, score_templates


def qa_spec(path: Path | str, **kw) -> DatasetSpec:
    base = dict(
        name="toy_qa",
        cluster="closed_book_qa",
        source=SourceSpec(type="local", path=str(path), format="jsonl"),
        fields={"question": "q", "answer": "a"},
        metric="exact_match",
        templates=Path("unused.yaml"),
    )
    base.update(kw)
    return DatasetSpec(**base)


# ---------------------------------------------------------------------------------------------------------
# answers of mixed shape


def test_mixed_shape_answers_are_references_never_list_text(tmp_path: Path) -> None:
    """One answer on some lines, several on others: every row reads as a list of references; the first is
    the training target. A string that merely looks like a list stays that string."""
    rows = [
        {"q": "2 + 3?", "a": "5"},
        {"q": "two plus three?", "a": ["5", "five"]},
        {"q": "what is cited?", "a": "[citation needed]"},
        {"q": "two and three?", "a": ["", "5", None]},  # blank and null entries are no answers
    ]
    jsonl(tmp_path / "d" / "train.jsonl", rows)
    ingest_split(qa_spec(tmp_path / "d" / "{split}.jsonl"), "train", tmp_path / "out.parquet")
    df = pl.read_parquet(tmp_path / "out.parquet")
    assert df["answer"].to_list() == ["5", "5", "[citation needed]", "5"]
    assert df[REFERENCES].to_list() == [["5"], ["5", "five"], ["[citation needed]"], ["5"]]
    # answer_list: first (DROP: a list holds the parts of one answer, not alternatives): no references, and
    # a blank first part is an empty answer (a bad row)
    only_first = qa_spec(tmp_path / "d" / "{split}.jsonl", answer_list="first")
    report = ingest_split(only_first, "train", tmp_path / "first.parquet", policy="drop")
    first = pl.read_parquet(tmp_path / "first.parquet")
    assert first["answer"].to_list() == ["5", "5", "[citation needed]"] and REFERENCES not in first.columns
    assert report["dropped"] == {"empty answer": 1}


def test_nested_mixed_shapes_and_missing_nested_fields(tmp_path: Path) -> None:
    rows = [{"q": "a?", "ans": {"text": "x"}}, {"q": "b?", "ans": {"text": ["y", "z"]}}]
    jsonl(tmp_path / "n" / "train.jsonl", rows)
    s = qa_spec(tmp_path / "n" / "{split}.jsonl", fields={"question": "q", "answer": "ans.text"})
    ingest_split(s, "train", tmp_path / "n.parquet")
    assert pl.read_parquet(tmp_path / "n.parquet")[REFERENCES].to_list() == [["x"], ["y", "z"]]
    # a nested field missing on some rows: the usual bad-row error, naming the dataset, split and row
    jsonl(tmp_path / "m" / "train.jsonl", [{"q": "a?", "ans": {"text": "x"}}, {"q": "b?", "ans": {"start": 3}}])
    s = qa_spec(tmp_path / "m" / "{split}.jsonl", fields={"question": "q", "answer": "ans.text"})
    with pytest.raises(
        DataError, match=r"dataset 'toy_qa' split 'train'.*1 bad row.*first at example_id 1: null answer"
    ):
        ingest_split(s, "train", tmp_path / "m.parquet")
    # ... and missing on every row: named with the struct's real fields, not a Polars traceback
    s = qa_spec(tmp_path / "m" / "{split}.jsonl", fields={"question": "q", "answer": "ans.texts"})
    with pytest.raises(
        DataError, match=r"field answer <- 'ans.texts': 'ans' has no field 'texts'.*\['start', 'text'\]"
    ):
        ingest_split(s, "train", tmp_path / "m.parquet")


def test_scoring_counts_every_reference() -> None:
    """Exact match and F1 take the best reference of each example (flanpipe.eval.metrics)."""
    preds = pl.DataFrame(
        {
            "template_id": [0, 0],
            "split": ["test", "test"],
            "example_id": [0, 1],
            "targets": ["5", "Paris"],
            REFERENCES: [["5", "five"], ["Paris"]],
            "prediction": ["five", "paris"],
        }
    )
    assert score_templates(preds, "exact_match")["test"].to_list() == [100.0]
    assert per_example_scores(preds, "f1")["score"] == [100.0, 100.0]
    assert score_templates(preds.drop(REFERENCES), "exact_match")["test"].to_list() == [50.0]  # first only


# ---------------------------------------------------------------------------------------------------------
# explicit split files (GEM's challenge directories) and holdouts


def gem_like_repo(root: Path) -> Path:
    """A hub parquet conversion's layout: en/{train,validation,challenge_train_sample}/ (no dataset card)."""
    rows = {
        "train": [{"mr": f"name[R{i}]", "target": f"R{i} is a pub."} for i in range(6)],
        "validation": [{"mr": "name[V]", "target": "V is a cafe."}],
        "challenge_train_sample": [{"mr": "name[R0]", "target": "R0 is a pub."}],  # GEM repeats train rows
    }
    for split, rs in rows.items():
        (root / "en" / split).mkdir(parents=True)
        pl.DataFrame(rs).write_parquet(root / "en" / split / "0000.parquet")
    return root


def test_data_files_keep_challenge_directories_out_of_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = gem_like_repo(tmp_path / "repo")
    fields = {"mr": "mr", "answer": "target"}
    folded = qa_spec(
        "unused", source=SourceSpec(type="hf", path=str(repo), data_dir="en"), fields=fields, metric="rouge"
    )
    assert ingest_split(folded, "train", tmp_path / "folded.parquet")["rows"] == 7  # datasets folds the challenge in
    explicit = SourceSpec(type="hf", path=str(repo), data_files={"train": ("en/train/*.parquet",)})
    report = ingest_split(qa_spec("unused", source=explicit, fields=fields, metric="rouge"), "train", tmp_path / "t.pq")
    assert report["rows"] == 6 and report["split_hygiene"]["duplicates_within"] == 0
    assert report["split_hygiene"]["duplicates_within"] == 0
    assert read_ingest_report(tmp_path / "folded.parquet")["split_hygiene"]["duplicates_within"] == 1  # R0 twice


def test_holdout_is_a_seeded_sample_and_train_leaves_it_out(tmp_path: Path) -> None:
    """dbpedia_14-like: the source is ordered by class, so a tail slice would be one class; the holdout is
    a seeded sample, the same in both roles' jobs, and example_id stays the source position."""
    rows = [{"q": f"doc {i}", "a": f"class{i // 10}"} for i in range(40)]
    jsonl(tmp_path / "c" / "train.jsonl", rows)
    s = qa_spec(
        tmp_path / "c" / "{split}.jsonl",
        splits={"train": "train", "validation": "train"},
        holdout={"validation": Holdout(rows=8, seed=14)},
    )
    ingest_split(s, "validation", tmp_path / "v.parquet")
    ingest_split(s, "train", tmp_path / "t.parquet", eval_splits={"validation": tmp_path / "v.parquet"})
    val, train = pl.read_parquet(tmp_path / "v.parquet"), pl.read_parquet(tmp_path / "t.parquet")
    assert val["example_id"].to_list() == holdout_ids(40, Holdout(8, 14)) != list(range(32, 40))
    assert val["answer"].n_unique() > 1  # not one class, as train[-8:] would be
    assert sorted(val["example_id"].to_list() + train["example_id"].to_list()) == list(range(40))
    assert read_ingest_report(tmp_path / "t.parquet")["split_hygiene"]["duplicates_with"] == {"validation": 0}
    with pytest.raises(DataError, match="holdout of 8 rows from a split of 5"):
        holdout_ids(5, Holdout(8, 0), "here")


REGISTRY = """datasets:
  d:
    cluster: c
    source: {{type: hf, path: org/d{extra_source}}}
    splits: {splits}
    fields: {{text: text, answer: label}}
    options: [a, b]
    metric: accuracy
{extra}"""


@pytest.mark.parametrize(
    ("splits", "extra_source", "extra", "why"),
    [
        ("{train: train, validation: 'train[-5:]'}", ", data_files: {validation: v/*.parquet}", "", r"\['train'\]"),
        ("{train: train, validation: train}", "", "    holdout: {test: {rows: 5, seed: 0}}\n", "does not map 'test'"),
        ("{train: train, validation: 'train[:5]'}", "", "    holdout: {validation: {rows: 5, seed: 0}}\n", "a slice"),
        ("{train: train, validation: train}", "", "    holdout: {validation: {rows: 5}}\n", "'seed' is a required"),
    ],
)
def test_registry_checks_data_files_and_holdouts(
    tmp_path: Path, splits: str, extra_source: str, extra: str, why: str
) -> None:
    p = tmp_path / "reg.yaml"
    p.write_text(REGISTRY.format(splits=splits, extra_source=extra_source, extra=extra))
    with pytest.raises(RegistryError, match=rf"reg\.yaml.*(.|\n)*{why}"):
        load_registry([p])


def test_shipped_gem_and_dbpedia_entries_read_explicit_files_and_a_sample() -> None:
    flan = load_registry(["config/registry/flan/*.yaml"])
    for name in ("common_gen", "e2e_nlg", "web_nlg", "wiki_lingua_en"):
        files = flan[name].source.data_files
        assert files is not None and not any("challenge" in f or "sampled" in f for fs in files.values() for f in fs)
        assert all(
            f.endswith(("/train/*.parquet", "/validation/*.parquet", "/test/*.parquet"))
            for fs in files.values()
            for f in fs
        )
    t0 = load_registry(["config/registry/t0/*.yaml"])
    assert t0["dbpedia_14"].holdout == {"validation": Holdout(rows=200, seed=14)}
    assert t0["dbpedia_14"].held_out_by("train") == ("validation", Holdout(rows=200, seed=14))


# ---------------------------------------------------------------------------------------------------------
# split hygiene


def planted(tmp_path: Path) -> DatasetSpec:
    """train holds 2 rows of test and 1 of validation, and one row twice; test one row twice."""
    train = [{"q": f"q{i}", "a": f"a{i}"} for i in range(10)] + [{"q": "q3", "a": "a3"}]
    train += [{"q": "t0", "a": "x"}, {"q": "t1", "a": "y"}, {"q": "v0", "a": "z"}]
    train += [{"q": "t1", "a": "other answer"}]  # same question, other answer: not an exact duplicate
    jsonl(tmp_path / "h" / "train.jsonl", train)
    jsonl(tmp_path / "h" / "validation.jsonl", [{"q": "v0", "a": "z"}, {"q": "v1", "a": "w"}])
    jsonl(tmp_path / "h" / "test.jsonl", [{"q": "t0", "a": "x"}, {"q": "t1", "a": "y"}, {"q": "t1", "a": "y"}])
    return qa_spec(tmp_path / "h" / "{split}.jsonl")


def ingest_eval(s: DatasetSpec, tmp_path: Path) -> dict[str, Path]:
    out = {r: tmp_path / f"{r}.parquet" for r in ("validation", "test")}
    for r, p in out.items():
        ingest_split(s, r, p)
    return out


def test_planted_duplicates_are_counted_and_dropped_from_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = planted(tmp_path)
    evals = ingest_eval(s, tmp_path)
    assert read_ingest_report(evals["test"])["split_hygiene"]["duplicates_within"] == 1
    report = ingest_split(s, "train", tmp_path / "train.parquet", eval_splits=evals)
    h = report["split_hygiene"]
    assert h["duplicates_within"] == 1  # q3 twice
    assert h["duplicates_with"] == {"test": 2, "validation": 1} and h["dropped_from_train"] == 3
    assert h["policy"] == "drop" and report["rows"] == 15 - 3
    train = pl.read_parquet(tmp_path / "train.parquet")
    assert {"t0", "v0"}.isdisjoint(train["question"])
    assert train.filter(pl.col("question") == "t1")["answer"].to_list() == ["other answer"]
    assert read_ingest_report(tmp_path / "train.parquet")["split_hygiene"] == h  # the footer the audit reads
    log = capsys.readouterr().out
    assert (
        "split hygiene: toy_qa train: 1 exact duplicate row(s) inside the split; "
        "train rows: 2 also in test, 1 also in validation -> 3 dropped from train"
    ) in log


def test_duplicate_policy_fail_and_warn(tmp_path: Path) -> None:
    s = planted(tmp_path)
    evals = ingest_eval(s, tmp_path)
    with pytest.raises(
        DataError,
        match=r"split 'train'.*3 train row\(s\) equal an eval row.*first: train example_id 11 = test example_id 0",
    ):
        ingest_split(s, "train", tmp_path / "train.parquet", eval_splits=evals, split_duplicates="fail")
    assert not (tmp_path / "train.parquet").exists()
    report = ingest_split(s, "train", tmp_path / "train.parquet", eval_splits=evals, split_duplicates="warn")
    assert report["rows"] == 15 and report["split_hygiene"]["dropped_from_train"] == 0


def test_audit_reports_the_split_hygiene_of_the_run(tmp_path: Path) -> None:
    s = planted(tmp_path)
    evals = ingest_eval(s, tmp_path)
    ingest_split(s, "train", tmp_path / "train.parquet", eval_splits=evals)
    got = split_hygiene({"toy_qa": {**evals, "train": tmp_path / "train.parquet"}})
    assert got["totals"] == {
        "duplicates_within": 2,
        "train_rows_in_eval": 3,
        "dropped_from_train": 3,
        "splits_unknown": 0,
    }
    assert got["datasets"]["toy_qa"]["train"]["duplicates_with"] == {"test": 2, "validation": 1}


def test_cli_ingest_takes_the_eval_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = planted(tmp_path)
    evals = ingest_eval(s, tmp_path)
    reg = tmp_path / "reg.yaml"
    entry = {
        "cluster": "closed_book_qa",
        "source": {"type": "local", "format": "jsonl", "path": str(tmp_path / "h" / "{split}.jsonl")},
        "fields": {"question": "q", "answer": "a"},
        "metric": "exact_match",
        "templates": "config/templates/synth_capitals.yaml",
    }
    reg.write_text(yaml.safe_dump({"datasets": {"toy_qa": entry}}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "registry": [str(reg)],
                "held_out": ["closed_book_qa"],
                "model": "config/models/micro.yaml",
                "data": {"split_duplicates": "warn"},
            }
        )
    )
    argv = ["--config", str(cfg), "ingest", "toy_qa", "train", "--out", str(tmp_path / "cli.parquet")]
    main([*argv, "--validation", str(evals["validation"]), "--test", str(evals["test"])])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["split_hygiene"]["policy"] == "warn" and report["rows"] == 15
    main([*argv, "--validation", str(evals["validation"]), "--split-duplicates", "drop"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 14
