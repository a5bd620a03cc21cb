"""Data-path benchmark: the data path (render -> mix -> tokenize -> pack) on a FLAN-sized synthetic workload.

FLAN's training data is 62 datasets in 12 clusters, each capped at 30k examples and mixed
examples-proportionally (rate = min(n, 3000)); the interesting costs are string rendering of ~1.7M rows,
a shuffled mixture of >= 1M examples, SentencePiece over ~190M tokens and packing them into rows of
1024 + 256 tokens. Real FLAN data cannot be downloaded here, so every dataset is generated with the
shape of its namesake: train size, fields, input/target lengths, options. The stages that run on it are
the real ones (flanpipe.data.templates, .mixing, .tokenize, .packing), called exactly as the rules call them.

Text is Zipf-distributed words from a generated lexicon, built with numpy + Arrow kernels: one vectorized
sample per field and chunk, never a Python loop per token (or per example).

    flanpipe bench data --json                 # scale 1.0: >= 1M examples, ~190M tokens
    flanpipe bench data --json --scale 0.005   # seconds; what tests/test_bench.py runs
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from flanpipe.core.registry import DatasetSpec, SourceSpec

# ----------------------------------------------------------------------------------------------------
# The workload: 62 datasets shaped like FLAN's (paper Figure 3; ANLI R1-R3 and ARC easy/challenge are
# one dataset each, as in the figure). Lengths are mean words per field; at ~1.1 tokens per word after a
# 32k BPE they are close to token counts. Train sizes are the public train-split sizes, rounded.

NLI3 = ("yes", "it is not possible to tell", "no")
YES_NO = ("no", "yes")
SENTIMENT = ("negative", "positive")


@dataclass(frozen=True)
class Profile:
    """One synthetic dataset: its FLAN namesake's size, fields and length shape."""

    name: str
    cluster: str
    n_train: int  # the real train split's size (before the 30k cap)
    fields: tuple[tuple[str, int], ...]  # input fields: (name, mean words)
    target: int = 0  # mean words of a generated answer (0 when the answer is an option)
    options: tuple[str, ...] | None = None  # static label options (classification)
    choices: tuple[int, int] | None = None  # per-example options: (how many, mean words each)
    turned: bool = False  # has a turned-around template (targets = the first input field)
    foreign: bool = False  # the answer is in the second ("target language") lexicon


# cluster names, short so the table below keeps one dataset per line
NLI, RC, CBQA, CS, COREF = "nli", "reading_comprehension", "closed_book_qa", "commonsense", "coreference"
RCCS, PARA, SENT = "reading_comprehension_with_commonsense", "paraphrase", "sentiment"
S2T, MT, SUM, MISC = "struct_to_text", "translation", "summarization", "misc"
TOPICS = ("World", "Sports", "Business", "Science")
TREC = ("description", "entity", "abbreviation", "human", "number", "location")

