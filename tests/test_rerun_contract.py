"""What reruns is what changed: README's "you change X -> these rules rerun" table, row by row, on one finished
embedded-default run (tests/config/rerun.yaml), and the few edits that must run for real.

The finished run is built once (module fixture). Each row applies one edit to the run directory's copy of
config/, plans the default target with a fresh `snakemake --dry-run` process, compares the planned rules with
README's row and, for per-dataset edits, checks that no other dataset's job is planned; then restores the files.
The last tests run edits for real: an operational edit runs nothing, the label flip re-ingests, retrains from
scratch and re-scores with the flipped labels (only the jobs its checks read), and a failing audit stops the run
before training.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from dag import ROOT, venv_env
from dag import snakemake as _snakemake

from flanpipe.core.rerun import STAGE_VERSIONS, Operational, canonical, digest_json
from flanpipe.plan.cost import pending_jobs, profile_gpus

CONFIG = ROOT / "tests" / "config" / "rerun.yaml"
README = ROOT / "README.md"
JOB = re.compile(r"^(?:local)?rule (\w+):$")
WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")
RUNS = ("base-tiny", "heldout_nli", "heldout_sentiment")

# ------------------------------------------------------------------------------------------- helpers


def snakemake(work: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = _snakemake("--snakefile", ROOT / "Snakefile", *args, cwd=work, timeout=2400)
    if check:
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return r


def planned(work: Path) -> set[str]:
    """Jobs a dry run of the default target would run, as ``rule[wildcards]`` (wildcards sorted by name)."""
    jobs: list[list[str]] = []
    for line in snakemake(work, "--dry-run").stdout.splitlines():
        if m := JOB.match(line):
            jobs.append([m.group(1), ""])
        elif (m := WILDCARDS.match(line)) and jobs:
            jobs[-1][1] = ", ".join(sorted(m.group(1).split(", ")))  # Snakemake's wildcard order varies
    return {f"{rule}[{wc}]" for rule, wc in jobs}


def rules_of(jobs: set[str]) -> set[str]:
    return {j.split("[")[0] for j in jobs} - {"all"}


def readme_table() -> dict[str, set[str]]:
    """README's rerun table: edit -> the rules it reruns (empty for "nothing")."""
    text = README.read_text(encoding="utf-8")
    table = text.split("<!-- rerun-table", 1)[1].split("<!-- /rerun-table -->", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("you change", "---"):
            continue
        rows[cells[0]] = set() if cells[1] == "nothing" else set(re.findall(r"`(\w+)`", cells[1]))
    return rows


def edit_yaml(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Load ``path``, change it, write it back (comments and formatting are lost: no fact is)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def config_edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda work: edit_yaml(work / "config" / "config.yaml", change)


def registry_edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda work: edit_yaml(work / "config" / "registry" / "embedded.yaml", lambda r: change(r["datasets"]))


def text_edit(rel: str, old: str, new: str) -> Callable[[Path], None]:
    def edit(work: Path) -> None:
        path = work / rel
        text = path.read_text(encoding="utf-8")
        assert old in text, (rel, old)
        path.write_text(text.replace(old, new, 1), encoding="utf-8")

    return edit


def sorted_config(work: Path) -> None:
    path = work / "config" / "config.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()), sort_keys=True), encoding="utf-8")


def set_key(block: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(cfg: dict[str, Any]) -> None:
        cfg.setdefault(block, {})[key] = value

    return change


# README row -> the edit that makes it. tests: every README row has one, and vice versa.
EDITS: dict[str, Callable[[Path], None]] = {
    "`train.log_interval` 10 -> 5": config_edit(set_key("train", "log_interval", 5)),
    "`train.save_interval: 100` added (checkpoint cadence)": config_edit(set_key("train", "save_interval", 100)),
    "`train.peak_tflops: 50` added (the MFU denominator)": config_edit(set_key("train", "peak_tflops", 50)),
    "`train.micro_batch_size: 2` (how a step splits into passes)": config_edit(set_key("train", "micro_batch_size", 2)),
    "`lengths` written with its keys in another order": config_edit(
        lambda c: c.update(lengths={"inputs": 192, "pack": 256, "targets": 48})
    ),
    "the config written back with every key in another order": sorted_config,
    "`mixture.temperature` 1.0 -> 1 (the same number)": config_edit(set_key("mixture", "temperature", 1)),
    "`eval.batch_size`": config_edit(set_key("eval", "batch_size", 16)),
    "a comment in a template file": text_edit("config/templates/synth_sst.yaml", "templates:", "# note\ntemplates:"),
    "a comment in the model YAML": text_edit("config/models/tiny.yaml", "num_layers:", "# note\nnum_layers:"),
    "a registry entry's `description`": registry_edit(lambda d: d["synth_sst"].update(description="Reworded.")),
    "`audit.max_contaminated_fraction` (the verdict stays a pass)": config_edit(
        set_key("audit", "max_contaminated_fraction", 0.6)
    ),
    "`eval.examples` 8 -> 6": config_edit(set_key("eval", "examples", 6)),
    "`eval.scoring`": config_edit(set_key("eval", "scoring", "per_token")),
    "`train.lr`": config_edit(set_key("train", "lr", 4.0e-3)),
    "the model YAML (`init_method_std`)": text_edit(
        "config/models/tiny.yaml", "init_method_std: 0.02", "init_method_std: 0.03"
    ),
    "a template's text (synth_nli_entail)": text_edit(
        "config/templates/synth_nli_entail.yaml", "Does the premise entail", "Does the premise imply"
    ),
    "synth_sst's `options` reordered (flips every label)": registry_edit(
        lambda d: d["synth_sst"].update(options=["positive", "negative"])
    ),
    "synth_nli_entail's `fields` remapped (premise <-> hypothesis)": registry_edit(
        lambda d: d["synth_nli_entail"].update(
            fields={"premise": "hypothesis", "hypothesis": "premise", "answer": "label"}
        )
    ),
    "`held_out` gains `closed_book_qa`": config_edit(lambda c: c["held_out"].append("closed_book_qa")),
}


def only_dataset(dataset: str, splits: tuple[str, ...] = ("test", "train", "validation")) -> Callable[[set[str]], None]:
    """A per-dataset edit: its ingest jobs are ``splits`` of ``dataset``; every ingest or shard job is its own."""

    def check(jobs: set[str]) -> None:
        ingest = {j for j in jobs if j.startswith("ingest[")}
        _equal(ingest, {f"ingest[local_dataset={dataset}, split={s}]" for s in splits})
        per_dataset = [j for j in jobs if j.split("[")[0] in ("ingest", "render_shard", "render_eval_shard")]
        assert per_dataset and all(dataset in j for j in per_dataset), per_dataset

    return check


def only_run(run: str, base: str = "base-tiny") -> Callable[[set[str]], None]:
    """A new run: every mix, pack, spec and train job is that run's; audits are its own and the base model's
    (scored on the new cluster too, so audited on it: a re-audit, never a retraining)."""

    def check(jobs: set[str]) -> None:
        per_run = {j for j in jobs if j.split("[")[0] in ("mix", "pack", "train_spec", "train")}
        _equal(per_run, {f"{r}[run={run}]" for r in ("mix", "pack", "train", "train_spec")})
        _equal({j for j in jobs if j.startswith("audit[")}, {f"audit[run={run}]", f"audit[run={base}]"})

    return check


def trains(*runs: str) -> Callable[[set[str]], None]:
    return lambda jobs: _equal({j for j in jobs if j.startswith("train[")}, {f"train[run={r}]" for r in runs})


def _equal(got: set[str], want: set[str]) -> None:
    assert got == want, (sorted(got), sorted(want))


# Checks beyond the rule names, per row.
EXTRA: dict[str, Callable[[set[str]], None]] = {
    "a template's text (synth_nli_entail)": only_dataset("synth_nli_entail", ()),
    "synth_sst's `options` reordered (flips every label)": only_dataset("synth_sst"),
    "synth_nli_entail's `fields` remapped (premise <-> hypothesis)": only_dataset("synth_nli_entail"),
    "`held_out` gains `closed_book_qa`": lambda jobs: (
        only_run("heldout_closed_book_qa")(jobs),
        only_dataset("synth_capitals", ())(jobs),  # its eval splits exist: train's ingest compared them
    ),
    "`train.lr`": trains(*RUNS),
    "the model YAML (`init_method_std`)": trains(*RUNS),
    "`eval.examples` 8 -> 6": trains(),
    "`audit.max_contaminated_fraction` (the verdict stays a pass)": lambda jobs: _equal(
        {j for j in jobs if j.startswith("audit[")}, {f"audit[run={r}]" for r in RUNS}
    ),
}


@contextmanager
def edited(work: Path, edit: Callable[[Path], None]) -> Iterator[None]:
    """Apply ``edit`` to the run's config/ and restore every file it touched afterwards."""
    before = {p: p.read_bytes() for p in (work / "config").rglob("*") if p.is_file()}
    edit(work)
    try:
        yield
    finally:
        for p, data in before.items():
            if p.read_bytes() != data:
                p.write_bytes(data)


def file_times(work: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.glob(pattern)}


# ------------------------------------------------------------------------------------- the finished run


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished embedded-default run (every job of the default target done), built once."""
    work = tmp_path_factory.mktemp("rerun")
    shutil.copytree(ROOT / "config", work / "config")
    shutil.copy(CONFIG, work / "config" / "config.yaml")
    snakemake(work, "--cores", "2")
    return work


# ------------------------------------------------------------------------------------------ plain tests


def test_readme_table_has_an_edit_for_every_row() -> None:
    rows = readme_table()
    assert len(rows) >= 15
    assert set(rows) == set(EDITS), (sorted(set(rows) - set(EDITS)), sorted(set(EDITS) - set(rows)))
    assert set(EXTRA) <= set(rows)


def rule_blocks() -> dict[str, str]:
    """rule name -> its text, for every rule in rules/*.smk."""
    blocks = {}
    for path in sorted((ROOT / "rules").glob("*.smk")):
        parts = re.split(r"^\s*(?:local)?rule (\w+):\n", path.read_text(), flags=re.MULTILINE)
        blocks.update(dict(zip(parts[1::2], parts[2::2], strict=True)))
    return blocks


def test_every_stage_has_a_code_version_param() -> None:
    """Every rule that runs flanpipe code passes its stage's version as a param (a rerun trigger when bumped);
    only eval_result (a `cp`) and pure targets have none. download is ingest's code."""
    stage_of = {"download": "ingest"}
    with_job = {n: t for n, t in rule_blocks().items() if "output:" in t.split("\n\n\n")[0]}
    without = {n for n, t in with_job.items() if "version=stage_version(" not in t}
    assert without == {"eval_result"}, without
    for name, text in with_job.items():
        if name in without:
            continue
        m = re.search(r'version=stage_version\("(\w+)"\)', text)
        assert m and m.group(1) == stage_of.get(name, name), (name, m and m.group(1))
    assert set(STAGE_VERSIONS) == {stage_of.get(n, n) for n in with_job} - without


def test_canonical_form_and_operational_values() -> None:
    a = canonical({"pack": 256.0, "inputs": 192, "t": (1.0, 0.5), "s": {"b", "a"}, "p": Path("x")})
    assert list(a) == ["inputs", "p", "pack", "s", "t"] and a["pack"] == 256 and isinstance(a["pack"], int)
    assert a["t"] == [1, 0.5] and a["s"] == ["a", "b"] and a["p"] == "x"
    assert repr(canonical({"b": 1.0, "a": [2]})) == repr(canonical({"a": [2.0], "b": 1}))
    assert canonical(True) is True and canonical(2**60 * 1.0) == 2**60 and canonical(1e300) == 1e300
    assert digest_json({"a": 1, "b": 2.0}) == digest_json({"b": 2, "a": 1.0})
    ops = Operational({"log_interval": 5.0, "layout": (1, 1)})
    assert not isinstance(ops, dict) and dict(ops) == {"layout": [1, 1], "log_interval": 5}
    assert json.loads(str(ops)) == dict(ops)
    import pickle

    assert dict(pickle.loads(pickle.dumps(ops))) == dict(ops)  # script rules pickle their params
    with pytest.raises(TypeError, match="never a tracked fact"):
        canonical({"x": ops})


def test_ops_carry_only_operational_keys() -> None:
    from flanpipe.core.train_config import parse_spec

    spec = {"model": {"num_layers": 1}, "train": {"steps": 2, "lr": 0.1, "global_batch_size": 2, "seq_length": 8}}
    with pytest.raises(ValueError, match=r"--ops keys \['lr'\] are not operational"):
        parse_spec(spec, {"lr": 1.0})
    with pytest.raises(ValueError, match="micro_batch_size is in neither"):
        parse_spec(spec)


def test_evaluate_tracks_exactly_the_rank_keys_of_the_eval_block() -> None:
    """Every eval key is either a fact evaluate tracks and hands to RankConfig, or named in EVAL_NOT_SCORING
    (operational or planning): a key added to the schema must be one or the other."""
    from flanpipe.core.io import read_yaml
    from flanpipe.eval.evaluate import RankConfig
    from flanpipe.plan.config import SCHEMA_PATH, load_config
    from flanpipe.plan.contract import EVAL_NOT_SCORING, eval_facts, eval_ops

    keys = set(read_yaml(SCHEMA_PATH)["properties"]["eval"]["properties"])
    facts = eval_facts(load_config(CONFIG))
    assert set(facts) == set(RankConfig.__dataclass_fields__) == keys - set(EVAL_NOT_SCORING)
    assert RankConfig(**facts) == RankConfig.from_config(load_config(CONFIG)["eval"])
    assert dict(eval_ops(load_config(CONFIG))) == {"batch_size": 32, "layout": [1, 1]}


def test_ingest_from_facts_is_ingest_from_the_entry(tmp_path: Path) -> None:
    """A job works from its tracked facts only (spec_from_facts); for ingest that is the whole entry's worth."""
    from flanpipe.core.registry import spec_from_facts
    from flanpipe.data.ingest import ingest_split
    from flanpipe.data.synthetic import generate_dataset
    from flanpipe.plan.config import dataset_spec, load_config
    from flanpipe.plan.contract import ingest_spec

    cfg = load_config(CONFIG)
    generate_dataset(
        "synth_sst", tmp_path / "results/synthetic/synth_sst", sizes={"train": 20, "validation": 4, "test": 4}, seed=0
    )
    spec = dataset_spec(cfg, "synth_sst")
    facts, ops = ingest_spec(cfg, spec)
    assert "description" not in facts and "metric" not in facts and facts["holdout"] == {}
    ingest_split(spec, "train", tmp_path / "a.parquet", root=tmp_path)
    ingest_split(spec_from_facts(facts, defined_in=ops["defined_in"]), "train", tmp_path / "b.parquet", root=tmp_path)
    assert pl.read_parquet(tmp_path / "a.parquet").equals(pl.read_parquet(tmp_path / "b.parquet"))
    meta = pl.read_parquet_metadata(tmp_path / "b.parquet")
    assert meta["flanpipe_stage"] == "ingest" and meta["flanpipe_stage_version"] == str(STAGE_VERSIONS["ingest"])


def test_cost_reads_the_pending_jobs_and_the_profile() -> None:
    summary = (
        "output_file\tdate\trule\tlog-file(s)\tstatus\tplan\n"
        "results/models/heldout_nli\t-\ttrain\tlogs/train/heldout_nli.log\tok\tupdate pending\n"
        "results/models/base-tiny\t-\ttrain\tlogs/train/base-tiny.log\tok\tno update\n"
        "results/eval_groups/heldout_nli/nli\t-\tevaluate\t-\tmissing\tupdate pending\n"
        "results/specs/heldout_nli.json\t-\ttrain_spec\t-\tparams changed\tupdate pending\n"
    )
    jobs = pending_jobs(summary)
    assert [(j.rule, j.output) for j in jobs] == [
        ("train", "results/models/heldout_nli"),
        ("evaluate", "results/eval_groups/heldout_nli/nli"),
    ]
    with pytest.raises(ValueError, match="not a `snakemake --summary` table"):
        pending_jobs("Building DAG of jobs...\n")
    assert profile_gpus(ROOT / "profiles" / "slurm") == (8, 1) and profile_gpus(None) == (None, None)


# ------------------------------------------------------------------------------- on the finished run


@pytest.mark.slow
def test_finished_run_plans_nothing_and_records_code_versions(finished: Path) -> None:
    assert planned(finished) == set()
    meta = pl.read_parquet_metadata(finished / "results/shards/synth_sst/train/natural-all.parquet")
    assert meta["flanpipe_stage_version"] == str(STAGE_VERSIONS["render_shard"])
    packing = json.loads((finished / "results/packed/heldout_nli/packing.json").read_text())
    assert packing["flanpipe_stage_version"] == str(STAGE_VERSIONS["pack"]) and len(packing["digest"]) == 64
    done = json.loads((finished / "results/models/heldout_nli/done.json").read_text())
    assert done["flanpipe_stage_version"] == str(STAGE_VERSIONS["train"]) and done["fingerprint"]
    spec = json.loads((finished / "results/specs/heldout_nli.json").read_text())
    assert "log_interval" not in spec["train"] and "micro_batch_size" not in spec["train"]  # operational: --ops


@pytest.mark.slow
@pytest.mark.parametrize("row", list(EDITS))
def test_readme_row_plans_exactly_its_rules(finished: Path, row: str) -> None:
    with edited(finished, EDITS[row]):
        jobs = planned(finished)
    assert rules_of(jobs) == readme_table()[row], (row, sorted(jobs))
    if row in EXTRA:
        EXTRA[row](jobs)


@pytest.mark.slow
def test_cost_prices_what_an_edit_would_launch(finished: Path) -> None:
    """`flanpipe cost` after a retraining edit: exactly the planned train and evaluate jobs, each priced."""
    with edited(finished, EDITS["`train.lr`"]):
        jobs = planned(finished)
        cmd = [sys.executable, "-m", "flanpipe.cli", "cost", "--json", "--", "--snakefile", str(ROOT / "Snakefile")]
        done = subprocess.run(cmd, cwd=finished, capture_output=True, text=True, env=venv_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cost = json.loads(done.stdout)
    priced = {f"{r['rule']}[{r['job']}]" for r in cost["jobs"]}
    want = {j for j in jobs if j.startswith("train[")} | {j for j in jobs if j.startswith("evaluate[")}
    as_cost = set()
    for j in want:
        wc = dict(kv.split("=") for kv in j.split("[", 1)[1].rstrip("]").split(", "))
        job = wc["run"] if j.startswith("train[") else f"{wc['evalrun']}/{wc['cluster']}"
        as_cost.add(f"{j.split('[')[0]}[{job}]")
    assert priced == as_cost and len(priced) == 3 + 4  # 3 runs; evaluate per (model, cluster)
    assert all(r["gpu_hours"] > 0 and r["gpus"] == 1 for r in cost["jobs"])
    total = sum(r["gpu_hours"] for r in cost["jobs"])
    assert cost["totals"]["gpu_hours"] == pytest.approx(total)


# ------------------------------------------------------------------------------------- run for real


@pytest.mark.slow
def test_operational_edit_runs_nothing(finished: Path) -> None:
    models = file_times(finished, "results/models/*/done.json")
    with edited(finished, EDITS["`train.log_interval` 10 -> 5"]):
        out = snakemake(finished, "--cores", "2")
    assert "Nothing to be done" in out.stdout + out.stderr
    assert file_times(finished, "results/models/*/done.json") == models


def _weights_digest(model_dir: Path) -> str:
    from flanpipe.core.io import files_digest

    files = sorted(p for p in (model_dir / "checkpoint").rglob("*") if p.is_file())
    return files_digest({str(p.relative_to(model_dir)): p for p in files})


@pytest.mark.slow
def test_label_flip_reingests_retrains_from_scratch_and_rescores(finished: Path) -> None:
    """synth_sst's options reordered: its canonical parquet, its shards and the predictions of the model scored
    on it carry the flipped labels; no other dataset is re-ingested; heldout_nli (trained on synth_sst) starts
    fresh instead of resuming its old checkpoint, and ends with other weights."""
    flip = {"negative": "positive", "positive": "negative"}
    ingest = "results/ingest/synth_sst/test.parquet"
    shard = "results/shards/synth_sst/eval/natural.parquet"
    preds = "results/eval_groups/heldout_sentiment/sentiment/natural/synth_sst.predictions.parquet"
    old = {p: pl.read_parquet(finished / p) for p in (ingest, shard, preds)}
    others = file_times(finished, "results/ingest/synth_[cn]*/*.parquet")
    packed = {r: json.loads((finished / f"results/packed/{r}/packing.json").read_text()) for r in RUNS}
    weights = _weights_digest(finished / "results/models/heldout_nli")

    EDITS["synth_sst's `options` reordered (flips every label)"](finished)  # kept: the run now has these labels
    # What the checks below read, not the whole default target: every pack and train reruns anyway (the
    # tokenizer sees synth_sst's shards), but of the 4 evaluation jobs only the one scoring synth_sst is needed.
    snakemake(finished, "--cores", "2", "results/models/heldout_nli", str(Path(preds).parent.parent))

    new = {p: pl.read_parquet(finished / p) for p in (ingest, shard, preds)}
    assert new[ingest]["answer"].to_list() == [flip[a] for a in old[ingest]["answer"]]
    assert new[ingest]["sentence"].to_list() == old[ingest]["sentence"].to_list()
    assert new[shard]["targets"].to_list() == [flip[t] for t in old[shard]["targets"]]
    assert new[shard]["options"].to_list()[0] == ["positive", "negative"]
    key = ["split", "example_id", "template_id"]
    joined = old[preds].join(new[preds], on=key, suffix="_new")
    assert joined.height == old[preds].height and all(
        flip[a] == b for a, b in joined.select("targets", "targets_new").rows()
    )
    assert file_times(finished, "results/ingest/synth_[cn]*/*.parquet") == others  # no other dataset re-ingested

    # heldout_nli trains on synth_sst: same packed row count (what the old resume check compared), other
    # rows: it must start fresh, and its weights differ
    now = {r: json.loads((finished / f"results/packed/{r}/packing.json").read_text()) for r in RUNS}
    assert now["heldout_nli"]["rows"] == packed["heldout_nli"]["rows"]
    assert now["heldout_nli"]["digest"] != packed["heldout_nli"]["digest"]
    log = (finished / "logs/train/heldout_nli.log").read_text()
    assert "starting fresh" in log and "data" in log.split("starting fresh", 1)[1].splitlines()[0], log[-3000:]
    assert _weights_digest(finished / "results/models/heldout_nli") != weights
    # Every run Snakemake retrained (the tokenizer reran, so every pack and train did) resumes exactly when its
    # packed data, tokenizer and initial weights are what its checkpoint was made with: a no-op continuation
    same = {r: all(now[r][k] == packed[r][k] for k in ("digest", "tokenizer_digest")) for r in RUNS}
    for run in RUNS:
        log = (finished / f"logs/train/{run}.log").read_text()
        resumes = same[run] and (run == "base-tiny" or same["base-tiny"])
        assert ("resuming from" in log, "starting fresh" in log) == (resumes, not resumes), (run, log[-2000:])


@pytest.mark.slow
def test_failed_audit_stops_the_run_before_training(finished: Path) -> None:
    """Last (it leaves the run without audits): an audit that now fails stops the run; no model is touched."""
    models = file_times(finished, "results/models/*/done.json")
    logs = file_times(finished, "logs/train/*.log")
    fail = {"ngram": 1, "max_contaminated_fraction": 0.0}  # every eval example shares a word with training
    with edited(finished, config_edit(lambda c: c.update(audit=fail))):
        # the models as targets: the label flip left evaluations pending that are no part of this check
        out = snakemake(finished, "--cores", "2", *(f"results/models/{r}" for r in RUNS), check=False)
    assert out.returncode != 0
    assert "contamination audit failed" in "".join(p.read_text() for p in (finished / "logs/audit").glob("*.log"))
    assert list((finished / "results/audit").glob("*.failed.json"))
    assert file_times(finished, "results/models/*/done.json") == models
    assert file_times(finished, "logs/train/*.log") == logs
