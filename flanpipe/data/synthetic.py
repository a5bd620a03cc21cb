"""Deterministic synthetic datasets for the embedded default: the whole FLAN DAG on a laptop, offline.

Twelve small datasets, two per cluster, whose raw columns are named like the real datasets they stand in
for (SST-2's ``sentence``/``label``, RTE's ``sentence1``/``sentence2``/``label``, E2E's
``meaning_representation``/``human_reference`` ...), so the registry's field mapping is exercised exactly
as it would be for HuggingFace data. Every text comes from a small word list or grammar written here and
every label is *determined by the text* (a polar lexicon with negation, templated world facts, role swaps,
the numbers of a sum), so a model can in principle learn each task and a test can re-derive each label.

Determinism: each (seed, dataset, split) gets its own ``numpy`` generator seeded from a SHA-256 of the
triple (never Python's salted ``hash()``), and rows are serialized with a fixed key order, so the same
arguments give byte-identical files on any machine and in any order of generation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from flanpipe.core.io import atomic_path

Row = dict[str, object]
Generator = Callable[[np.random.Generator, int], list[Row]]

# What the embedded default generates: a few hundred training examples per dataset keeps every stage of
# the DAG (tokenizer, packing, a ~2M-parameter model) down to seconds on two CPU cores.
DEFAULT_SIZES: dict[str, int] = {"train": 400, "validation": 60, "test": 60}


# ----------------------------------------------------------------------------------------------------
# small helpers


def _pick(rng: np.random.Generator, seq: Sequence[str]) -> str:
    """One element as a plain Python str (``rng.choice`` would hand back numpy scalars)."""
    return seq[int(rng.integers(len(seq)))]


def _pick_other(rng: np.random.Generator, seq: Sequence[str], avoid: str) -> str:
    """An element different from ``avoid``: distractors must never coincide with the truth."""
    return _pick(rng, [s for s in seq if s != avoid])


def _labels(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """Exactly balanced labels in random order (n=400, k=3 -> 134/133/133), so accuracy is comparable
    to a known chance level and majority-class guessing earns nothing."""
    return [int(x) for x in rng.permutation(np.arange(n) % k)]


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def split_seed(seed: int, name: str, split: str) -> int:
    """A stable 64-bit seed per (seed, dataset, split): splits are independent streams, and adding a
    dataset or a split never shifts the data of another."""
    digest = hashlib.sha256(f"{seed}\x1f{name}\x1f{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


# ----------------------------------------------------------------------------------------------------
# sentiment: synth_sst (the learnable one) and synth_reviews (negation)

SST_POSITIVE = ("wonderful", "delightful", "brilliant", "charming", "gripping", "touching", "hilarious", "superb")
SST_NEGATIVE = ("dull", "tedious", "awful", "clumsy", "boring", "lifeless", "dreadful", "bland")
_SST_SUBJECTS = ("plot", "acting", "script", "soundtrack", "pacing", "dialogue", "ending", "story", "direction")
_SST_FILMS = ("movie", "film", "picture", "feature", "comedy", "drama", "thriller")
# lowercased and space-tokenized like SST-2; {s} subject, {f} film word, {w} the one polar word; 8-13 words
_SST_FRAMES = (
    "the {s} of this {f} is {w} from start to finish",
    "i thought the {s} in the {f} was {w} overall",
    "honestly , the {s} feels {w} for most of the {f}",
    "by the end , the {s} seemed {w} to everyone in the room",
    "my friends and i found the {s} of the {f} {w}",
    "it is a {w} {f} about a family moving to a new town",
    "the {s} in this {f} is {w} , as the trailer suggested",
    "after two hours , this {f} still feels {w}",
)


def synth_sst(rng: np.random.Generator, n: int) -> list[Row]:
    """SST-2-like movie review sentences (``sentence``, ``label`` 0 negative / 1 positive).

    THE LEARNABLE TASK of the embedded default: each 8-13 word sentence holds exactly one polar word
    (8 positive, 8 negative) among neutral filler words, and that word alone decides the label. With 400
    training sentences each polar word appears ~25 times, so a ~2M-parameter transformer picks the signal
    up in a couple of hundred steps; tests check that a bag-of-words logistic regression exceeds 90%.
    """
    rows: list[Row] = []
    for label in _labels(rng, n, 2):
        word = _pick(rng, SST_POSITIVE if label == 1 else SST_NEGATIVE)
        frame = _pick(rng, _SST_FRAMES)
        if "{w} {f}" in frame:  # "a {w} {f}": the article must agree with the polar word
            frame = frame.replace("a {w}", f"{_article(word)} {{w}}")
        sentence = frame.format(s=_pick(rng, _SST_SUBJECTS), f=_pick(rng, _SST_FILMS), w=word)
        rows.append({"sentence": sentence, "label": label})
    return rows


REVIEW_POSITIVE = ("great", "excellent", "reliable", "sturdy", "handy", "impressive", "recommend")
REVIEW_NEGATIVE = ("poor", "flimsy", "worthless", "faulty", "disappointing", "noisy")
REVIEW_NEGATORS = ("not", "never")
_REVIEW_ADJ_POS = REVIEW_POSITIVE[:-1]  # "recommend" is a verb, used in its own frame
_PRODUCTS = ("blender", "kettle", "backpack", "desk lamp", "phone case", "toaster", "umbrella", "keyboard")
_PARTS = ("design", "build", "finish", "lid", "handle", "switch")
_RELATIVES = ("sister", "brother", "neighbour", "roommate", "father")
_NEUTRAL_SENTENCES = (
    "It arrived on a Tuesday in a plain box.",
    "I bought it for my {rel} last month.",
    "I have used it almost every day since then.",
    "The {product} comes in three colours.",
)


def _review_sentence(rng: np.random.Generator, polarity: int, product: str) -> str:
    """One sentence whose *effective* polarity (polar word, flipped by a negator) equals ``polarity``.

    With probability 0.3 the opposite polar word is used under negation ("the lid is not flimsy"), so a
    model must read the negator, not just count polar words.
    """
    negate = bool(rng.random() < 0.3)
    word_polarity = 1 - polarity if negate else polarity
    kind = int(rng.integers(4))
    if kind == 0:  # "recommend" frame
        if word_polarity == 1:
            return f"I would {'not ' if negate else ''}recommend this {product} to a friend."
        kind = 1  # no negative verb: fall back to an adjective frame
    adj = _pick(rng, _REVIEW_ADJ_POS if word_polarity == 1 else REVIEW_NEGATIVE)
    neg = f"{_pick(rng, REVIEW_NEGATORS)} " if negate else ""
    if kind == 1:
        return f"The {_pick(rng, _PARTS)} is {'not ' if negate else ''}{adj}."
    if kind == 2:
        return f"My {_pick(rng, _RELATIVES)} says it has {neg}been {adj}."
    return f"Overall it was {'not ' if negate else ''}{adj} for the price."


def synth_reviews(rng: np.random.Generator, n: int) -> list[Row]:
    """Amazon/Yelp-polarity-like product reviews (``title``, ``text``, ``stars``, ``label``).

    ``label`` 1 = positive. Every polar sentence of the text and the title agree after negation, so the
    label follows from the text; ``stars`` (4-5 positive, 1-2 negative) is extra, unmapped metadata.
    """
    rows: list[Row] = []
    for label in _labels(rng, n, 2):
        product = _pick(rng, _PRODUCTS)
        adj = _pick(rng, _REVIEW_ADJ_POS if label == 1 else REVIEW_NEGATIVE)
        title = _cap(f"{adj} {product}") if rng.random() < 0.5 else f"{_cap(_article(adj))} {adj} {product}"
        sentences = [_review_sentence(rng, label, product) for _ in range(int(rng.integers(2, 4)))]
        if rng.random() < 0.5:
            neutral = _pick(rng, _NEUTRAL_SENTENCES).format(rel=_pick(rng, _RELATIVES), product=product)
            sentences.insert(int(rng.integers(len(sentences) + 1)), neutral)
        stars = int(rng.integers(4, 6)) if label == 1 else int(rng.integers(1, 3))
        rows.append({"title": title, "text": " ".join(sentences), "stars": stars, "label": label})
    return rows


# ----------------------------------------------------------------------------------------------------
# nli: synth_nli_entail (3-way, MNLI/SNLI-like) and synth_nli_rte (2-way, RTE-like)

NAMES = (
    "Alice", "Bruno", "Chen", "Dana", "Elif", "Farah", "Goran", "Hana", "Ivo", "Jonas",
    "Keiko", "Liam", "Mira", "Nadia", "Omar", "Priya", "Rafael", "Sven", "Tomas", "Yara",
)  # fmt: skip
CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Kyoto", "Dublin", "Porto", "Tunis", "Hanoi", "Krakow", "Austin")
JOBS = (
    "teacher", "nurse", "engineer", "baker", "pilot", "lawyer", "architect", "chef", "farmer", "dentist",
    "librarian", "electrician",
)  # fmt: skip
_PETS = ("cat", "dog", "parrot", "rabbit", "tortoise")
_HOBBIES = ("plays chess", "likes to swim", "collects stamps", "sings in a choir", "paints on weekends")


def _nli_premise(rng: np.random.Generator, name: str, city: str, job: str) -> str:
    a = _article(job)
    return _pick(
        rng,
        (
            f"{name} is {a} {job} who lives in {city}.",
            f"{name} lives in {city} and works as {a} {job}.",
            f"{_cap(a)} {job} named {name} has lived in {city} for {int(rng.integers(2, 30))} years.",
        ),
    )


def _nli_hypothesis(rng: np.random.Generator, label: int, name: str, city: str, job: str) -> str:
    """A hypothesis with the given relation, under the world rule "one home city and one job each"."""
    other_city, other_job = _pick_other(rng, CITIES, city), _pick_other(rng, JOBS, job)
    if label == 0:  # entailment
        options = (
            f"{name} lives in {city}.",
            f"{name} is {_article(job)} {job}.",
            f"{name} works as {_article(job)} {job}.",
            f"{name} does not live in {other_city}.",
        )
    elif label == 1:  # neutral: an attribute the premise says nothing about
        pet = _pick(rng, _PETS)
        options = (
            f"{name} has {_article(pet)} {pet}.",
            f"{name} {_pick(rng, _HOBBIES)}.",
            f"{name} was born in {_pick(rng, CITIES)}.",
            f"{name} is {int(rng.integers(20, 70))} years old.",
        )
    else:  # contradiction
        options = (
            f"{name} lives in {other_city}.",
            f"{name} is {_article(other_job)} {other_job}.",
            f"{name} does not live in {city}.",
            f"{name} is not {_article(job)} {job}.",
        )
    return _pick(rng, options)


def synth_nli_entail(rng: np.random.Generator, n: int) -> list[Row]:
    """MNLI/SNLI-like pairs (``premise``, ``hypothesis``, ``label`` 0 entailment / 1 neutral /
    2 contradiction) about people's home city and job."""
    rows: list[Row] = []
    for label in _labels(rng, n, 3):
        name, city, job = _pick(rng, NAMES), _pick(rng, CITIES), _pick(rng, JOBS)
        premise = _nli_premise(rng, name, city, job)
        rows.append({"premise": premise, "hypothesis": _nli_hypothesis(rng, label, name, city, job), "label": label})
    return rows


