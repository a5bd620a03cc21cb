"""Synthetic datasets: deterministic, correctly sized, balanced, labels re-derivable from the text, and
consistent with the embedded registry and its templates. Label checks re-parse the text with their own
regexes (only word lists and fact tables are shared), so a generator bug cannot vouch for itself."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from dag import ROOT, read_jsonl

from flanpipe.data import synthetic as syn

REGISTRY = ROOT / "config" / "registry" / "embedded.yaml"
SIZES = {"train": 400, "validation": 60, "test": 60}
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# number of classes of each dataset's int `label` column
N_CLASSES = {
    "synth_nli_entail": 3,
    "synth_nli_rte": 2,
    "synth_sst": 2,
    "synth_reviews": 2,
    "synth_paws": 2,
    "synth_qqp": 2,
    "synth_copa": 2,
    "synth_piqa": 2,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[dict]]]:
    """All 12 datasets at the default sizes: name -> split -> rows."""
    root = tmp_path_factory.mktemp("synthetic")
    out = syn.generate_all(root, SIZES, seed=0)
    return {name: {p.stem: read_jsonl(p) for p in paths} for name, paths in out.items()}


@pytest.fixture(scope="module")
def registry() -> dict[str, dict]:
    return yaml.safe_load(REGISTRY.read_text(encoding="utf-8"))["datasets"]


def all_rows(data: dict, name: str) -> list[dict]:
    return [r for split in SIZES for r in data[name][split]]


# ---------------------------------------------------------------------------------------------------
# determinism, sizes, speed, balance


def test_twelve_datasets_two_per_cluster(registry: dict) -> None:
    assert set(registry) == set(syn.GENERATORS)
    assert set(Counter(e["cluster"] for e in registry.values()).values()) == {2}
    assert len(registry) == 12


def test_byte_identical_across_calls_and_split_order(tmp_path: Path) -> None:
    a = syn.generate_dataset("synth_copa", tmp_path / "a", SIZES, seed=7)
    b = syn.generate_dataset("synth_copa", tmp_path / "b", dict(reversed(SIZES.items())), seed=7)
    for pa in a:
        assert pa.read_bytes() == (tmp_path / "b" / pa.name).read_bytes()
    assert [p.name for p in b] == ["test.jsonl", "validation.jsonl", "train.jsonl"]
    c = syn.generate_dataset("synth_copa", tmp_path / "c", SIZES, seed=8)
    assert c[0].read_bytes() != a[0].read_bytes()  # the seed matters
    assert a[0].read_bytes() != a[1].read_bytes()  # splits are distinct streams
    assert not list((tmp_path / "a").glob(".*"))  # no temp files left behind


def test_split_seed_is_stable() -> None:
    """Pinned value: a change here silently changes every generated file."""
    assert syn.split_seed(0, "synth_sst", "train") == syn.split_seed(0, "synth_sst", "train")
    assert syn.split_seed(0, "synth_sst", "train") != syn.split_seed(0, "synth_sst", "test")
    assert syn.split_seed(0, "a", "bc") != syn.split_seed(0, "ab", "c")


def test_sizes_utf8_and_plain_json(data: dict, tmp_path: Path) -> None:
    for name, splits in data.items():
        for split, n in SIZES.items():
            assert len(splits[split]) == n, (name, split)
    paths = syn.generate_dataset("synth_e2e", tmp_path, {"train": 50}, seed=0)
    raw = paths[0].read_bytes()
    assert "Café".encode() in raw  # written as UTF-8, not \u escapes
    assert raw.endswith(b"\n") and raw.count(b"\n") == 50


def test_generation_of_all_twelve_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    syn.generate_all(tmp_path, SIZES, seed=3)
    assert time.perf_counter() - start < 2.0


def test_bad_arguments_are_explicit(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown synthetic dataset"):
        syn.generate_dataset("nope", tmp_path, SIZES, seed=0)
    with pytest.raises(ValueError, match="size must be"):
        syn.generate_dataset("synth_sst", tmp_path, {"train": 0}, seed=0)


@pytest.mark.parametrize("name", sorted(N_CLASSES))
def test_labels_balanced(data: dict, name: str) -> None:
    k = N_CLASSES[name]
    for split, n in SIZES.items():
        counts = Counter(r["label"] for r in data[name][split])
        assert set(counts) == set(range(k))
        assert all(abs(c - n / k) <= 1 for c in counts.values()), (split, counts)


# ---------------------------------------------------------------------------------------------------
# every label follows from the text


def sst_label(sentence: str) -> int:
    polar = [w for w in sentence.split() if w in syn.SST_POSITIVE or w in syn.SST_NEGATIVE]
    assert len(polar) == 1, sentence
    return int(polar[0] in syn.SST_POSITIVE)


def test_sst_label_is_its_single_polar_word(data: dict) -> None:
    for r in all_rows(data, "synth_sst"):
        assert 8 <= len(r["sentence"].split()) <= 15, r
        assert sst_label(r["sentence"]) == r["label"], r


def review_polarity(sentence: str) -> int | None:
    """Lexicon polarity, flipped by a negator; None for a sentence without a polar word."""
    words = re.findall(r"[a-z]+", sentence.lower())
    polar = [w for w in words if w in syn.REVIEW_POSITIVE or w in syn.REVIEW_NEGATIVE]
    if not polar:
        return None
    assert len(polar) == 1, sentence
    positive = polar[0] in syn.REVIEW_POSITIVE
    return int(positive != any(w in syn.REVIEW_NEGATORS for w in words))


def test_review_label_follows_lexicon_with_negation(data: dict) -> None:
    negated = 0
    for r in all_rows(data, "synth_reviews"):
        sentences = re.split(r"(?<=\.) ", r["text"])
        polarities = [p for p in map(review_polarity, sentences) if p is not None]
        assert len(polarities) >= 2 and set(polarities) == {r["label"]}, r
        assert review_polarity(r["title"]) == r["label"], r
        assert r["stars"] in ((4, 5) if r["label"] == 1 else (1, 2))
        negated += any(w in syn.REVIEW_NEGATORS for w in r["text"].lower().split())
    assert negated > 100  # negation is common enough to matter


def nli_facts(premise: str) -> tuple[str, str, str]:
    """(name, city, job) from one of the premise forms."""
    if m := re.fullmatch(r"(\w+) is an? (\w+) who lives in (\w+)\.", premise):
        return m[1], m[3], m[2]
    if m := re.fullmatch(r"(\w+) lives in (\w+) and works as an? (\w+)\.", premise):
        return m[1], m[2], m[3]
    m = re.fullmatch(r"An? (\w+) named (\w+) has lived in (\w+) for \d+ years\.", premise)
    assert m, premise
    return m[2], m[3], m[1]


def nli_label(premise: str, hypothesis: str) -> int:
    """0 entailment / 1 neutral / 2 contradiction under "one home city and one job each"."""
    name, city, job = nli_facts(premise)
    assert hypothesis.startswith(name + " ")
    if m := re.fullmatch(r"\w+ does not live in (\w+)\.", hypothesis):
        return 2 if m[1] == city else 0
    if m := re.fullmatch(r"\w+ lives in (\w+)\.", hypothesis):
        return 0 if m[1] == city else 2
    if m := re.fullmatch(r"\w+ is not an? (\w+)\.", hypothesis):
        return 2 if m[1] == job else 0
    if m := re.fullmatch(r"\w+ (?:is|works as) an? (\w+)\.", hypothesis):
        return 0 if m[1] == job else 2
    return 1


def test_nli_entail_label_follows_facts(data: dict) -> None:
    for r in all_rows(data, "synth_nli_entail"):
        assert nli_label(r["premise"], r["hypothesis"]) == r["label"], r


RTE_S1 = (
    r"(?P<company>.+), an? \w+ firm based in (?P<city>\w+), said on \w+ that it had hired (?P<name>\w+) "
    r"as its new (?P<role>.+)\.",
    r"On \w+, the (?P<city>\w+)-based \w+ company (?P<company>.+) named (?P<name>\w+) its (?P<role>.+), "
    r"replacing \w+\.",
    r"(?P<name>\w+), who previously worked at .+, has joined (?P<company>.+) as (?P<role>.+), "
    r"the (?P<city>\w+) firm announced\.",
)


def rte_label(s1: str, s2: str) -> int:
    """0 entailment / 1 not entailment."""
    f = next(m.groupdict() for p in RTE_S1 if (m := re.fullmatch(p, s1)))
    if m := re.fullmatch(r"(\w+) works for (.+)\.", s2):
        return int((m[1], m[2]) != (f["name"], f["company"]))
    if m := re.fullmatch(r"(.+) is based in (\w+)\.", s2):
        return int((m[1], m[2]) != (f["company"], f["city"]))
    if m := re.fullmatch(r"(\w+) is the new (.+) of (.+)\.", s2):
        return int((m[1], m[2], m[3]) != (f["name"], f["role"], f["company"]))
    if m := re.fullmatch(r"(.+) has a new (.+)\.", s2):
        return int((m[1], m[2]) != (f["company"], f["role"]))
    assert re.fullmatch(r"\w+ founded .+\.", s2), s2
    return 1


def test_rte_label_follows_facts(data: dict) -> None:
    for r in all_rows(data, "synth_nli_rte"):
        assert rte_label(r["sentence1"], r["sentence2"]) == r["label"], r


def test_arith_answer_is_computed(data: dict) -> None:
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    for r in all_rows(data, "synth_arith"):
        m = re.search(r"(\d+) (plus|minus|times) (\d+)", r["question"])
        assert m, r
        assert r["answer"] == str(ops[m[2]](int(m[1]), int(m[3]))), r
        assert int(r["answer"]) >= 0


def test_capitals_answer_from_table(data: dict) -> None:
    capital_of = dict(syn.CAPITALS)
    country_of = {v: k for k, v in syn.CAPITALS}
    for r in all_rows(data, "synth_capitals"):
        countries = [c for c in capital_of if re.search(rf"\b{c}\b", r["question"])]
        if countries:
            assert r["answer"] == capital_of[countries[0]], r
        else:
            capital = next(k for k in country_of if k in r["question"])
            assert r["answer"] == country_of[capital], r


def paws_event(sentence: str) -> tuple[str, str, int, str]:
    """(agent, patient, verb group, "place time") from any of the four surface forms."""
    group = {v: i for i, g in enumerate(syn.PAWS_VERBS) for v in g}
    if "," in sentence:
        front, clause = sentence.split(", ", 1)
        tail = " " + front[0].lower() + front[1:]
        clause = clause.removesuffix(".")
    else:
        clause, tail = sentence.removesuffix("."), ""
    if m := re.fullmatch(r"(\w+) was (\w+) by (\w+) (.+)", clause):
        patient, verb, agent, rest = m.groups()
    else:
        m = re.fullmatch(r"(\w+) (\w+) (\w+) (.+)", clause)
        assert m, sentence
        agent, verb, patient, rest = m.groups()
    return agent, patient, group[verb], rest + tail


def test_paws_label_is_same_event(data: dict) -> None:
    for r in all_rows(data, "synth_paws"):
        e1, e2 = paws_event(r["sentence1"]), paws_event(r["sentence2"])
        assert r["sentence1"] != r["sentence2"]
        assert int(e1 == e2) == r["label"], r
        if r["label"] == 0:  # only the roles differ, PAWS-style
            assert (e1[1], e1[0], *e1[2:]) == e2, r


def qqp_meaning(question: str) -> tuple[str, str]:
    found = {
        (intent, m[1])
        for intent, templates in syn.QQP_INTENTS.items()
        for t in templates
        if (m := re.fullmatch(re.escape(t).replace(re.escape("{x}"), "(.+)"), question))
    }
    assert len(found) == 1, (question, found)
    return found.pop()


def test_qqp_label_is_same_intent_and_topic(data: dict) -> None:
    for r in all_rows(data, "synth_qqp"):
        assert r["question1"] != r["question2"]
        assert int(qqp_meaning(r["question1"]) == qqp_meaning(r["question2"])) == r["label"], r


def test_e2e_text_states_the_values(data: dict) -> None:
    for r in all_rows(data, "synth_e2e"):
        mr = dict(re.findall(r"([\w ]+)\[([^\]]*)\], ?", r["meaning_representation"] + ", "))
        assert list(mr)[:2] == ["name", "eatType"], r
        for attr in ("name", "eatType", "food", "near", "customer rating"):
            if attr in mr:
                assert mr[attr] in r["human_reference"], (attr, r)
        if mr.get("familyFriendly") == "no":
            assert " not " in r["human_reference"], r


def test_webnlg_text_states_every_object(data: dict) -> None:
    for r in all_rows(data, "synth_webnlg"):
        triples = [t.split(" | ") for t in r["triples"].split(" ; ")]
        assert all(len(t) == 3 for t in triples), r
        assert r["target"].startswith(triples[0][0] + " "), r
        for s, _, o in triples:
            assert s in r["target"] and o in r["target"], r


def copa_parse(sentence: str) -> set[tuple[int, int, str]]:
    """Every (pair index, role 0 cause / 1 effect, person) the sentence can be read as."""
    out = set()
    for i, pair in enumerate(syn.COPA_PAIRS):
        for role, text in enumerate(pair):
            pattern = re.escape(text[0].upper() + text[1:]).replace(re.escape("{p}"), r"(\w+)") + r"\."
            if m := re.fullmatch(pattern, sentence):
                out.add((i, role, m[1] if m.groups() else ""))
    return out


def test_copa_answer_is_the_causal_partner(data: dict) -> None:
    for r in all_rows(data, "synth_copa"):
        assert r["options"] == [r["choice1"], r["choice2"]] and r["answer"] == r["options"][r["label"]]
        ((i, role, _),) = copa_parse(r["premise"])
        assert r["question"] == ("effect" if role == 0 else "cause"), r
        assert (i, 1 - role) in {(j, k) for j, k, _ in copa_parse(r["answer"])}, r
        wrong = r["options"][1 - r["label"]]
        assert {k for _, k, _ in copa_parse(wrong)} == {1 - role}, r
        assert i not in {j for j, _, _ in copa_parse(wrong)}, r
    questions = Counter(r["question"] for r in data["synth_copa"]["train"])
    assert abs(questions["cause"] - questions["effect"]) < 80


def piqa_tool(solution: str) -> str:
    m = re.fullmatch(r"Use (.+) to .+ it\.", solution) or re.fullmatch(r"Grab (.+) and use it to .+\.", solution)
    assert m, solution
    return m[1]


def test_piqa_answer_uses_a_fitting_tool(data: dict) -> None:
    for r in all_rows(data, "synth_piqa"):
        assert r["options"] == [r["sol1"], r["sol2"]] and r["answer"] == r["options"][r["label"]]
        verb, _, good, bad = next(t for t in syn.PIQA_TASKS if re.search(rf"\b{t[0]}\b", r["goal"].lower()))
        assert piqa_tool(r["answer"]) in good, r
        assert piqa_tool(r["options"][1 - r["label"]]) in bad, r


# ---------------------------------------------------------------------------------------------------
# the registry and templates fit the generated data


def test_registry_entries_point_at_generated_files(registry: dict) -> None:
    for name, e in registry.items():
        assert e["source"] == {"type": "local", "format": "jsonl", "path": f"results/synthetic/{name}/{{split}}.jsonl"}
        assert e["splits"] == {"train": "train", "validation": "validation", "test": "test"}
        assert "answer" in e["fields"]
        has_options = "options" in e or "options_field" in e
        assert e["metric"] == (
            "accuracy" if has_options else "rouge" if e["cluster"] == "struct_to_text" else "exact_match"
        )
        if "options" in e:  # quoted in YAML: an unquoted yes/no would load as a bool
            assert all(isinstance(o, str) for o in e["options"]), name


def test_source_columns_and_labels_fit_the_registry(data: dict, registry: dict) -> None:
    for name, e in registry.items():
        for row in all_rows(data, name):
            assert set(e["fields"].values()) <= set(row), (name, row)
            answer = row[e["fields"]["answer"]]
            if "options" in e:
                assert isinstance(answer, int) and 0 <= answer < len(e["options"]), (name, row)
            elif "options_field" in e:
                opts = row[e["fields"][e["options_field"]]]
                assert isinstance(opts, list) and answer in opts and len(set(opts)) == len(opts), (name, row)
            else:
                assert isinstance(answer, str) and answer, (name, row)


def test_template_placeholders_name_mapped_fields(data: dict, registry: dict) -> None:
    for name, e in registry.items():
        path = ROOT / e.get("templates", f"config/templates/{name}.yaml")
        templates = yaml.safe_load(path.read_text(encoding="utf-8"))["templates"]
        has_options = "options" in e or "options_field" in e
        natural = [t for t in templates if not t.get("turned_around", False)]
        assert len(natural) >= 3, name
        columns = set(data[name]["train"][0])
        for t in templates:
            for key in ("inputs", "targets"):
                text = t[key].replace("{{", "").replace("}}", "")
                assert "{" not in PLACEHOLDER.sub("", text) and "}" not in PLACEHOLDER.sub("", text), (name, t)
                for field in PLACEHOLDER.findall(text):
                    if field == "options_":
                        assert has_options and not t.get("turned_around", False), (name, t)
                    else:
                        assert field in e["fields"] and e["fields"][field] in columns, (name, field)
        if has_options:
            assert all(t["inputs"].endswith("\n\n{options_}") and t["targets"] == "{answer}" for t in natural), name
    turned = [
        n for n, e in registry.items() if "turned_around: true" in (ROOT / f"config/templates/{n}.yaml").read_text()
    ]
    assert 5 <= len(turned) <= 7, turned


def test_registry_and_templates_pass_the_real_validators(data: dict, tmp_path: Path) -> None:
    """The project's own loader, template validator and ingest accept the entries and the files."""
    registry_mod = pytest.importorskip("flanpipe.core.registry")
    templates_mod = pytest.importorskip("flanpipe.data.templates")
    ingest_mod = pytest.importorskip("flanpipe.data.ingest")
    specs = registry_mod.load_registry([REGISTRY])
    syn.generate_all(tmp_path / "results" / "synthetic", {"train": 30, "validation": 6, "test": 6}, seed=0)
    for name, spec in specs.items():
        path = ROOT / spec.templates
        templates_mod.validate_templates(templates_mod.load_templates(path), spec, path)
        report = ingest_mod.ingest_split(spec, "train", tmp_path / f"{name}.parquet", root=tmp_path)
        assert report["rows"] == 30 and not report["dropped"], report