P = Profile
PROFILES: tuple[Profile, ...] = (
    # NLI: short premise/hypothesis pairs, 2-3 options
    P("anli", NLI, 162_865, (("premise", 70), ("hypothesis", 12)), options=NLI3),
    P("cb", NLI, 250, (("premise", 60), ("hypothesis", 10)), options=NLI3),
    P("mnli", NLI, 392_702, (("premise", 22), ("hypothesis", 11)), options=NLI3),
    P("qnli", NLI, 104_743, (("question", 11), ("sentence", 30)), options=YES_NO),
    P("rte", NLI, 2_490, (("premise", 45), ("hypothesis", 10)), options=YES_NO),
    P("snli", NLI, 550_152, (("premise", 14), ("hypothesis", 8)), options=NLI3),
    P("wnli", NLI, 635, (("sentence1", 25), ("sentence2", 10)), options=YES_NO),
    # reading comprehension: a passage + a question
    P("boolq", RC, 9_427, (("passage", 110), ("question", 9)), options=YES_NO),
    P("drop", RC, 77_409, (("passage", 220), ("question", 12)), target=3),
    P("multirc", RC, 27_243, (("paragraph", 280), ("question", 12), ("response", 8)), options=YES_NO),
    P("openbookqa", RC, 4_957, (("fact", 10), ("question", 12)), choices=(4, 4)),
    P("squad_v1", RC, 87_599, (("context", 130), ("question", 11)), target=4),
    # closed-book QA: a question alone
    P("arc", CBQA, 3_370, (("question", 22),), choices=(4, 4)),
    P("natural_questions", CBQA, 87_925, (("question", 9),), target=3),
    P("trivia_qa", CBQA, 87_622, (("question", 15),), target=3),
    # commonsense: a context and per-example endings
    P("copa", CS, 400, (("premise", 8),), choices=(2, 7)),
    P("hellaswag", CS, 39_905, (("context", 35),), choices=(4, 20)),
    P("piqa", CS, 16_113, (("goal", 8),), choices=(2, 20)),
    P("story_cloze", CS, 1_871, (("context", 40),), choices=(2, 9)),
    # coreference
    P("dpr", COREF, 1_322, (("sentence", 20), ("pronoun", 1)), choices=(2, 2)),
    P("winogrande", COREF, 40_398, (("sentence", 20),), choices=(2, 1)),
    P("wsc", COREF, 554, (("text", 18), ("span1", 2), ("span2", 1)), options=YES_NO),
    # reading comprehension with commonsense
    P("cosmos_qa", RCCS, 25_262, (("context", 70), ("question", 10)), choices=(4, 8)),
    P("record", RCCS, 100_730, (("passage", 170), ("query", 25)), target=2),
    # paraphrase: sentence pairs
    P("mrpc", PARA, 3_668, (("sentence1", 22), ("sentence2", 22)), options=YES_NO),
    P("qqp", PARA, 363_846, (("question1", 12), ("question2", 12)), options=YES_NO),
    P("paws", PARA, 49_401, (("sentence1", 21), ("sentence2", 21)), options=YES_NO),
    P("stsb", PARA, 5_749, (("sentence1", 11), ("sentence2", 11)), options=("0", "1", "2", "3", "4", "5")),
    # sentiment: one text, two labels; turned around = "write a positive review"
    P("imdb", SENT, 25_000, (("text", 230),), options=SENTIMENT, turned=True),
    P("sent140", SENT, 1_600_000, (("text", 14),), options=SENTIMENT, turned=True),
    P("sst2", SENT, 67_349, (("sentence", 10),), options=SENTIMENT, turned=True),
    P("yelp", SENT, 560_000, (("text", 135),), options=SENTIMENT, turned=True),
    # struct-to-text: short structured input, a sentence out
    P("common_gen", S2T, 67_389, (("concepts", 4),), target=11, turned=True),
    P("dart", S2T, 62_659, (("triples", 25),), target=20, turned=True),
    P("e2e_nlg", S2T, 42_061, (("meaning", 20),), target=22, turned=True),
    P("web_nlg", S2T, 35_426, (("triples", 28),), target=24, turned=True),
    # translation: similar source and target lengths, the target in another lexicon
    P("para_crawl_enes", MT, 21_987_267, (("source", 45),), target=50, turned=True, foreign=True),
    P("wmt14_enfr", MT, 40_836_876, (("source", 45),), target=50, turned=True, foreign=True),
    P("wmt16_encs", MT, 997_240, (("source", 45),), target=50, turned=True, foreign=True),
    P("wmt16_ende", MT, 4_548_885, (("source", 45),), target=50, turned=True, foreign=True),
    P("wmt16_enfi", MT, 2_073_394, (("source", 45),), target=50, turned=True, foreign=True),
    P("wmt16_enro", MT, 610_320, (("source", 45),), target=50, turned=True, foreign=True),
    P("wmt16_enru", MT, 1_516_162, (("source", 45),), target=50, turned=True, foreign=True),
    P("wmt16_entr", MT, 205_756, (("source", 45),), target=50, turned=True, foreign=True),
    # summarization: long documents (multi_news runs past the 1024-token input limit), short summaries
    P("aeslc", SUM, 14_436, (("email", 120),), target=6),
    P("cnn_dailymail", SUM, 287_113, (("article", 690),), target=50, turned=True),
    P("gigaword", SUM, 3_803_957, (("document", 35),), target=9),
    P("multi_news", SUM, 44_972, (("document", 1_700),), target=230, turned=True),
    P("newsroom", SUM, 995_041, (("text", 650),), target=25),
    P("samsum", SUM, 14_732, (("dialogue", 95),), target=20),
    P("xsum", SUM, 204_045, (("document", 380),), target=21, turned=True),
    P("ag_news", SUM, 120_000, (("text", 38),), options=TOPICS),
    P("opinion_abstracts_rotten_tomatoes", SUM, 3_731, (("reviews", 650),), target=25),
    P("opinion_abstracts_idebate", SUM, 2_259, (("argument", 300),), target=15),
    P("wiki_lingua_en", SUM, 99_020, (("source", 390),), target=40),
    # misc
    P("coqa", MISC, 7_199, (("story", 270), ("questions", 10)), target=15),
    P("quac", MISC, 11_567, (("context", 400), ("question", 8)), target=14),
    P("trec", MISC, 5_452, (("question", 10),), options=TREC),
    P("cola", MISC, 8_551, (("sentence", 9),), options=("unacceptable", "acceptable")),
    P("wic", MISC, 5_428, (("word", 1), ("sentence1", 10), ("sentence2", 10)), options=YES_NO),
    P("math_dataset", MISC, 1_999_998, (("question", 10),), target=1),
    P("fix_punctuation", MISC, 100_000, (("sentence", 25),), target=27),
)
del P