COMPANIES = ("Norvex", "Halden Systems", "Brightwell", "Corvane", "Tessaly Foods", "Pellmark", "Quillon Bank")
_INDUSTRIES = ("software", "shipping", "banking", "food", "energy", "retail")
_ROLES = ("chief executive", "finance director", "head of research", "marketing chief", "general counsel")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")


def _rte_sentence1(rng: np.random.Generator, company: str, city: str, name: str, role: str) -> str:
    industry, day = _pick(rng, _INDUSTRIES), _pick(rng, _DAYS)
    return _pick(
        rng,
        (
            f"{company}, {_article(industry)} {industry} firm based in {city}, said on {day} that it had hired {name} "
            f"as its new {role}.",
            f"On {day}, the {city}-based {industry} company {company} named {name} its {role}, "
            f"replacing {_pick_other(rng, NAMES, name)}.",
            f"{name}, who previously worked at {_pick_other(rng, COMPANIES, company)}, has joined {company} "
            f"as {role}, the {city} firm announced.",
        ),
    )


def synth_nli_rte(rng: np.random.Generator, n: int) -> list[Row]:
    """RTE-like news sentences (``sentence1``, ``sentence2``, ``label`` 0 entailment / 1 not entailment).

    Non-entailed hypotheses swap in a wrong company, city or person, or claim something unstated
    ("X founded Y"), so the decision needs the facts of sentence1, not word overlap alone.
    """
    rows: list[Row] = []
    for label in _labels(rng, n, 2):
        company, city = _pick(rng, COMPANIES), _pick(rng, CITIES)
        name, role = _pick(rng, NAMES), _pick(rng, _ROLES)
        s1 = _rte_sentence1(rng, company, city, name, role)
        if label == 0:
            s2 = _pick(
                rng,
                (
                    f"{name} works for {company}.",
                    f"{company} is based in {city}.",
                    f"{company} has a new {role}.",
                    f"{name} is the new {role} of {company}.",
                ),
            )
        else:
            s2 = _pick(
                rng,
                (
                    f"{name} works for {_pick_other(rng, COMPANIES, company)}.",
                    f"{company} is based in {_pick_other(rng, CITIES, city)}.",
                    f"{name} founded {company}.",
                    f"{_pick_other(rng, NAMES, name)} is the new {role} of {company}.",
                ),
            )
        rows.append({"sentence1": s1, "sentence2": s2, "label": label})
    return rows


