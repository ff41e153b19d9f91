"""Units of a language model: characters (with <unk>), bytes, words; one interface, JSON round trips."""

import json
import math

import numpy as np
import pytest

from bptt.lm.data import DataError, Vocab
from bptt.lm.units import (
    EOS,
    UNK,
    UNK_CHAR,
    ByteUnits,
    CharUnits,
    WordUnits,
    detokenize,
    lm_metrics,
    make_units,
    map_bytes,
    read_bytes,
    tokenize,
    units_from_json,
)
from bptt.nn.losses import cross_entropy

TEXT = "Grüß Gott! 日本語 🙂\nsecond line\n"


def _round_trip(units):
    return units_from_json(json.loads(json.dumps(units.to_json())))


# ---------------------------------------------------------------------------- characters
def test_char_units_match_vocab_ids():
    u = make_units("char", TEXT)
    v = Vocab(TEXT)
    assert len(u) == len(v) and u.unk_id is None and u.dtype == v.dtype
    np.testing.assert_array_equal(u.encode(TEXT), v.encode(TEXT))
    assert u.decode(u.encode(TEXT)) == TEXT
    assert _round_trip(u) == u
    # the vocab list of an old checkpoint is a CharUnits without <unk>
    assert units_from_json(v.to_json()) == u


def test_char_unknown_without_unk_is_an_error():
    u = CharUnits.fit("abc")
    with pytest.raises(DataError, match="2 character") as exc:
        u.encode("abxcy")
    assert "\n" not in str(exc.value)


def test_char_unk_counts_unseen_characters():
    u = CharUnits.fit("abc\n", unk=True)
    assert len(u) == 5 and u.unk_id == 4
    enc = u.encode_counted("abxxc\n🙂")
    assert enc.ids.tolist() == [1, 2, 4, 4, 3, 0, 4]
    assert enc.unknown == 3 and enc.unknown_units == ["x", "🙂"]
    assert u.decode(enc.ids) == f"ab{UNK_CHAR}{UNK_CHAR}c\n{UNK_CHAR}"
    assert u.encode_counted("cab").unknown == 0
    chunked = u.encode_counted("abxxc\n🙂" * 5, chunk_chars=3)  # chunk edges inside the text
    assert chunked.ids.tolist() == enc.ids.tolist() * 5 and chunked.unknown == 15
    w = _round_trip(u)
    assert w == u and w.unk_id == 4 and w != CharUnits.fit("abc\n")
    with pytest.raises(DataError, match="out of range"):
        u.decode([5])


def test_char_unk_dtype_grows_with_the_extra_id():
    chars = [chr(i) for i in range(256)]
    assert CharUnits(chars).dtype == np.uint8
    assert CharUnits(chars, unk=True).dtype == np.uint16


# ---------------------------------------------------------------------------- bytes
def test_bytes_read_any_file_and_decode_invalid_utf8_visibly(tmp_path):
    data = "naïve café ".encode("latin-1") + b"\x00\xff\xfe" + "ok ✓".encode("utf-8") + b"\xe2\x9c"  # cut ✓
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    path = tmp_path / "latin1.bin"
    path.write_bytes(data)
    u = make_units("byte", None)
    assert len(u) == 256 and u.dtype == np.uint8 and u.unk_id is None
    raw = u.read(path, encoding="utf-8")  # the encoding is ignored: nothing is decoded
    assert raw == read_bytes(path) == data
    enc = u.encode_counted(raw)
    assert enc.unknown == 0 and enc.ids.dtype == np.uint8
    assert enc.ids.tolist() == list(data)
    np.testing.assert_array_equal(map_bytes(path), enc.ids)
    assert u.decode_bytes(enc.ids) == data
    text = u.decode(enc.ids)
    assert text == "na\\xefve caf\\xe9 \x00\\xff\\xfeok ✓\\xe2\\x9c"
    assert _round_trip(u) == u
    # a str is taken as UTF-8 (prompts)
    assert u.encode("é").tolist() == [0xC3, 0xA9]
    with pytest.raises(DataError, match="out of range"):
        u.decode([256])