# ---------------------------------------------------------------------------------------------------
# the learnable task


def test_sst_is_learnable_by_bag_of_words(data: dict) -> None:
    """Sanity proof that the signal exists: logistic regression on word presence, trained on train,
    scores > 90% on test (a ~2M-parameter transformer only has to find the same words)."""
    train, test = data["synth_sst"]["train"], data["synth_sst"]["test"]
    vocab = {w: i for i, w in enumerate(sorted({w for r in train for w in r["sentence"].split()}))}

    def featurize(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        x = np.zeros((len(rows), len(vocab) + 1))  # last column: bias
        x[:, -1] = 1.0
        for i, r in enumerate(rows):
            x[i, [vocab[w] for w in r["sentence"].split() if w in vocab]] = 1.0
        return x, np.array([r["label"] for r in rows], dtype=float)

    (x, y), (xt, yt) = featurize(train), featurize(test)
    w = np.zeros(x.shape[1])
    for _ in range(300):  # full-batch gradient descent on the mean log loss
        p = 1.0 / (1.0 + np.exp(-x @ w))
        w -= 1.0 * x.T @ (p - y) / len(y)
    correct = (xt @ w > 0) == (yt == 1)
    assert float(correct.mean()) > 0.9, correct.mean()
    seen = {r["sentence"] for r in train}
    unseen = np.array([r["sentence"] not in seen for r in test])
    assert unseen.sum() >= 30 and float(correct[unseen].mean()) > 0.9  # generalizes, not memorized