# ----------------------------------------------------------------------------------------------------
# closed_book_qa: synth_capitals (memorized facts) and synth_arith (computed answers)

# Made-up countries and capitals: a closed book of facts that no pretrained model has seen.
CAPITALS: tuple[tuple[str, str], ...] = (
    ("Veloria", "Marenth"), ("Drusk", "Olvane"), ("Calimar", "Tessburg"), ("Ostrella", "Pirn"),
    ("Brevania", "Kaldor"), ("Quessa", "Lunmarch"), ("Haldoria", "Wexley"), ("Nimbria", "Soraque"),
    ("Teluvia", "Brask"), ("Zandor", "Efrin"), ("Moravelle", "Castvel"), ("Pellonia", "Rudach"),
    ("Istravia", "Nollen"), ("Korrin", "Amberley"), ("Falvane", "Ducette"), ("Orlesca", "Venn"),
    ("Saravond", "Tilmoor"), ("Gallowen", "Haskett"), ("Ulvaria", "Merrow"), ("Ythan", "Corby"),
    ("Elsmere", "Port Adda"), ("Vantoria", "Glenmark"), ("Rhossia", "Kestrel Bay"), ("Dunavia", "Ilford"),
)  # fmt: skip
_CAPITAL_QUESTIONS = (
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "What city serves as the capital of {c}?",
    "The capital of {c} is which city?",
    "Name the capital city of {c}.",
)
_COUNTRY_QUESTIONS = ("{k} is the capital of which country?", "Which country has {k} as its capital?")