# Instruction wording per cluster: three templates that do the task (instruction before the fields,
# after them, and as a one-line prefix) and one that turns it around. Written for this benchmark.
INSTRUCTIONS: dict[str, tuple[str, str, str, str]] = {
    "nli": (
        "Does the premise entail the hypothesis?",
        "Based on the text above, is the second sentence true?",
        "Decide whether the first text implies the second.",
        "Write a sentence that relates to this one.",
    ),
    "reading_comprehension": (
        "Read the passage and answer the question.",
        "Answer the question using the passage above.",
        "Use the text to answer.",
        "Write a passage that answers this.",
    ),
    "closed_book_qa": (
        "Answer this question.",
        "What is the answer to the question above?",
        "Quick question.",
        "Write a question whose answer is this.",
    ),
    "commonsense": (
        "What is the most plausible continuation?",
        "Which option makes the most sense here?",
        "Pick the most sensible ending.",
        "Write a situation that leads to this.",
    ),
    "coreference": (
        "What does the highlighted reference point to?",
        "Resolve the reference in the text above.",
        "Fill in the blank.",
        "Write a sentence with an ambiguous pronoun.",
    ),
    "reading_comprehension_with_commonsense": (
        "Read the text and answer the question.",
        "Answer based on the context above.",
        "Context and question follow.",
        "Write a story where this is the answer.",
    ),
    "paraphrase": (
        "Do these two sentences mean the same thing?",
        "Are the two texts above paraphrases of each other?",
        "Decide whether the sentences say the same.",
        "Write two sentences with this relation.",
    ),
    "sentiment": (
        "What is the sentiment of this review?",
        "Is the text above positive or negative?",
        "Classify the sentiment.",
        "Write a review with this sentiment.",
    ),
    "struct_to_text": (
        "Write a sentence that describes this data.",
        "Turn the data above into fluent text.",
        "Describe in words.",
        "Extract the structured data from this sentence.",
    ),
    "translation": (
        "Translate the following text into the target language.",
        "How is the text above said in the target language?",
        "Translate.",
        "Translate this back into English.",
    ),
    "summarization": (
        "Summarize the following text.",
        "Write a short summary of the text above.",
        "TL;DR.",
        "Write a longer text based on this summary.",
    ),
    "misc": (
        "Answer the following.",
        "What is the answer for the input above?",
        "Respond to this.",
        "Write an input that has this answer.",
    ),
}


def templates_for(profile: Profile) -> list[dict[str, Any]]:
    """Three task templates (+1 turned around) in the template-file format, options block last."""
    names = [f for f, _ in profile.fields]
    body = (
        "\n".join(f"{f.replace('_', ' ').capitalize()}: {{{f}}}" for f in names)
        if len(names) > 1
        else f"{{{names[0]}}}"
    )
    tail = "\n\n{options_}" if profile.options or profile.choices else ""
    before, after, prefix, turn = INSTRUCTIONS[profile.cluster]
    out: list[dict[str, Any]] = [
        {"inputs": f"{before}\n\n{body}{tail}", "targets": "{answer}"},
        {"inputs": f"{body}\n\n{after}{tail}", "targets": "{answer}"},
        {"inputs": f"{prefix} {body}{tail}", "targets": "{answer}"},
    ]
    if profile.turned:
        out.append({"inputs": f"{turn}\n\n{{answer}}", "targets": f"{{{names[0]}}}", "turned_around": True})
    return out


