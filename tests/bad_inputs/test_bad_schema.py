"""Bad inputs caught when a file is loaded: the config (schema + cross-field checks), registry entries,
template files, model configs, and the YAML loader they all share (flanpipe.core.io.read_yaml).

Each of these was once accepted silently and gave wrong data or a late crash.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_bad_inputs import TINY, plan, raw_config, registry_dir, write

from flanpipe.core.io import read_yaml
from flanpipe.core.model_config import load_model_config
from flanpipe.core.registry import RegistryError, load_registry
from flanpipe.data.patterns import TemplateError
from flanpipe.data.promptsource_import import load_promptsource_yaml
from flanpipe.plan.checks import PlanError
from flanpipe.plan.config import ConfigError, load_config, validate_config

# ------------------------------------------------------------------------ the YAML loader everywhere


def test_duplicate_config_key_names_file_and_both_lines(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "c.yaml", "registry: [r.yaml]\nheld_out: [nli]\nmodel: m.yaml\ntrain:\n  lr: 1.0\n  lr: 2.0\n"
    )
    with pytest.raises(ValueError, match=rf"{cfg}:6:3: invalid YAML: duplicate key 'lr' \(first at line 5\)"):
        load_config(cfg)


def test_duplicate_key_in_template_entry(tmp_path: Path) -> None:
    registry_dir(
        tmp_path, nli_templates='templates:\n  - inputs: "{premise}"\n    targets: "{answer}"\n    inputs: "x"\n'
    )
    with pytest.raises(ValueError, match=rf"{tmp_path}/t/nli.yaml:4:5: invalid YAML: duplicate key 'inputs'"):
        plan(tmp_path)


def test_duplicate_key_in_registry_entry(tmp_path: Path) -> None:
    reg = registry_dir(tmp_path, extra="    metric: f1\n")  # a second 'metric' inside dataset qa
    with pytest.raises(RegistryError, match=rf"{reg}:\d+:5: invalid YAML: duplicate key 'metric' \(first at line"):
        load_registry([reg])


def test_duplicate_key_in_model_config(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    model = write(tmp_path / "m.yaml", TINY.read_text() + "num_layers: 2\n")
    with pytest.raises(PlanError, match=rf"config key model: model config {model}: {model}:\d+:1: .*duplicate key"):
        plan(tmp_path, model=str(model))


def test_duplicate_key_in_promptsource_file(tmp_path: Path) -> None:
    from flanpipe.data.promptsource_import import load_promptsource_yaml
    from flanpipe.data.template_import import TemplateImportError

    f = write(tmp_path / "templates.yaml", "dataset: x\ntemplates:\n  a: !Template\n    name: n\n    name: m\n")
    with pytest.raises(TemplateImportError, match=rf"{f}:5: .*duplicate key 'name'"):
        load_promptsource_yaml(f)


def test_numbers_load_as_numbers(tmp_path: Path) -> None:
    """PyYAML reads 3e-5 as a string; the schema then said "is not of type 'number'"."""
    registry_dir(tmp_path)
    cfg = write(tmp_path / "c.yaml", f"registry: [r.yaml]\nheld_out: [nli]\nmodel: {TINY}\ntrain: {{lr: 3e-5}}\n")
    assert load_config(cfg)["train"]["lr"] == 3e-5
    assert read_yaml(write(tmp_path / "y.yaml", "a: 1e3\nb: '3e-5'\nc: 1.0e-2\n")) == {
        "a": 1000.0,
        "b": "3e-5",
        "c": 0.01,
    }
    # Snakemake reads --configfile itself (YAML 1.1): the string reaches validation and becomes a number there
    assert validate_config(raw_config(tmp_path, train={"lr": "3e-5"}))["train"]["lr"] == 3e-5


def test_model_config_exponent_float_and_wrong_type(tmp_path: Path) -> None:
    """``init_method_std: 2e-2`` gave a raw TypeError naming no key."""
    ok = write(tmp_path / "ok.yaml", TINY.read_text().replace("init_method_std: 0.02", "init_method_std: 2e-2"))
    assert load_model_config(ok).init_method_std == 0.02
    bad = write(tmp_path / "bad.yaml", TINY.read_text().replace("init_method_std: 0.02", "init_method_std: small"))
    with pytest.raises(ValueError, match=r"init_method_std must be a number > 0 \(e\.g\. 0\.02 or 2e-2\), got 'small'"):
        load_model_config(bad)


def test_model_config_sizes_and_missing_keys(tmp_path: Path) -> None:
    whole = write(tmp_path / "w.yaml", TINY.read_text().replace("vocab_size: 1024", "vocab_size: 1.024e3"))
    assert load_model_config(whole).vocab_size == 1024 and type(load_model_config(whole).vocab_size) is int
    half = write(tmp_path / "h.yaml", TINY.read_text().replace("num_layers: 4", "num_layers: 4.5"))
    with pytest.raises(ValueError, match=r"num_layers must be a positive int, got 4\.5"):
        load_model_config(half)
    gone = write(tmp_path / "g.yaml", TINY.read_text().replace("vocab_size: 1024\n", ""))
    with pytest.raises(ValueError, match=r"missing model config keys: \['vocab_size'\]"):
        load_model_config(gone)


# --------------------------------------------------------------------------------------- the config


def test_integer_fields_take_whole_numbers_only(tmp_path: Path) -> None:
    """``train.steps: 1000.0`` passed the schema and crashed training with a TypeError."""
    cfg = validate_config(raw_config(tmp_path, train={"steps": 1000.0}, ablations={"templates": {"counts": [1.0, 2]}}))
    assert cfg["train"]["steps"] == 1000 and isinstance(cfg["train"]["steps"], int)
    assert cfg["ablations"]["templates"]["counts"] == [1, 2] and all(type(k) is int for k in [1, 2])
    with pytest.raises(ConfigError, match=r"config key train\.steps: 1000\.5 is not of type 'integer'"):
        validate_config(raw_config(tmp_path, train={"steps": 1000.5}))
    with pytest.raises(ConfigError, match=r"config key eval\.examples: True is not of type 'integer'"):
        validate_config(raw_config(tmp_path, eval={"examples": True}))


def test_nested_config_values_from_the_command_line_are_typed_by_the_schema(tmp_path: Path) -> None:
    """Snakemake reads a nested ``--config base='{hf: DIR, fewshot: 1}'`` with YAML's BaseLoader: every value a
    string, so ``base.fewshot: '1' is not of type 'integer'``; a top-level ``model=null`` arrives as "null"."""
    cli = raw_config(
        tmp_path,
        base={"fewshot": "1", "pretrain_steps": "0"},
        train={"lr": "3e-5", "micro_batch_size": "4", "global_batch_size": "8", "max_micro_batch_size": "8"},
        eval={"eval_only_all_runs": "true", "examples": "20"},
        formats={"fewshot": "0.5"},
        ablations={"templates": {"counts": ["1", "2"]}},
        tokenizer={"model": "null", "vocab_size": "1024"},
    )
    cfg = validate_config(cli)
    assert cfg["base"] == {**cfg["base"], "fewshot": 1, "pretrain_steps": 0}
    assert cfg["train"]["lr"] == 3e-5 and cfg["train"]["micro_batch_size"] == 4
    assert cfg["eval"]["eval_only_all_runs"] is True and cfg["eval"]["examples"] == 20
    assert cfg["formats"]["fewshot"] == 0.5 and cfg["ablations"]["templates"]["counts"] == [1, 2]
    assert cfg["tokenizer"]["model"] is None
    # a string the schema's type cannot read is still an error naming the key; string fields stay strings
    with pytest.raises(ConfigError, match=r"config key base\.fewshot: 'one' is not of type 'integer'"):
        validate_config(raw_config(tmp_path, base={"fewshot": "one"}))
    with pytest.raises(ConfigError, match=r"config key eval\.eval_only_all_runs: '2' is not of type 'boolean'"):
        validate_config(raw_config(tmp_path, eval={"eval_only_all_runs": "2"}))
    assert validate_config(raw_config(tmp_path, held_out=["1"]))["held_out"] == ["1"]


@pytest.mark.parametrize(
    ("bad", "culprit"),
    [
        ({"held_out": ["nli", "nli"]}, "config key held_out: ['nli', 'nli'] has non-unique elements"),
        (
            {"ablations": {"templates": {"counts": [2, 2]}}},
            "config key ablations.templates.counts: [2, 2] has non-unique",
        ),
        (
            {"train": {"steps": 10, "warmup_steps": 50}},
            "config key train.warmup_steps: 50 warmup steps are more than train.steps = 10",
        ),
        ({"base": {"pretrain_steps": 5}, "train": {"warmup_steps": 9}}, "more than base.pretrain_steps = 5"),
    ],
)
def test_config_values_that_contradict_each_other(tmp_path: Path, bad: dict, culprit: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate_config(raw_config(tmp_path, **bad))
    assert culprit in str(e.value)


def test_config_values_without_effect_warn(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"config key formats: .* has no effect with templates\.train_mode = 'no_tem"):
        validate_config(raw_config(tmp_path, formats={"fewshot": 0.5}, templates={"train_mode": "no_template"}))
    with pytest.warns(UserWarning, match=r"templates\.num_templates: 2 has no effect with templates\.train_mode"):
        validate_config(raw_config(tmp_path, templates={"num_templates": 2, "train_mode": "no_template"}))
    with pytest.warns(UserWarning, match=r"train\.save_interval: 500 > train\.steps = 100"):
        validate_config(raw_config(tmp_path, train={"steps": 100, "save_interval": 500}))
    with pytest.warns(UserWarning, match=r"base\.pretrain_steps: 50 is ignored because base\.checkpoint is given"):
        validate_config(raw_config(tmp_path, base={"checkpoint": "somewhere", "pretrain_steps": 50}))
    with pytest.warns(UserWarning, match=r"mixture\.max_rate: 500 > mixture\.cap = 100 has no effect"):
        validate_config(raw_config(tmp_path, mixture={"cap": 100, "max_rate": 500}))


# ------------------------------------------------------------------------------------- the registry


@pytest.mark.parametrize(
    ("options", "culprit"),
    [
        ('["positive", "positive"]', "'positive' is listed twice (positions 0 and 1)"),
        ('[1, "1"]', "'1' is listed twice"),
        ('["yes", " "]', "option(s) at position [1] are empty"),
    ],
)
def test_registry_options_unique_and_non_empty(tmp_path: Path, options: str, culprit: str) -> None:
    """``options: [positive, positive]`` collapsed two labels into one, silently."""
    reg = registry_dir(tmp_path)
    reg.write_text(reg.read_text().replace('options: ["yes", "no"]', f"options: {options}"))
    with pytest.raises(RegistryError) as e:
        load_registry([reg])
    assert f"{reg}: dataset 'nli_a': options" in str(e.value) and culprit in str(e.value)


def test_registry_label_map_points_outside_options(tmp_path: Path) -> None:
    reg = registry_dir(tmp_path)
    text = reg.read_text()
    reg.write_text(
        text.replace('options: ["yes", "no"]', 'options: ["yes", "no"]\n    label_map: {"0": "yes", "1": "maybe"}')
    )
    with pytest.raises(RegistryError, match=r"label_map '1' -> 'maybe' is not one of the options \['yes', 'no'\]"):
        load_registry([reg])
    reg.write_text(text.replace('options: ["yes", "no"]', 'options: ["yes", "no"]\n    label_map: {"a": 0, "b": 2}'))
    with pytest.raises(RegistryError, match=r"label_map 'b' -> 2 points past the 2 options"):
        load_registry([reg])


@pytest.mark.parametrize("key", ["answer_is_index: true", "answer_key_field: choices.label"])
def test_registry_index_answer_without_options(tmp_path: Path, key: str) -> None:
    """An index answer with nothing to index would train on the bare numbers "0", "1", ..."""
    reg = registry_dir(tmp_path, extra=f"    {key}\n")
    with pytest.raises(RegistryError, match=rf"dataset 'qa': {key.split(':')[0]} makes the answer an index into"):
        load_registry([reg])


def test_registry_paper_dataset_split_across_clusters(tmp_path: Path) -> None:
    reg = registry_dir(tmp_path)
    reg.write_text(reg.read_text().replace("metric: exact_match", "metric: exact_match\n    paper_dataset: nli_a"))
    with pytest.raises(RegistryError, match=r"dataset 'qa' \(cluster 'closed_book_qa'\) and 'nli_a' \(cluster 'nli'"):
        load_registry([reg])


def test_registry_empty_split_name(tmp_path: Path) -> None:
    reg = registry_dir(tmp_path, extra="    splits: {train: '', validation: validation, test: test}\n")
    with pytest.raises(RegistryError, match=r"at datasets/qa/splits/train: '' should be non-empty"):
        load_registry([reg])


# ---------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("template", "culprit"),
    [
        # the gold label in the prompt of a template that does the task itself
        (
            '{inputs: "{premise} {hypothesis} answer: {answer}", targets: "{answer}"}',
            "template 0 of dataset 'nli_a' (inputs): {answer} in the prompt of a template that does the task itself",
        ),
        # a constant target: every example trains on the string "answer"
        (
            '{inputs: "{premise} {hypothesis}", targets: "answer"}',
            "template 0 of dataset 'nli_a' (targets): 'answer' has no placeholder",
        ),
        ('{inputs: "{premise}", targets: "{hypothesis}"}', "(targets): '{hypothesis}' does not contain {answer}"),
        ('{inputs: "{premise}", targets: "{answer} {options_}"}', "{options_} belongs in 'inputs'"),
        (
            '{inputs: "{answer}", targets: "{premise}", turned_around: true}\n  - {inputs: "{premise}", targets: "x"}',
            "template 1 of dataset 'nli_a' (targets): 'x' has no placeholder",
        ),
    ],
)
def test_template_that_cannot_do_its_task(tmp_path: Path, template: str, culprit: str) -> None:
    registry_dir(tmp_path, nli_templates=f"templates:\n  - {template}\n")
    with pytest.raises(TemplateError) as e:
        plan(tmp_path)
    assert str(e.value).startswith(f"{tmp_path}/t/nli.yaml: template ") and culprit in str(e.value)


def test_template_repeated(tmp_path: Path) -> None:
    registry_dir(
        tmp_path,
        nli_templates='templates:\n  - {inputs: "{premise}", targets: "{answer}"}\n' * 1
        + '  - {inputs: "{hypothesis}", targets: "{answer}"}\n  - {inputs: "{premise}", targets: "{answer}"}\n',
    )
    with pytest.raises(TemplateError, match=rf"{tmp_path}/t/nli\.yaml: template 2 repeats template 0 of dataset"):
        plan(tmp_path)


def test_turned_around_template_may_show_the_answer(tmp_path: Path) -> None:
    registry_dir(
        tmp_path,
        nli_templates='templates:\n  - {inputs: "{premise}", targets: "{answer}"}\n'
        '  - {inputs: "Answer {answer}; premise?", targets: "{premise}", turned_around: true}\n',
    )
    assert len(plan(tmp_path).templates["nli_a"]) == 2


def test_every_shipped_yaml_file_loads_strictly() -> None:
    """The configs, registries, templates, model configs and profiles we ship have no duplicate keys."""
    root = Path(__file__).resolve().parents[2]
    files = sorted([*root.glob("config/**/*.yaml"), *root.glob("profiles/**/*.yaml")])
    assert len(files) > 50
    for f in files:
        if "promptsource" in f.parts:  # promptsource's own format: its !Template tags, same strict loader
            load_promptsource_yaml(f)
        else:
            read_yaml(f)
