"""Bad templates and prompt formats, round 3: Jinja (P3) templates whose renders cannot be trained on or scored,
and Flan 2022 formats that do not fit. Checked where the source text decides (planning), else in the render job
with the template, dataset and example named; rows P3 itself drops are dropped, counted and logged.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml
from test_bad_inputs import TINY, leftovers, plan, registry_dir, spm_model, write  # noqa: F401 (a fixture)
from test_jinja_templates import RECORDS, canonical, spec_for

from flanpipe.cli import main
from flanpipe.core.registry import DatasetSpec, SourceSpec
from flanpipe.data.patterns import TemplateError
from flanpipe.data.templates import load_validated, render_eval_shard, render_shard
from flanpipe.plan.checks import PlanError


def jinja_file(path: Path, jinja: str, answer_choices: str | None = None, label: bool = False) -> Path:
    entry = {"kind": "jinja", "jinja": jinja}
    if answer_choices is not None:
        entry["answer_choices"] = answer_choices
    if label:
        entry["label"] = "label"
    return write(path, yaml.safe_dump({"templates": [entry]}))


@pytest.fixture
def toy(tmp_path: Path) -> tuple[Path, Path]:
    """RECORDS as canonical train / validation / test parquet (record 1 has an empty activity_label)."""
    for split in ("train", "validation", "test"):
        canonical(RECORDS).write_parquet(tmp_path / f"{split}.parquet")
    return tmp_path, tmp_path / "t.yaml"


# ----------------------------------------------------------------------------- checked while planning


def test_duplicate_literal_answer_choices_fail_at_load(tmp_path: Path) -> None:
    """``yes ||| yes ||| no``: the gold of one label is ambiguous (rank classification picks the first)."""
    path = jinja_file(tmp_path / "t.yaml", "{{ ctx }} ||| {{ answer_choices[label] }}", "yes ||| yes ||| no", True)
    spec = spec_for(path)
    with pytest.raises(
        TemplateError,
        match=r"t.yaml: template 0 of dataset 'toy_jinja' \(answer_choices\): choice\(s\) \['yes'\] repeated",
    ):
        load_validated(spec)


def test_template_without_separator_fails_at_load(tmp_path: Path) -> None:
    """It failed only in the render job ("renders 0 '|||' separators")."""
    spec = spec_for(jinja_file(tmp_path / "t.yaml", "{{ ctx }} and then {{ activity_label }}"))
    with pytest.raises(TemplateError, match=r"t.yaml: template 0 of dataset 'toy_jinja': the template has no '\|\|\|'"):
        load_validated(spec)


@pytest.mark.parametrize("formats", [{"fewshot": 0.5}, {"options": 0.5}])
def test_prompt_formats_of_a_jinja_training_template_fail_while_planning(tmp_path: Path, formats: dict) -> None:
    """t0.yaml + ``formats`` failed in the render job: prompt formats rewrite pattern templates only."""
    nli = 'templates:\n  - kind: jinja\n    jinja: "{{ premise }} {{ hypothesis }} ||| {{ answer }}"\n'
    registry_dir(tmp_path, nli_templates=nli)
    p = plan(tmp_path, held_out=["nli"])  # nli is held out: its jinja template only evaluates, no formats apply
    assert p.runs["heldout_nli"].datasets == ("qa",)
    with pytest.raises(
        PlanError,
        match=rf"config key formats.{next(iter(formats))}: run 'heldout_closed_book_qa' trains on dataset 'nli_a' "
        r"with kind: jinja template\(s\) \[0\] of .*nli.yaml",
    ):
        plan(tmp_path, held_out=["closed_book_qa"], formats=formats)
    options = plan(tmp_path, held_out=["closed_book_qa"], ablations={"options": {"settings": ["always", "never"]}})
    with pytest.raises(PlanError, match=r"ablation options: config key ablations.options: run .*opts-never"):
        options.check_ablation("options")


# ----------------------------------------------------------------------------- checked as rows render


def test_answer_choices_repeated_for_one_example(toy: tuple[Path, Path]) -> None:
    root, path = toy
    spec = spec_for(
        jinja_file(path, "{{ ctx }} ||| {{ answer_choices[label] }}", "{{ endings[0] }} ||| {{ endings[0] }}", True)
    )
    with pytest.raises(
        TemplateError,
        match=r"t.yaml: template 0: dataset 'toy_jinja', example_id 0: .*choice\(s\) \['pours water'\] repeated",
    ):
        render_shard(spec, root / "train.parquet", root / "shard.parquet")
    assert not (root / "shard.parquet").exists() and leftovers(root) == []


def test_empty_target_is_an_error_naming_template_dataset_and_example(toy: tuple[Path, Path]) -> None:
    """168 training rows trained on a bare EOS, 49 eval rows scored against ""."""
    root, path = toy
    spec = spec_for(jinja_file(path, "{{ ctx }} ||| {{ activity_label }}"))
    want = r"t.yaml: template 0: dataset 'toy_jinja', example_id 1: does not render: the target renders empty"
    with pytest.raises(TemplateError, match=want):
        render_shard(spec, root / "train.parquet", root / "shard.parquet")
    with pytest.raises(TemplateError, match=want):
        render_eval_shard(spec, {"test": root / "test.parquet"}, root / "eval.parquet")
    assert not (root / "shard.parquet").exists() and not (root / "eval.parquet").exists() and leftovers(root) == []


def test_empty_prompt_rows_are_dropped_counted_and_logged(
    toy: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    """A prompt that renders empty for some rows was kept (an empty prompt scored or trained on); P3 drops such
    rows, so they are dropped here too, counted in the job's report and named in its log."""
    root, path = toy
    spec = spec_for(jinja_file(path, "{% if activity_label %}{{ ctx }}{% endif %} ||| {{ answer }}"))
    report = render_shard(spec, root / "train.parquet", root / "shard.parquet")
    assert report["rows"] == 3 and report["dropped_empty_prompt"] == 1
    assert pl.read_parquet(root / "shard.parquet")["example_id"].to_list() == [0, 2, 3]
    err = capsys.readouterr().err
    assert "t.yaml: template 0: dataset 'toy_jinja' (train): dropped 1 of the rows it rendered" in err
    assert "example_ids [1]" in err
    report = render_eval_shard(
        spec, {"validation": root / "validation.parquet", "test": root / "test.parquet"}, root / "e.parquet"
    )
    assert report["rows"] == 6 and report["dropped_empty_prompt"] == 2
    # a whole render that is empty (a conditional around everything) is P3's "empty example": dropped too
    spec = spec_for(jinja_file(path, "{% if activity_label %}{{ ctx }} ||| {{ answer }}{% endif %}"))
    assert render_shard(spec, root / "train.parquet", root / "shard.parquet")["dropped_empty_prompt"] == 1