def synth_capitals(rng: np.random.Generator, n: int) -> list[Row]:
    """TriviaQA-like closed-book questions (``question``, ``answer``) about a fixed table of made-up
    countries; a quarter ask the reverse direction (capital -> country)."""
    rows: list[Row] = []
    for _ in range(n):
        country, capital = CAPITALS[int(rng.integers(len(CAPITALS)))]
        if rng.random() < 0.25:
            rows.append({"question": _pick(rng, _COUNTRY_QUESTIONS).format(k=capital), "answer": country})
        else:
            rows.append({"question": _pick(rng, _CAPITAL_QUESTIONS).format(c=country), "answer": capital})
    return rows


_ARITH_FRAMES = (
    "What is {a} {op} {b}?",
    "Calculate {a} {op} {b}.",
    "How much is {a} {op} {b}?",
    "What do you get if you compute {a} {op} {b}?",
)


def synth_arith(rng: np.random.Generator, n: int) -> list[Row]:
    """DeepMind-math-like questions (``question``, ``answer``): plus/minus up to 50 (never negative),
    times up to 12, so the answer follows from the two numbers in the question."""
    rows: list[Row] = []
    for _ in range(n):
        op = _pick(rng, ("plus", "minus", "times"))
        if op == "times":
            a, b = int(rng.integers(0, 13)), int(rng.integers(0, 13))
            value = a * b
        else:
            a, b = int(rng.integers(0, 51)), int(rng.integers(0, 51))
            if op == "minus":
                a, b = max(a, b), min(a, b)
            value = a + b if op == "plus" else a - b
        question = _pick(rng, _ARITH_FRAMES).format(a=a, op=op, b=b)
        rows.append({"question": question, "answer": str(value)})
    return rows


# ----------------------------------------------------------------------------------------------------
# paraphrase: synth_paws (role swaps) and synth_qqp (question intents)

# synonym groups of regular transitive verbs (past tense == past participle, so passives are easy)
PAWS_VERBS: tuple[tuple[str, ...], ...] = (
    ("called", "phoned"),
    ("helped", "assisted"),
    ("praised", "complimented"),
    ("hired", "employed"),
    ("warned", "cautioned"),
    ("followed", "trailed"),
    ("greeted", "welcomed"),
    ("teased", "mocked"),
)
_PAWS_TIMES = ("on Monday", "last week", "after lunch", "in the evening", "before the meeting")
_PAWS_PLACES = ("at the station", "in the library", "outside the bakery", "near the harbour")


def _paws_sentence(rng: np.random.Generator, agent: str, patient: str, group: int, place: str, time: str) -> str:
    """One of four surface forms (active / fronted time / passive / fronted passive) of the same event."""
    verb = _pick(rng, PAWS_VERBS[group])
    form = int(rng.integers(4))
    if form == 0:
        return f"{agent} {verb} {patient} {place} {time}."
    if form == 1:
        return f"{_cap(time)}, {agent} {verb} {patient} {place}."
    if form == 2:
        return f"{patient} was {verb} by {agent} {place} {time}."
    return f"{_cap(time)}, {patient} was {verb} by {agent} {place}."


