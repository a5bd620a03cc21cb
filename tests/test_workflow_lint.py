"""The workflow itself: `snakemake --lint` is clean and every rule keeps a log and a benchmark."""

from __future__ import annotations

import re

from dag import ROOT, snakemake


def test_snakemake_lint_is_clean() -> None:
    r = snakemake("--lint", timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]


def rule_blocks() -> dict[str, str]:
    """rule name -> its text, for every rule in rules/*.smk (the Snakefile holds only `rule all`)."""
    blocks = {}
    for path in sorted((ROOT / "rules").glob("*.smk")):
        parts = re.split(r"^(?:local)?rule (\w+):\n", path.read_text(), flags=re.MULTILINE)
        blocks.update(dict(zip(parts[1::2], parts[2::2], strict=True)))
    return blocks


def test_every_rule_has_log_and_benchmark() -> None:
    blocks = rule_blocks()
    assert len(blocks) >= 10
    for name, text in blocks.items():
        body = text.split("\n\n\n", 1)[0]
        if "\n    output:" not in "\n" + body:
            continue  # a pure target (like `all`, `ablation_clusters`): no job of its own
        for directive in ("log:", "benchmark:"):
            assert f"\n    {directive}" in "\n" + body, f"rule {name} has no {directive}"
