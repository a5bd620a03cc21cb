"""What jobs and commands write: outputs readable as a plain ``open()`` would leave them, and commands
that refuse to destroy a user's file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_bad_inputs import write

from flanpipe.cli import main
from flanpipe.core.io import atomic_path, write_json

FLAN = Path(__file__).resolve().parent.parent / "fixtures" / "importers" / "flan_patterns.py"


@pytest.fixture
def umask():
    """Set the process umask for one test, and restore it."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)]
)
def test_outputs_get_the_umask_modes(tmp_path: Path, umask, mask: int, file_mode: int, dir_mode: int) -> None:
    """Every file flanpipe wrote was 0600 whatever the umask (a renamed mkstemp file), unreadable to the group."""
    umask(mask)
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_path(tmp_path / "b.parquet") as tmp:
        tmp.write_bytes(b"x")
    with atomic_path(tmp_path / "packed", directory=True) as tmp:
        (tmp / "tokens.bin").write_bytes(b"x")
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert mode(plain) == file_mode  # what open() gives: the reference
    assert mode(tmp_path / "a.json") == file_mode and mode(tmp_path / "b.parquet") == file_mode
    assert mode(tmp_path / "packed") == dir_mode and mode(tmp_path / "packed" / "tokens.bin") == file_mode


def test_templates_import_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``flanpipe templates import --out FILE`` silently replaced a hand-written template file."""
    out = write(
        tmp_path / "toy_reviews.yaml", "# hand-written\ntemplates:\n  - {inputs: '{text}', targets: '{answer}'}\n"
    )
    before = out.read_text()
    argv = ["templates", "import", "--from", "flan", str(FLAN), "--dataset", "toy_reviews", "--out", str(out)]
    argv += ["--field-map", "text=sentence"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"{out}: file exists (perhaps hand-written templates); refusing to overwrite it. Pass --force" in (
        capsys.readouterr().err
    )
    assert out.read_text() == before
    main([*argv, "--force"])
    assert out.read_text() != before and "Imported by `flanpipe templates import --from flan`" in out.read_text()