def synth_paws(rng: np.random.Generator, n: int) -> list[Row]:
    """PAWS-like pairs (``sentence1``, ``sentence2``, ``label`` 1 paraphrase / 0 not).

    Paraphrases change voice, word order or verb synonym; non-paraphrases swap who did what to whom,
    keeping nearly the same bag of words, so word overlap alone cannot solve it (PAWS's point).
    """
    rows: list[Row] = []
    for label in _labels(rng, n, 2):
        agent = _pick(rng, NAMES)
        patient = _pick_other(rng, NAMES, agent)
        group, place, time = int(rng.integers(len(PAWS_VERBS))), _pick(rng, _PAWS_PLACES), _pick(rng, _PAWS_TIMES)
        s1 = _paws_sentence(rng, agent, patient, group, place, time)
        s2 = s1
        while s2 == s1:  # a paraphrase must differ on the surface; ~1/8 of draws repeat
            a2, p2 = (agent, patient) if label == 1 else (patient, agent)
            s2 = _paws_sentence(rng, a2, p2, group, place, time)
        rows.append({"sentence1": s1, "sentence2": s2, "label": label})
    return rows


# intent -> paraphrastic question templates over a topic {x}
QQP_INTENTS: dict[str, tuple[str, ...]] = {
    "learn": (
        "How do I learn {x}?",
        "What is the best way to learn {x}?",
        "How can I get better at {x}?",
        "What should a beginner do to learn {x}?",
    ),
    "time": (
        "How long does it take to learn {x}?",
        "How many months does it take to get good at {x}?",
        "What is a realistic time frame for learning {x}?",
    ),
    "job": (
        "Can I get a job if I know {x}?",
        "Is knowing {x} useful for finding work?",
        "Does {x} help you get hired?",
    ),
    "hard": (
        "Is {x} hard to learn?",
        "How difficult is it to learn {x}?",
        "Is learning {x} difficult?",
    ),
}
QQP_TOPICS = (
    "Python", "chess", "Spanish", "calculus", "photography", "statistics", "Japanese", "machine learning",
    "accounting", "welding",
)  # fmt: skip


def synth_qqp(rng: np.random.Generator, n: int) -> list[Row]:
    """QQP-like question pairs (``question1``, ``question2``, ``label`` 1 duplicate / 0 not).

    Duplicates ask the same intent about the same topic in different words; non-duplicates keep the
    intent but change the topic, or keep the topic but change the intent.
    """
    intents = list(QQP_INTENTS)
    rows: list[Row] = []
    for label in _labels(rng, n, 2):
        intent, topic = _pick(rng, intents), _pick(rng, QQP_TOPICS)
        q1_template = _pick(rng, QQP_INTENTS[intent])
        if label == 1:
            intent2, topic2 = intent, topic
            q2_template = _pick_other(rng, QQP_INTENTS[intent], q1_template)
        else:
            if rng.random() < 0.5:
                intent2, topic2 = intent, _pick_other(rng, QQP_TOPICS, topic)
            else:
                intent2, topic2 = _pick_other(rng, intents, intent), topic
            q2_template = _pick(rng, QQP_INTENTS[intent2])
        q1, q2 = q1_template.format(x=topic), q2_template.format(x=topic2)
        rows.append({"question1": q1, "question2": q2, "label": label})
    return rows


# ----------------------------------------------------------------------------------------------------
# struct_to_text: synth_e2e (restaurant meaning representations) and synth_webnlg (RDF-like triples)

_E2E_NAMES = (
    "The Copper Kettle", "Blue Heron", "The Old Mill", "Saffron House", "The Green Lantern", "Olive Grove",
    "The Red Anchor", "Mondello", "The Brass Bell", "Café Lumière",
)  # fmt: skip
_E2E_VALUES: dict[str, tuple[str, ...]] = {
    "eatType": ("restaurant", "pub", "coffee shop"),
    "food": ("Italian", "French", "Chinese", "Indian", "Japanese", "English", "fast food"),
    "priceRange": ("cheap", "moderate", "high"),
    "customer rating": ("low", "average", "high"),
    "area": ("riverside", "city centre"),
    "familyFriendly": ("yes", "no"),
}
_E2E_PRICE_WORDS = {"cheap": "cheap", "moderate": "moderately priced", "high": "expensive"}
_E2E_AREA_WORDS = {"riverside": "by the riverside", "city centre": "in the city centre"}
_E2E_OPTIONAL = ("food", "priceRange", "customer rating", "area", "familyFriendly", "near")