def test_bytes_streaming_decoder_holds_split_characters():
    u = ByteUnits()
    ids = u.encode("a🙂b".encode("utf-8") + b"\xff")
    dec = u.decoder()
    parts = [dec(ids[i : i + 1]) for i in range(len(ids))]
    assert parts[:6] == ["a", "", "", "", "🙂", "b"]
    assert "".join(parts) + dec([], final=True) == "a🙂b\\xff"
    dec2 = u.decoder()
    assert dec2(u.encode(b"\xf0\x9f")) == "" and dec2([], final=True) == "\\xf0\\x9f"  # truncated at the end


@pytest.mark.parametrize("setup", ["missing", "dir", "empty"])
def test_read_bytes_errors(tmp_path, setup):
    p = tmp_path / "f"
    if setup == "dir":
        p.mkdir()
    elif setup == "empty":
        p.write_bytes(b"")
    for fn in (read_bytes, map_bytes):
        with pytest.raises(DataError) as exc:
            fn(p)
        assert str(p) in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------------------- words
def test_tokenize_and_detokenize():
    text = "The cat's toy (red) costs $5, doesn't it?\nYes: <unk> said \"no\".\nlast"
    toks = tokenize(text)
    assert toks == ["The", "cat's", "toy", "(", "red", ")", "costs", "$", "5", ",", "doesn't", "it", "?", EOS,
                    "Yes", ":", UNK, "said", '"', "no", '"', ".", EOS, "last"]
    assert detokenize(toks) == "The cat's toy (red) costs $5, doesn't it?\nYes: <unk> said \" no \".\nlast"
    assert detokenize(["it", "'s", "a", "dog", ".", EOS]) == "it's a dog.\n"
    assert tokenize("a\r\nb\n\n") == ["a", EOS, "b", EOS, EOS]


def test_word_vocab_by_frequency_and_unknowns_counted():
    train = "the cat sat\nthe dog sat\nthe end\n"
    u = make_units("word", train, vocab_size=5)
    assert isinstance(u, WordUnits)
    # counts: the 3, sat 2, cat 1, dog 1, end 1 -> keep the, sat, then cat (alphabetical tie-break)
    assert u.tokens == [UNK, "<eos>", "the", "sat", "cat"]
    assert u.vocab_size == len(u) == 5 and u.unk_id == 0 and u.eos_id == 1
    enc = u.encode_counted("the dog sat\nthe bird <unk>\n")
    assert enc.ids.tolist() == [2, 0, 3, 1, 2, 0, 0, 1]
    assert enc.unknown == 2 and enc.unknown_units == ["bird", "dog"]  # the literal <unk> is not counted
    assert u.unknown("a dog the") == ["a", "dog"]
    assert u.decode(enc.ids) == "the <unk> sat\nthe <unk> <unk>\n"
    assert _round_trip(u) == u
    full = make_units("word", train)
    assert len(full) == 7 and full.encode_counted(train).unknown == 0
    assert make_units("word", train, vocab_size=7) == full  # exactly every word: allowed


@pytest.mark.parametrize("size, match", [(0, ">= 3"), (2, ">= 3"), (-1, ">= 3"), (2.5, ">= 3"), (True, ">= 3"),
                                         (8, "at most 7")])
def test_word_vocab_size_errors(size, match):
    with pytest.raises(DataError, match=match) as exc:
        make_units("word", "the cat sat\nthe dog sat\nthe end\n", vocab_size=size)
    assert "\n" not in str(exc.value)


def test_word_streaming_decoder_matches_whole():
    u = make_units("word", "hello , world .\nsay ( hi ) again\n")
    ids = u.encode("hello, world.\nsay (hi) again\n")
    dec = u.decoder()
    assert "".join(dec(ids[i : i + 1]) for i in range(len(ids))) == u.decode(ids) == "hello, world.\nsay (hi) again\n"