# ----------------------------------------------------------------------------------------------------
# Synthetic text: a Zipf lexicon sampled through a lookup table, joined by Arrow kernels.

ENGLISH = "etaoinshrdlcumwfgypbvkjxqz"
ENGLISH_FREQ = (12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8)  # percent, English letters
ENGLISH_FREQ += (2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1)
FOREIGN = ENGLISH + "éèàçöüñßø"  # non-ASCII letters exercise character_coverage and byte fallback
FOREIGN_FREQ = ENGLISH_FREQ + (1.5, 0.6, 0.5, 0.3, 0.6, 0.6, 0.4, 0.3, 0.2)
# Zipf lookup table: 2^21 uint16 ranks = 4 MB, cache-friendly. p(rank) = rank^-1.05 / 8.94 for 50k words,
# so rank 1 fills 11% of it and rank 50k gets 1.3e-6 x 2.1M ~= 2.7 slots (never rounded away)
_TABLE_SIZE = 1 << 21
_CHUNK_WORDS = 4_000_000  # words generated at once: ~4M x (4 B id + ~8 B text + 8 B offsets) ~= 80 MB


@dataclass(frozen=True)
class Lexicon:
    """``words`` holds the lexicon three times: plain, with '.' and with ',' (punctuation as word variants)."""

    words: pa.StringArray
    table: np.ndarray  # uint16 word ranks, each repeated ~ p(rank) x _TABLE_SIZE times
    size: int  # distinct plain words

    def text(self, rng: np.random.Generator, lengths: np.ndarray) -> pa.Array:
        """One string per entry of ``lengths`` (words each): a vectorized sample, take and join."""
        total = int(lengths.sum())
        ids = self.table[rng.integers(0, len(self.table), total)].astype(np.int32)
        # 7% of words end a sentence, 5% carry a comma: shift those ids into the suffixed copies
        r = rng.integers(0, 100, total, dtype=np.uint8)
        ids += self.size * ((r >= 88).astype(np.int32) + (r >= 95))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        lists = pa.ListArray.from_arrays(pa.array(offsets), self.words.take(pa.array(ids)))
        return pc.binary_join(lists, " ")


def make_lexicon(rng: np.random.Generator, size: int, letters: str, freq: Sequence[float]) -> Lexicon:
    """``size`` random words (lengths ~ 1 + Poisson(4.5), like English) with Zipf(1.05) frequencies."""
    p = np.asarray(freq, dtype=np.float64) / sum(freq)
    word_len = np.clip(rng.poisson(4.5, size) + 1, 1, 16)
    chars = pa.array(list(letters)).take(pa.array(rng.choice(len(letters), int(word_len.sum()), p=p)))
    offsets = np.zeros(size + 1, dtype=np.int32)
    np.cumsum(word_len, out=offsets[1:])
    plain = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), chars), "")
    words = pa.concat_arrays(
        [plain, pc.binary_join_element_wise(plain, ".", ""), pc.binary_join_element_wise(plain, ",", "")]
    )
    zipf = 1.0 / np.arange(1, size + 1) ** 1.05
    counts = np.maximum(1, np.round(zipf / zipf.sum() * _TABLE_SIZE)).astype(np.int64)
    table = np.repeat(np.arange(size, dtype=np.uint16), counts)
    return Lexicon(words=words, table=table, size=size)


def field_lengths(rng: np.random.Generator, mean: int, n: int) -> np.ndarray:
    """Log-normal word counts with the given mean (sigma 0.5: a 2.7x spread either side), clipped to [1, 4 x mean]."""
    sigma = 0.5
    x = rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n)
    return np.clip(np.rint(x), 1, 4 * mean).astype(np.int64)