def _e2e_text(rng: np.random.Generator, mr: Mapping[str, str]) -> str:
    """Realize a meaning representation: one main sentence plus short follow-ups, every value stated."""
    adjectives = [_E2E_PRICE_WORDS[mr["priceRange"]]] if "priceRange" in mr else []
    adjectives += [mr["food"]] if "food" in mr else []
    head = " ".join([*adjectives, mr["eatType"]])
    where = [_E2E_AREA_WORDS[mr["area"]]] if "area" in mr else []
    where += [f"near {mr['near']}"] if "near" in mr else []
    if where and rng.random() < 0.5:
        main = f"{_cap(' '.join(['Located', *where]))}, {mr['name']} is {_article(head)} {head}."
    else:
        main = " ".join([mr["name"], "is", _article(head), head, *where]) + "."
    extra = []
    if "customer rating" in mr:
        r = mr["customer rating"]
        extra.append(_pick(rng, (f"It has {_article(r)} {r} customer rating.", f"Customers rate it {r}.")))
    if "familyFriendly" in mr:
        yes = mr["familyFriendly"] == "yes"
        extra.append(
            _pick(rng, ("It is family friendly.", "Children are welcome."))
            if yes
            else _pick(rng, ("It is not family friendly.", "It is not a place for children."))
        )
    return " ".join([main, *extra])


def synth_e2e(rng: np.random.Generator, n: int) -> list[Row]:
    """E2E-NLG-like data (``meaning_representation`` "name[X], eatType[pub], ...", ``human_reference``)."""
    rows: list[Row] = []
    for _ in range(n):
        name = _pick(rng, _E2E_NAMES)
        k = int(rng.integers(2, 5))  # 2-4 optional attributes besides name and eatType
        chosen = set(rng.permutation(len(_E2E_OPTIONAL))[:k].tolist())
        mr = {"name": name, "eatType": _pick(rng, _E2E_VALUES["eatType"])}
        for i, attr in enumerate(_E2E_OPTIONAL):  # E2E's fixed attribute order
            if i in chosen:
                mr[attr] = _pick_other(rng, _E2E_NAMES, name) if attr == "near" else _pick(rng, _E2E_VALUES[attr])
        text = ", ".join(f"{attr}[{value}]" for attr, value in mr.items())
        rows.append({"meaning_representation": text, "human_reference": _e2e_text(rng, mr)})
    return rows


_FIRST = ("Mara", "Teodor", "Ines", "Callum", "Ruth", "Anselm", "Livia", "Oskar")
_LAST = ("Ellison", "Varga", "Okafor", "Lindqvist", "Moreau", "Sato", "Brennan", "Castell")
_TOWNS = ("Kelby", "Dunmore", "Ashford Vale", "Rivenholt", "Porthaven", "Elsworth")
_OCCUPATIONS = ("test pilot", "botanist", "architect", "violinist", "civil engineer", "economist")
_SCHOOLS = ("Dunmore University", "Kelby Institute of Technology", "Saint Alwen College")
WEBNLG_PREDICATES = ("birthPlace", "birthYear", "occupation", "employer", "almaMater", "nationality")


def _webnlg_text(rng: np.random.Generator, subject: str, facts: Mapping[str, str], town_country: str | None) -> str:
    """Verbalize a person's facts as one sentence: birth facts merge, job facts merge."""
    clauses = []
    if "birthPlace" in facts or "birthYear" in facts:
        place = facts.get("birthPlace", "")
        place += f", {town_country}" if town_country and place else ""
        born = " in ".join(x for x in (place, facts.get("birthYear", "")) if x)
        clauses.append(f"was born in {born}")
    if "occupation" in facts:
        job = facts["occupation"]
        tail = f" for {facts['employer']}" if "employer" in facts else ""
        clauses.append(f"works as {_article(job)} {job}{tail}")
    elif "employer" in facts:
        clauses.append(f"works for {facts['employer']}")
    if "almaMater" in facts:
        clauses.append(f"studied at {facts['almaMater']}")
    if "nationality" in facts:
        clauses.append(f"is a citizen of {facts['nationality']}")
    order = [int(i) for i in rng.permutation(len(clauses))]
    clauses = [clauses[i] for i in order]
    body = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
    return f"{subject} {body}."