def test_word_perplexity_from_a_known_bigram_table(rng):
    """The model is a fixed table P(next | previous); the test computes the perplexity on its own."""
    train = "the cat sat\nthe dog ran\na cat ran\n"
    u = make_units("word", train, vocab_size=6)  # cat, ran, the (2 each) + the first of a, dog, sat (1 each)
    assert u.tokens == [UNK, EOS, "cat", "ran", "the", "a"]
    V = len(u)
    table = rng.dirichlet(np.ones(V), size=V)  # table[prev, next]
    valid = "the dog sat\na cat ran\nthe bird ran\n"

    # through the library: ids, log-probabilities as logits, cross_entropy summed, lm_metrics
    ids = u.encode(valid).astype(np.int64)
    logits = np.log(table[ids[:-1]])  # (L-1, V): the row of the previous word
    total, _ = cross_entropy(logits, ids[1:], reduction="sum", need_grad=False)
    m = lm_metrics(total, len(ids) - 1, u)

    # independently: words by str.split, <eos> per line, unknown words looked up as <unk>
    known = {"the", "cat", "ran", "a"}
    names = [UNK, EOS, "cat", "ran", "the", "a"]
    words = []
    for line in valid.splitlines():
        words += [w if w in known else UNK for w in line.split()] + [EOS]
    P = {(names[i], names[j]): table[i, j] for i in range(V) for j in range(V)}
    logp = [math.log(P[(a, b)]) for a, b in zip(words[:-1], words[1:])]
    ppl = math.exp(-sum(logp) / len(logp))

    assert len(words) == 12 and u.encode_counted(valid).unknown == 3  # dog, sat, bird
    assert m["count"] == 11 and m["unit"] == "word"
    assert m["perplexity"] == pytest.approx(ppl, rel=1e-12)
    assert m["bits_per_unit"] == pytest.approx(-sum(logp) / len(logp) / math.log(2), rel=1e-12)


# ---------------------------------------------------------------------------- common interface
@pytest.mark.parametrize("kind", ["char", "byte", "word"])
def test_same_interface_for_every_kind(tmp_path, kind):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    probe = make_units(kind, "x" if kind != "byte" else None)
    data = probe.read(path, encoding="utf-8")
    u = make_units(kind, data)
    enc = u.encode_counted(data)
    assert enc.unknown == 0 and enc.ids.dtype == u.dtype and enc.ids.ndim == 1
    assert int(enc.ids.max()) < len(u)
    text = u.decode(enc.ids)
    assert isinstance(text, str)
    if kind != "word":
        assert text == TEXT
    else:
        assert text == "Grüß Gott! 日本語 🙂\nsecond line\n"
    dec = u.decoder()
    assert "".join(dec(enc.ids[i : i + 3]) for i in range(0, len(enc.ids), 3)) + dec([], final=True) == text
    assert _round_trip(u) == u
    assert u.kind == kind and isinstance(u.unit_name, str)


@pytest.mark.parametrize("bad", [{"kind": "bpe"}, {"chars": ["a"]}, 3, {"kind": "word"}, {"kind": "char"},
                                 {"kind": "word", "words": ["a", "a"]}, {"kind": "word", "words": ["<eos>"]},
                                 {"kind": "char", "chars": ["ab"]}, {"kind": "char", "chars": ["a"], "unk": "yes"}])
def test_units_from_json_rejects_invalid(bad):
    with pytest.raises(DataError):
        units_from_json(bad)


def test_make_units_errors():
    with pytest.raises(DataError, match="unknown unit kind"):
        make_units("bpe", "abc")
    with pytest.raises(DataError, match="word units only"):
        make_units("char", "abc", vocab_size=10)
    with pytest.raises(DataError, match="no training text"):
        make_units("char", "")
    with pytest.raises(DataError, match="no words"):
        make_units("word", " \n \n")


def test_lm_metrics():
    m = lm_metrics(3 * math.log(4), 3, ByteUnits())
    assert m["loss"] == pytest.approx(math.log(4)) and m["perplexity"] == pytest.approx(4.0)
    assert m["bits_per_unit"] == pytest.approx(2.0) and m["unit"] == "byte"
    with pytest.raises(DataError):
        lm_metrics(1.0, 0, ByteUnits())