def synth_chunk(
    profile: Profile, english: Lexicon, foreign: Lexicon, rng: np.random.Generator, start: int, n: int
) -> pa.Table:
    """Rows ``start .. start + n`` of a dataset's canonical table (ARCH.md "Canonical dataset parquet")."""
    cols: dict[str, pa.Array] = {"example_id": pa.array(np.arange(start, start + n, dtype=np.int64))}
    for name, mean in profile.fields:
        cols[name] = english.text(rng, field_lengths(rng, mean, n))
    if profile.options is not None:
        cols["answer"] = pa.array(profile.options).take(pa.array(rng.integers(0, len(profile.options), n)))
    elif profile.choices is not None:
        k, mean = profile.choices
        flat = english.text(rng, field_lengths(rng, mean, n * k))
        cols["choices"] = pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), flat)
        cols["answer"] = flat.take(pa.array(np.arange(n) * k + rng.integers(0, k, n)))
    else:
        cols["answer"] = (foreign if profile.foreign else english).text(rng, field_lengths(rng, profile.target, n))
    return pa.table(cols)


def write_canonical(profile: Profile, n: int, path: Path, english: Lexicon, foreign: Lexicon, seed: int) -> int:
    """Stream a dataset's train split to Parquet in chunks of ~_CHUNK_WORDS words (bounded memory)."""
    rng = np.random.default_rng([seed, PROFILES.index(profile)])
    words_per_row = sum(m for _, m in profile.fields) + max(profile.target, 1)
    if profile.choices:
        words_per_row += profile.choices[0] * profile.choices[1]
    rows_per_chunk = max(1, _CHUNK_WORDS // words_per_row)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    for start in range(0, n, rows_per_chunk):
        table = synth_chunk(profile, english, foreign, rng, start, min(rows_per_chunk, n - start))
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None, "a dataset has at least one row"
    writer.close()
    return n


def profile_dataset_spec(profile: Profile, canonical_dir: Path, templates: Path) -> DatasetSpec:
    """The registry entry the real pipeline would hold for this dataset (source = the generated Parquet)."""
    fields = [f for f, _ in profile.fields] + (["choices"] if profile.choices else []) + ["answer"]
    metric = (
        "accuracy"
        if profile.options or profile.choices
        else {"translation": "bleu", "summarization": "rouge", "struct_to_text": "rouge"}.get(
            profile.cluster, "exact_match"
        )
    )
    return DatasetSpec(
        name=profile.name,
        cluster=profile.cluster,
        source=SourceSpec(type="local", path=str(canonical_dir / "{split}.parquet"), format="parquet"),
        fields={f: f for f in fields},
        metric=metric,
        templates=templates,
        options=profile.options,
        options_field="choices" if profile.choices else None,
    )


# ----------------------------------------------------------------------------------------------------
# The benchmark


@dataclass(frozen=True)
class BenchConfig:
    """Scale 1.0 is FLAN: cap 30k, rate 3k, >= 1M mixed examples, 32k vocab, 1024 + 256 packed into 1280.

    ``scale`` shrinks every count together (sizes, cap, rate, mixture, vocabulary, tokenizer sample) so
    a small run has the same shape: the cap still cuts the same datasets and the mixture the same way.
    """

    scale: float = 1.0
    seed: int = 0
    cap: int = 30_000
    max_rate: int = 3_000
    # datasets larger than this are generated at this size: the cap keeps only the first 30k anyway,
    # so 40k still makes the cap do real work while the 40M-row WMT sets stay affordable to generate
    generate_max: int = 40_000
    mixture_examples: int = 1_000_000
    vocab_size: int = 32_000
    tokenizer_sample: int = 20_000  # examples sampled for SentencePiece training (config default)
    inputs_length: int = 1024
    targets_length: int = 256
    pack_length: int = 1280
    # the mix is rerun alone, in a fresh process each, at these multiples of mixture_examples: its peak
    # RSS must stay flat as the mixture grows (the out-of-core shuffle), which one size cannot show
    mix_scaling: tuple[int, ...] = (1, 4)

    def n(self, count: int, floor: int = 1) -> int:
        """``count`` at this scale, at least ``floor``."""
        return max(floor, round(count * self.scale))

    def raw_size(self, profile: Profile) -> int:
        return self.n(min(profile.n_train, self.generate_max), floor=8)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: on a shared machine it, unlike wall time,
    does not grow when other jobs take the cores (wall ~= cpu / cores used, at best)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class StageTimes:
    """Wall and CPU seconds of each measured stage and the peak RSS once it is done (ru_maxrss is a
    running max), filled by ``stage``; one object carries them through the split-up data path."""

    seconds: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), cpu_seconds()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        self.cpu[name] = round(cpu_seconds() - c0, 3)
        self.rss[name] = round(peak_rss_mb(), 1)