def synth_webnlg(rng: np.random.Generator, n: int) -> list[Row]:
    """WebNLG-like data (``triples`` "S | predicate | O" joined by " ; ", ``target`` a sentence).

    Subjects are made-up people; a birth town may bring a second-hop triple (town | country | X).
    """
    countries = [c for c, _ in CAPITALS]
    rows: list[Row] = []
    for _ in range(n):
        subject = f"{_pick(rng, _FIRST)} {_pick(rng, _LAST)}"
        k = int(rng.integers(2, 5))
        preds = [WEBNLG_PREDICATES[int(i)] for i in sorted(rng.permutation(len(WEBNLG_PREDICATES))[:k])]
        values = {
            "birthPlace": lambda: _pick(rng, _TOWNS),
            "birthYear": lambda: str(int(rng.integers(1901, 1991))),
            "occupation": lambda: _pick(rng, _OCCUPATIONS),
            "employer": lambda: _pick(rng, COMPANIES),
            "almaMater": lambda: _pick(rng, _SCHOOLS),
            "nationality": lambda: _pick(rng, countries),
        }
        facts = {p: values[p]() for p in preds}
        triples = [f"{subject} | {p} | {o}" for p, o in facts.items()]
        town_country = None
        if "birthPlace" in facts and rng.random() < 0.5:
            town_country = _pick(rng, countries)
            triples.append(f"{facts['birthPlace']} | country | {town_country}")
        rows.append({"triples": " ; ".join(triples), "target": _webnlg_text(rng, subject, facts, town_country)})
    return rows


# ----------------------------------------------------------------------------------------------------
# commonsense: synth_copa (cause/effect) and synth_piqa (which tool does the job)

# (cause, effect) pairs; {p} is a person's name. The pair table *is* the commonsense to be learned.
COPA_PAIRS: tuple[tuple[str, str], ...] = (
    ("{p} left the milk out overnight", "the milk went sour"),
    ("{p} forgot to water the plant", "the plant wilted"),
    ("{p} planted tomato seeds in the spring", "{p} picked ripe tomatoes in the summer"),
    ("{p} skipped lunch", "{p} was hungry by the afternoon"),
    ("{p} dropped a glass on the tiles", "the glass shattered"),
    ("{p} ran ten miles", "{p}'s legs ached"),
    ("{p} left the window open during the storm", "the floor got wet"),
    ("{p} switched off the lights", "the room went dark"),
    ("{p} told a funny joke", "everyone laughed"),
    ("{p} studied hard for the exam", "{p} passed the exam"),
    ("{p} touched the hot stove", "{p} burned a finger"),
    ("{p} put the ice cream in the sun", "the ice cream melted"),
    ("{p} lost the house keys", "{p} could not get inside"),
    ("{p} sat in the sun for hours without a hat", "{p} got a sunburn"),
    ("{p} wore a thin jacket in the snow", "{p} shivered"),
    ("{p} missed the bus", "{p} was late for work"),
    ("{p} ate a spoiled sandwich", "{p} got a stomach ache"),
    ("{p} practised the piano every day", "{p}'s playing improved"),
    ("{p} left the bread in the toaster too long", "the toast burned"),
    ("{p} chopped an onion", "{p}'s eyes watered"),
)


def _sentence(text: str, person: str) -> str:
    return _cap(text.format(p=person)) + "."


def synth_copa(rng: np.random.Generator, n: int) -> list[Row]:
    """COPA-like items (``premise``, ``choice1``, ``choice2``, ``question`` cause|effect, ``label``).

    Also ``options`` = [choice1, choice2] and ``answer`` = the correct choice's text, because the
    choices differ per example (FLAN renders them as the options block). The distractor is the same
    role (cause or effect) from a different pair, so only the causal link tells them apart.
    """
    rows: list[Row] = []
    for label in _labels(rng, n, 2):
        person = _pick(rng, NAMES)
        i = int(rng.integers(len(COPA_PAIRS)))
        j = int(rng.choice([k for k in range(len(COPA_PAIRS)) if k != i]))
        question = "effect" if rng.random() < 0.5 else "cause"
        given, want = (0, 1) if question == "effect" else (1, 0)  # premise is the cause -> ask the effect
        premise = _sentence(COPA_PAIRS[i][given], person)
        right, wrong = _sentence(COPA_PAIRS[i][want], person), _sentence(COPA_PAIRS[j][want], person)
        choices = [wrong, right] if label == 1 else [right, wrong]
        rows.append(
            {
                "premise": premise,
                "choice1": choices[0],
                "choice2": choices[1],
                "question": question,
                "label": label,
                "options": choices,
                "answer": choices[label],
            }
        )
    return rows