# ----------------------------------------------------------------------------- templates import --verbatim


def test_verbatim_import_fails_when_a_prompt_cannot_be_kept(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--verbatim promises every prompt as written, but skipped one that does not parse (exit status 0)."""
    root = tmp_path / "ps"
    write(
        root / "toy" / "templates.yaml",
        "dataset: toy\ntemplates:\n"
        + "".join(
            f"  u-{i}: !Template\n    id: u-{i}\n    name: {name}\n    jinja: '{jinja}'\n    answer_choices: null\n"
            for i, name, jinja in (
                (1, "fine", "{{ ctx }} ||| {{ answer }}"),
                (2, "broken", "{{ ctx ||| {{ answer }}"),
                (3, "turned", "{{ answer }} ||| {{ ctx }}"),
            )
        )
        + "    metadata: !TemplateMetadata\n      original_task: false\n",
    )
    out = tmp_path / "toy.yaml"
    argv = ["templates", "import", "--from", "promptsource", str(root), "--dataset", "toy", "--verbatim"]
    argv += ["--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'but 1 cannot be kept (u-2 "broken": Jinja does not parse' in err and "nothing written" in err
    assert not out.exists()
    write(
        root / "toy" / "templates.yaml",
        (root / "toy" / "templates.yaml").read_text().replace("{{ ctx |||", "{{ ctx }} |||"),
    )
    main(argv)
    assert out.exists()  # the turned-around one is left out by design (u-3), and says so in the summary


# ----------------------------------------------------------------------------- Flan 2022 few-shot formats


def toy_qa(tmp_path: Path, n: int = 60) -> tuple[DatasetSpec, list[str], Path]:
    """A one-template QA dataset whose questions differ in length, its questions and its train split."""
    write(tmp_path / "t.yaml", 'templates:\n  - {inputs: "Q: {question}", targets: "{answer}"}\n')
    spec = DatasetSpec(
        name="toy_qa",
        cluster="closed_book_qa",
        source=SourceSpec(type="local", path="unused/{split}.jsonl"),
        fields={"question": "question", "answer": "answer"},
        metric="exact_match",
        templates=tmp_path / "t.yaml",
    )
    questions = [" ".join(f"w{(i * 7 + j) % 300}" for j in range(4 + i % 5)) for i in range(n)]
    canonical = tmp_path / "train.parquet"
    pl.DataFrame(
        {"example_id": range(n), "question": questions, "answer": [f"x{i % 7}" for i in range(n)]}
    ).write_parquet(canonical)
    return spec, questions, canonical


def test_fewshot_rows_too_long_lose_exemplars_not_their_question(tmp_path: Path, spm_model: Path) -> None:  # noqa: F811
    """formats {fewshot: 1.0, shots: 20} with short inputs: rows were cut from the end, so the row's own question
    was gone and only exemplars remained (a target for a question never shown); only a count recorded it."""
    from flanpipe.data.formats import EXEMPLAR_ENDS, FormatMix
    from flanpipe.data.packing import pack_mixture
    from flanpipe.data.tokenize import encode_parquet, open_tokenizer

    spec, questions, canonical = toy_qa(tmp_path)
    n = len(questions)
    shard = tmp_path / "shard.parquet"
    render_shard(spec, canonical, shard, formats=FormatMix(fewshot=1.0, shots=20))
    rows = pl.read_parquet(shard)
    fewshot = rows.filter(pl.col(EXEMPLAR_ENDS).list.len() > 0)
    assert fewshot.height == n - 20 and (fewshot[EXEMPLAR_ENDS].list.len() == 20).all()
    tok = open_tokenizer(spm_model)
    enc = encode_parquet(tok, shard, inputs_length=96, targets_length=8)
    assert enc.trimmed_exemplars == fewshot.height  # 20 exemplars never fit in 96 tokens
    assert enc.truncated_inputs == 0  # every row's own prompt fits once exemplars are dropped
    by_id = dict(zip(rows["example_id"], range(rows.height), strict=True))
    kept = []
    for r in fewshot.iter_rows(named=True):
        ids, _ = enc.example(by_id[r["example_id"]])
        text, own = tok.decode(ids.tolist()), f"Q: {questions[r['example_id']]}"
        assert text.endswith(own) and len(ids) <= 96, (text, own)  # the row's question is there, whole
        kept.append(text.count("Q: ") - 1)  # exemplars left, all whole (each starts with its own "Q: ")
        assert r["inputs"].endswith(text)  # what is left is the rendered prompt minus leading exemplars
    assert min(kept) >= 1 and max(kept) < 20, kept  # as many exemplars as fit, not none
    # through the DAG's stages: the mixture keeps the boundaries, and the pack rule reports the count
    from flanpipe.data.mixing import MixtureConfig, build_mixture

    mixture = tmp_path / "mixture.parquet"
    build_mixture({"toy_qa": shard}, MixtureConfig(), mixture, tmp_path / "mixture.json", budget_tokens=n * 40,
                  inputs_length=96, targets_length=8)  # fmt: skip
    assert pl.read_parquet(mixture).select(pl.col(EXEMPLAR_ENDS).list.len() > 0).to_series().sum() > 0
    stats = pack_mixture(
        mixture, spm_model, TINY, tmp_path / "packed", lengths={"inputs": 96, "targets": 8, "pack": 128}, num_threads=1
    )
    drawn = pl.read_parquet(mixture).filter(pl.col(EXEMPLAR_ENDS).list.len() > 0).height
    assert stats["trimmed_exemplars"] == drawn and stats["truncated_inputs"] == 0


def test_fewshot_eval_prompts_too_long_lose_exemplars_not_their_question(tmp_path: Path, spm_model: Path) -> None:  # noqa: F811
    """A k-shot eval prompt (base.fewshot) longer than lengths.inputs was cut like any input, keeping its start:
    with 20 exemplars only exemplars were scored, never the question. It now loses exemplars from the front,
    training's rule, and the eval JSON counts the rows that did."""
    from test_evaluate import make_lm

    from flanpipe.data.formats import EXEMPLAR_ENDS
    from flanpipe.data.tokenize import open_tokenizer
    from flanpipe.eval.evaluate import evaluate_shard, fit_fewshot

    spec, questions, train = toy_qa(tmp_path)
    validation = tmp_path / "validation.parquet"
    pl.read_parquet(train).head(6).write_parquet(validation)
    shard_path = tmp_path / "eval.parquet"
    render_eval_shard(spec, {"validation": validation, "test": validation}, shard_path, shots=20, train=train)
    shard = pl.read_parquet(shard_path)
    assert shard.height == 12 and (shard[EXEMPLAR_ENDS].list.len() == 20).all()
    tok = open_tokenizer(spm_model)
    fitted = fit_fewshot(tok, shard, 96)
    assert fitted["exemplars_trimmed"].all()  # 20 exemplars never fit in 96 tokens
    for r, whole in zip(fitted.iter_rows(named=True), shard["inputs"], strict=True):
        own = f"Q: {questions[r['example_id']]}"
        assert r["inputs"].endswith(own) and whole.endswith(r["inputs"])  # the prompt minus leading exemplars
        assert len(tok.encode_batch([r["inputs"]])[0]) <= 96
        assert 1 <= r["inputs"].count("Q: ") - 1 < 20  # as many whole exemplars as fit, not none
    result = evaluate_shard(make_lm(tok.vocab_size), tok, shard, "exact_match", 96, 8, batch_size=8)
    assert result["exemplars_trimmed"] == shard.height and result["inputs_cut"] == 0
    zero_shot = shard.drop(EXEMPLAR_ENDS)  # a shard without exemplar ends is left as it is
    assert fit_fewshot(tok, zero_shot, 96).equals(zero_shot)


def test_fewshot_with_more_shots_than_training_examples(toy: tuple[Path, Path]) -> None:
    """Every example became an exemplar: no row was few-shot, with no word."""
    from flanpipe.data.formats import FormatMix

    root, path = toy
    write(path, 'templates:\n  - {inputs: "{ctx}", targets: "{answer}"}\n')
    spec = spec_for(path)
    with pytest.raises(ValueError, match=r"dataset 'toy_jinja': formats.shots = 4 exemplars need more than 4 .* has 4"):
        render_shard(spec, root / "train.parquet", root / "shard.parquet", formats=FormatMix(fewshot=0.5, shots=4))
    assert not (root / "shard.parquet").exists() and leftovers(root) == []
    render_shard(spec, root / "train.parquet", root / "shard.parquet", formats=FormatMix(fewshot=0.5, shots=3))


def test_literal_answer_choices_must_match_the_options_the_label_indexes(tmp_path: Path) -> None:
    """``yes ||| no`` indexed by the label of a three-option dataset: the third label failed as an IndexError in
    the render job (or, the other way round, a choice no label ever picks)."""
    nli = yaml.safe_dump(
        {
            "templates": [
                {
                    "kind": "jinja",
                    "jinja": "{{ premise }} ||| {{ answer_choices[label] }}",
                    "answer_choices": "yes ||| maybe ||| no",
                    "label": "label",
                }
            ]
        }  # fmt: skip
    )
    registry_dir(tmp_path, nli_templates=nli)
    with pytest.raises(TemplateError, match=r"nli.yaml: template 0 \(answer_choices\): 3 literal choices, but "
                       r"'label: label' indexes dataset 'nli_a''s 2 options \['yes', 'no'\]"):  # fmt: skip
        plan(tmp_path)