def peak_rss_mb() -> float:
    """Peak resident set of this process and of its largest waited-for child, in MB (Linux: ru_maxrss is KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def _high_water_mb() -> float:
    """This process's own peak RSS in MB. ru_maxrss survives fork + exec (a child started from a 2 GB
    parent reports 2 GB), while Linux's VmHWM belongs to the new address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mix_child(argv: Sequence[str]) -> None:
    """Child-process side of the mix-scaling check: build one mixture, print its figures as JSON."""
    from flanpipe.data.mixing import MixtureConfig, build_mixture

    a = json.loads(argv[0])
    t0 = time.perf_counter()
    stats = build_mixture(
        a["shards"],
        MixtureConfig(**a["mixture"]),
        a["out"],
        a["out"] + ".json",
        budget_tokens=a["budget_tokens"],
        inputs_length=a["inputs_length"],
        targets_length=a["targets_length"],
    )
    own = _high_water_mb()
    print(
        json.dumps(
            {
                "examples": stats["examples"],
                "estimated_mb": round(stats["estimated_bytes"] / 1e6, 1),
                "shuffle_buckets": stats["shuffle_buckets"],
                "mix_s": round(time.perf_counter() - t0, 2),
                "peak_rss_mb": round(own, 1),
            }
        )
    )


def _mix_in_child(args: dict[str, Any]) -> dict[str, Any]:
    """Run ``mix_child`` in a fresh interpreter, so its peak RSS is the mix's alone."""
    code = "import sys; from flanpipe.bench.data import mix_child; mix_child(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], check=True, capture_output=True, text=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    Path(args["out"]).unlink(missing_ok=True)
    Path(args["out"] + ".json").unlink(missing_ok=True)
    return out


