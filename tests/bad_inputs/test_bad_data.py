"""Bad data caught by the first job that reads it (ingest): the message names the dataset, split, file
and line, and nothing partial is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_bad_inputs import assert_nothing_written, registry_dir, write

from flanpipe.core.registry import load_registry
from flanpipe.data.ingest import DataError, ingest_split


@pytest.mark.parametrize(("line", "kind"), [('["c", "d", 1]', "list"), ('"just text"', "str"), ("7", "int")])
def test_jsonl_line_that_is_not_an_object(tmp_path: Path, line: str, kind: str) -> None:
    """A later line holding a list failed with a raw Polars SchemaError and no line number."""
    spec = load_registry([registry_dir(tmp_path)])["nli_a"]
    raw = write(tmp_path / "data" / "nli_a" / "train.jsonl", '{"p": "a", "h": "b", "label": 0}\n' + line + "\n")
    out = tmp_path / "out" / "train.parquet"
    with pytest.raises(DataError) as e:
        ingest_split(spec, "train", out)
    assert f"dataset 'nli_a' split 'train': {raw} is not valid JSONL at line 2: a JSON {kind}, not an object" in str(
        e.value
    )
    assert_nothing_written(out)


def test_ingest_of_a_split_the_entry_does_not_map(tmp_path: Path) -> None:
    """``flanpipe ingest qa train`` on an entry without a train split raised a bare KeyError."""
    reg = registry_dir(tmp_path, extra="    splits: {validation: validation, test: test}\n")
    spec = load_registry([reg])["qa"]
    with pytest.raises(
        DataError, match=rf"dataset 'qa' has no 'train' split: 'splits' of its entry in {reg} maps only"
    ):
        ingest_split(spec, "train", tmp_path / "out.parquet")


def test_empty_answer_is_a_bad_row(tmp_path: Path) -> None:
    """A pattern template's "{answer}" target rendered empty (trained on a bare EOS, scored against "")."""
    spec = load_registry([registry_dir(tmp_path)])["qa"]
    raw = write(tmp_path / "data" / "qa" / "train.jsonl", '{"q": "who?", "a": "Ada"}\n{"q": "what?", "a": "  "}\n')
    out = tmp_path / "out" / "train.parquet"
    with pytest.raises(DataError, match=rf"'qa' split 'train' \({raw}\): 1 bad row\(s\) of 2 \{{'empty answer': 1\}}"):
        ingest_split(spec, "train", out)
    assert_nothing_written(out)
    assert ingest_split(spec, "train", out, policy="drop")["dropped"] == {"empty answer": 1}