# (verb, objects, tools that work, tools that do not)
PIQA_TASKS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    ("cut", ("a sheet of paper", "a length of ribbon"), ("a pair of scissors", "a utility knife"),
     ("a spoon", "a sponge", "a rubber band")),
    ("tighten", ("a loose screw", "a wobbly cabinet hinge"), ("a screwdriver",), ("a paintbrush", "a dish towel")),
    ("dry", ("a wet bicycle seat", "a freshly washed plate"), ("a clean towel", "a paper towel"),
     ("a cheese grater", "a bowl of water")),
    ("carry", ("some soup", "a little water"), ("a deep bowl", "a mug"), ("a colander", "a sieve")),
    ("light", ("a candle", "a campfire"), ("a match", "a lighter"), ("an ice cube", "a wet sponge")),
    ("open", ("a can of beans", "a tin of tomatoes"), ("a can opener",), ("a feather", "a pillow")),
    ("sweep", ("a dusty floor", "a dirty patio"), ("a broom",), ("a fork", "a toothpick")),
    ("measure", ("the length of a table", "the width of a door"), ("a tape measure", "a ruler"),
     ("a sponge", "a teacup")),
    ("cool", ("a hot drink", "a glass of juice"), ("a few ice cubes",), ("a hair dryer", "a hot water bottle")),
)  # fmt: skip


def _piqa_solution(short: bool, tool: str, verb: str, obj: str) -> str:
    if short:
        return f"Use {tool} to {verb} it."
    return f"Grab {tool} and use it to {verb} {obj}."


def synth_piqa(rng: np.random.Generator, n: int) -> list[Row]:
    """PIQA-like items (``goal``, ``sol1``, ``sol2``, ``label``) plus ``options``/``answer`` as in
    synth_copa: both solutions read alike, only the tool's physical fitness for the job differs."""
    rows: list[Row] = []
    for label in _labels(rng, n, 2):
        verb, objects, good, bad = PIQA_TASKS[int(rng.integers(len(PIQA_TASKS)))]
        obj = _pick(rng, objects)
        goal = f"How do you {verb} {obj}?" if rng.random() < 0.5 else f"{_cap(verb)} {obj}."
        short = bool(rng.random() < 0.5)  # both solutions share one wording: only the tool differs
        right = _piqa_solution(short, _pick(rng, good), verb, obj)
        wrong = _piqa_solution(short, _pick(rng, bad), verb, obj)
        sols = [wrong, right] if label == 1 else [right, wrong]
        rows.append(
            {"goal": goal, "sol1": sols[0], "sol2": sols[1], "label": label, "options": sols, "answer": sols[label]}
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# registry of generators and the writer

GENERATORS: dict[str, Generator] = {
    "synth_nli_entail": synth_nli_entail,
    "synth_nli_rte": synth_nli_rte,
    "synth_sst": synth_sst,
    "synth_reviews": synth_reviews,
    "synth_capitals": synth_capitals,
    "synth_arith": synth_arith,
    "synth_paws": synth_paws,
    "synth_qqp": synth_qqp,
    "synth_e2e": synth_e2e,
    "synth_webnlg": synth_webnlg,
    "synth_copa": synth_copa,
    "synth_piqa": synth_piqa,
}


def to_jsonl(rows: Sequence[Row]) -> bytes:
    """One JSON object per line, UTF-8 (``ensure_ascii=False`` keeps "Café" readable); key order is the
    generator's insertion order, so the bytes depend only on the rows."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def generate_split(name: str, split: str, n: int, seed: int) -> list[Row]:
    """The rows of one split, in memory (what ``generate_dataset`` writes)."""
    if name not in GENERATORS:
        raise KeyError(f"unknown synthetic dataset {name!r}; known: {sorted(GENERATORS)}")
    if n < 1:
        raise ValueError(f"synthetic dataset {name!r} split {split!r}: size must be >= 1, got {n}")
    return GENERATORS[name](np.random.default_rng(split_seed(seed, name, split)), n)


def generate_dataset(name: str, out_dir: Path, sizes: Mapping[str, int], seed: int) -> list[Path]:
    """Write ``out_dir/{split}.jsonl`` for every split in ``sizes``; return the paths in ``sizes`` order.

    Each file is written atomically, so an interrupted run never leaves a truncated split behind.
    """
    paths = []
    for split, n in sizes.items():
        data = to_jsonl(generate_split(name, split, int(n), seed))
        path = Path(out_dir) / f"{split}.jsonl"
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        paths.append(path)
    return paths


def generate_all(out_root: Path, sizes: Mapping[str, int] = DEFAULT_SIZES, seed: int = 0) -> dict[str, list[Path]]:
    """Every synthetic dataset under ``out_root/{name}/`` (the layout the embedded registry expects)."""
    return {name: generate_dataset(name, Path(out_root) / name, sizes, seed) for name in GENERATORS}