def run_bench(scale: float = 1.0, workdir: Path | None = None, seed: int = 0, peer: bool = False) -> dict[str, Any]:
    """Generate the workload and run render -> mix -> tokenizer -> encode -> pack; return the stats.

    ``workdir`` keeps every intermediate (canonical, shards, mixture, tokenizer, packed); by default a
    temporary directory is used and removed. ``peer`` adds tokenize + pack of the same mixture by
    datasets + TRL (flanpipe.bench.peer_data) beside flanpipe's, each in a fresh process.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="flanpipe-bench-data-") as tmp:
            return run_bench(scale, Path(tmp), seed, peer)
    cfg = BenchConfig(scale=scale, seed=seed)
    return _run(cfg, Path(workdir), peer)


def _generate(cfg: BenchConfig, work: Path) -> dict[str, DatasetSpec]:
    """Canonical Parquet + template files for the 62 profiled datasets; their registry entries."""
    rng = np.random.default_rng(cfg.seed)
    english = make_lexicon(rng, 50_000, ENGLISH, ENGLISH_FREQ)
    foreign = make_lexicon(rng, 40_000, FOREIGN, FOREIGN_FREQ)
    specs: dict[str, DatasetSpec] = {}
    for p in PROFILES:
        canon_dir = work / "ingest" / p.name
        write_canonical(p, cfg.raw_size(p), canon_dir / "train.parquet", english, foreign, cfg.seed)
        tpl = work / "templates" / f"{p.name}.yaml"
        tpl.parent.mkdir(parents=True, exist_ok=True)
        tpl.write_text(yaml.safe_dump({"templates": templates_for(p)}, sort_keys=False), encoding="utf-8")
        specs[p.name] = profile_dataset_spec(p, canon_dir, tpl)
    return specs


def _mix(cfg: BenchConfig, shards: dict[str, Path], rendered: dict[str, int], mixture: Path) -> tuple[Any, float]:
    """Cap, examples-proportional rates, budget sized for >= mixture_examples draws; (MixtureConfig, the
    tokens-per-example estimate). build_mixture draws ceil(budget / est) examples, so budget = (N + 0.5) x est
    gives N (+1 at worst)."""
    from flanpipe.data.mixing import MixtureConfig, build_mixture, estimate_tokens_per_example, mixing_rate

    mcfg = MixtureConfig(cap=cfg.n(cfg.cap), max_rate=cfg.n(cfg.max_rate), seed=cfg.seed)
    rates = {d: mixing_rate(n, mcfg) for d, n in rendered.items()}
    rsum = sum(rates.values())
    est = estimate_tokens_per_example(
        shards, {d: r / rsum for d, r in rates.items()}, mcfg, cfg.inputs_length, cfg.targets_length
    )
    build_mixture(
        shards,
        mcfg,
        mixture,
        mixture.with_suffix(".json"),
        budget_tokens=math.ceil((cfg.n(cfg.mixture_examples) + 0.5) * est),
        inputs_length=cfg.inputs_length,
        targets_length=cfg.targets_length,
    )
    return mcfg, est


def _mix_scaling(cfg: BenchConfig, shards: dict[str, Path], mcfg: Any, est: float, work: Path) -> list[dict]:
    """The mix alone at growing sizes, each in a fresh process (draws past the caps repeat as epochs)."""
    out = []
    for factor in cfg.mix_scaling:
        child = {
            "shards": {d: str(p) for d, p in shards.items()},
            "mixture": asdict(mcfg),
            "out": str(work / "mixtures" / f"scaling_x{factor}.parquet"),
            "budget_tokens": math.ceil((cfg.n(cfg.mixture_examples) * factor + 0.5) * est),
            "inputs_length": cfg.inputs_length,
            "targets_length": cfg.targets_length,
        }
        out.append({"factor": factor, **_mix_in_child(child)})
    return out


def _run(cfg: BenchConfig, work: Path, peer: bool = False) -> dict[str, Any]:
    """The whole data path, stage by stage as the rules run it, each stage timed (``StageTimes``)."""
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    times = StageTimes()
    with times.stage("import"):
        from flanpipe.data.packing import pack_to_indexed_dataset
        from flanpipe.data.templates import render_shard
        from flanpipe.data.tokenize import encode_parquet, open_tokenizer, train_tokenizer

    with times.stage("generate"):
        specs = _generate(cfg, work)
    shards = {name: work / "shards" / name / "train.parquet" for name in specs}
    with times.stage("render"):  # one templated shard per dataset, exactly as rule render_shard
        rendered = {
            name: int(render_shard(spec, Path(spec.source.path.format(split="train")), shards[name])["rows"])
            for name, spec in specs.items()
        }
    mixture = work / "mixtures" / "bench" / "mixture.parquet"
    with times.stage("mix"):
        mcfg, est = _mix(cfg, shards, rendered, mixture)
    model = work / "tokenizer" / "spm.model"
    with times.stage("tokenizer_train"):  # SentencePiece BPE on a seeded sample of the shards (rule train_tokenizer)
        vocab = max(1_000, min(cfg.vocab_size, cfg.n(cfg.vocab_size)))
        sample = cfg.n(cfg.tokenizer_sample, 500)
        train_tokenizer(list(shards.values()), model, vocab_size=vocab, sample_size=sample, seed=cfg.seed)
        sp = open_tokenizer(model)
    with times.stage("tokenize"):  # the mixture on all cores (rule pack, first half)
        encoded = encode_parquet(sp, mixture, cfg.inputs_length, cfg.targets_length, os.cpu_count())
    with times.stage("pack"):  # 1280-token rows, the three IndexedDatasets (rule pack, second half)
        packed = pack_to_indexed_dataset(encoded, cfg.pack_length, work / "packed" / "bench", order_seed=cfg.seed)
    wall = time.perf_counter() - t_start  # the whole path; the scaling check below is extra

    with times.stage("mix_scaling"):
        scaling = _mix_scaling(cfg, shards, mcfg, est, work)
    peer_figures = None
    if peer:  # tokenize + pack only: the stages an HF user has a library for
        from flanpipe.bench.peer_data import compare

        with times.stage("peer"):
            peer_figures = compare(
                mixture,
                model,
                work,
                inputs_length=cfg.inputs_length,
                targets_length=cfg.targets_length,
                pack_length=cfg.pack_length,
            )

    tokens = int(encoded.offsets[-1])
    seconds = times.seconds
    return {
        "peer": peer_figures,
        "scale": cfg.scale,
        "datasets": len(PROFILES),
        "clusters": len({p.cluster for p in PROFILES}),
        "raw_examples": sum(rendered.values()),
        "capped_examples": sum(min(n, mcfg.cap) for n in rendered.values()),
        "examples": len(encoded),
        "tokens": tokens,
        "tokens_per_example": round(tokens / max(1, len(encoded)), 1),
        "truncated_inputs": encoded.truncated_inputs,
        "truncated_targets": encoded.truncated_targets,
        "vocab_pieces": sp.vocab_size,
        "estimated_tokens_per_example": round(est, 1),  # chars / 4: what mixing sizes the draws with
        "encode_by_words": sp.splits_at_spaces,
        "rows": packed["rows"],
        "pack_length": cfg.pack_length,
        "render_examples_per_s": round(sum(rendered.values()) / seconds["render"]),
        "mix_s": seconds["mix"],
        "tokenize_tokens_per_s": round(tokens / seconds["tokenize"]),
        "pack_s": seconds["pack"],
        "packing_efficiency": round(packed["packing_efficiency"], 5),
        "baseline_next_fit_efficiency": round(packed["next_fit_efficiency"], 5),
        "baseline_padded_efficiency": round(packed["padded_efficiency"], 5),
        "stage_s": seconds,
        "stage_cpu_s": times.cpu,
        "cpu_s": round(cpu_seconds(), 1),
        "peak_rss_mb_after_stage": times.rss,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "mix_scaling": scaling,
        "wall_s": round(wall, 2),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "config": asdict(cfg),
    }


def format_report(x: dict[str, Any]) -> str:
    """Human-readable summary (``--json`` prints the raw object instead)."""
    lines = [
        f"{x['datasets']} datasets / {x['clusters']} clusters, scale {x['scale']}: {x['raw_examples']:,} raw -> "
        f"{x['capped_examples']:,} capped -> {x['examples']:,} mixed examples, {x['tokens']:,} tokens "
        f"({x['tokens_per_example']} / example)",
        *(f"  {k:<16} {v:8.2f} s wall {x['stage_cpu_s'][k]:8.2f} s cpu" for k, v in x["stage_s"].items()),
        f"  render {x['render_examples_per_s']:,} examples/s, tokenize {x['tokenize_tokens_per_s']:,} tokens/s",
        f"  packing efficiency {x['packing_efficiency']:.4f} (next-fit {x['baseline_next_fit_efficiency']:.4f}, "
        f"padded {x['baseline_padded_efficiency']:.4f}) in {x['rows']:,} rows of {x['pack_length']}",
        f"  peak RSS {x['peak_rss_mb']:,.0f} MB, wall {x['wall_s']:.1f} s, cpu {x['cpu_s']:.1f} s",
        *(
            f"  mix alone x{m['factor']}: {m['examples']:,} examples, {m['shuffle_buckets']} buckets, "
            f"{m['mix_s']:.1f} s, peak RSS {m['peak_rss_mb']:,.0f} MB"
            for m in x["mix_scaling"]
        ),
    ]
    p = x.get("peer")
    if p:
        ours, hf = p["flanpipe"], p["hf_datasets_trl_bfd"]
        lines += [
            "  tokenize + pack of the same mixture, each in a fresh process:",
            *(
                f"    {name:<24} {r['wall_s']:8.2f} s wall {r['cpu_s']:8.2f} s cpu  "
                f"peak RSS {r['peak_rss_mb']:8,.0f} MB  packing "
                f"{r['packing_efficiency']:.4f} in {r['rows']:,} rows"
                for name, r in (("flanpipe", ours), ("datasets map + TRL bfd", hf))
            ),
            f"    flanpipe is {p['speedup']:.2f}x faster ({p['cpu_ratio_hf_over_flanpipe']:.2f}x less CPU), "
            f"HF peak RSS {p['peak_rss_ratio_hf_over_flanpipe']:.2f}x "
            f"flanpipe's; same tokens: {p['same_tokens']}",
        ]
    return "\n".join(lines)


def main(scale: float, workdir: str | None, as_json: bool, peer: bool = False) -> None:
    """Entry point of ``flanpipe bench data``; with ``peer``, fails (exit 3) when the peer is not installed."""
    if peer:
        from flanpipe.bench.peer_data import missing_peer_packages

        missing = missing_peer_packages()
        if missing:
            print(
                f"flanpipe bench data --peer: the peer needs {', '.join(missing)}, not installed here "
                "(pip install 'flanpipe[bench]')",
                file=sys.stderr,
            )
            raise SystemExit(3)
    stats = run_bench(scale, Path(workdir) if workdir else None, peer=peer)
    print(json.dumps(stats) if as_json else format_report(stats))
