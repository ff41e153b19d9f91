"""Corpus reading, encoding, splits and the char-rnn TBPTT batch layout."""

import tracemalloc

import numpy as np
import pytest

from bptt.lm.data import (
    DataError,
    TBPTTBatches,
    Vocab,
    default_corpus,
    encode_file,
    encode_text,
    read_text,
    split_corpus,
)

TEXT = "Grüß Gott! Ünïcödé: 日本語, emoji 🙂, Ελληνικά.\nsecond line\ttab\n"


# ---------------------------------------------------------------------------- Vocab
def test_vocab_round_trip_non_ascii():
    v = Vocab(TEXT)
    assert v.chars == sorted(set(TEXT))
    assert len(v) == len(set(TEXT))
    ids = v.encode(TEXT)
    assert ids.dtype == np.uint8 and ids.shape == (len(TEXT),)
    assert v.decode(ids) == TEXT
    assert v.decode(ids.astype(np.int64).tolist()) == TEXT
    # ids follow the sorted character order
    assert [v.decode([i]) for i in range(len(v))] == sorted(set(TEXT))


def test_vocab_json_round_trip_keeps_order():
    v = Vocab(TEXT)
    import json

    w = Vocab.from_json(json.loads(json.dumps(v.to_json())))
    assert w == v
    np.testing.assert_array_equal(w.encode(TEXT), v.encode(TEXT))
    # a saved list in any order is restored in that order
    u = Vocab.from_json(["z", "a", "é"])
    assert u.encode("aéz").tolist() == [1, 2, 0]
    assert u.decode([0, 1, 2]) == "zaé"


@pytest.mark.parametrize("bad", [["a", "a"], ["ab"], [1], "abc", [""]])
def test_vocab_from_json_rejects_invalid(bad):
    with pytest.raises(DataError):
        Vocab.from_json(bad)


def test_vocab_unknown_and_encode_error():
    v = Vocab("abc")
    assert v.unknown("abxcyx") == ["x", "y"]
    assert v.unknown("cab") == []
    assert "a" in v and "x" not in v
    with pytest.raises(DataError, match="2 character") as exc:
        v.encode("abxcy")
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match="out of range"):
        v.decode([0, 3])


def test_vocab_dtype_is_smallest_that_fits():
    assert Vocab("").dtype == np.uint8
    assert Vocab(chr(i) for i in range(256)).dtype == np.uint8
    assert Vocab(chr(i) for i in range(257)).dtype == np.uint16
    assert Vocab(chr(i) for i in range(65536)).dtype == np.uint16
    big = Vocab(chr(i) for i in range(65537))
    assert big.dtype == np.uint32
    text = "".join(chr(i) for i in (0, 0xD800, 65535, 65536, 7))  # a lone surrogate too
    np.testing.assert_array_equal(big.encode(text), [0, 0xD800, 65535, 65536, 7])
    assert big.decode(big.encode(text)) == text


def test_vocab_encode_in_chunks_matches_whole():
    text = TEXT * 50
    v = Vocab(text)
    np.testing.assert_array_equal(v.encode(text, chunk_chars=7), v.encode(text))
    np.testing.assert_array_equal(encode_text(text, v), v.encode(text))


# ---------------------------------------------------------------------------- read_text
def test_read_text_exact(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(TEXT.replace("\n", "\r\n").encode("utf-8"))
    assert read_text(p) == TEXT.replace("\n", "\r\n")  # no newline translation
    p.write_bytes("café".encode("latin-1"))
    assert read_text(p, encoding="latin-1") == "café"


def _one_line_error(exc):
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_read_text_missing(tmp_path):
    with pytest.raises(DataError, match="no such file") as exc:
        read_text(tmp_path / "nope.txt")
    _one_line_error(exc)


def test_read_text_directory(tmp_path):
    with pytest.raises(DataError, match="directory") as exc:
        read_text(tmp_path)
    _one_line_error(exc)


def test_read_text_empty(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as exc:
        read_text(p)
    _one_line_error(exc)


def test_read_text_binary(tmp_path):
    p = tmp_path / "bin.dat"
    p.write_bytes(b"PK\x03\x04\x00\x00hello")
    with pytest.raises(DataError, match="binary.*--unit byte") as exc:  # and where such a file can go
        read_text(p)
    _one_line_error(exc)


def test_read_text_utf16_is_not_binary(tmp_path):
    p = tmp_path / "u16.txt"
    p.write_bytes("hello".encode("utf-16"))
    assert read_text(p, encoding="utf-16") == "hello"


def test_read_text_undecodable_reports_offset_and_encoding_hint(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"abc caf\xe9 au lait")
    with pytest.raises(DataError) as exc:
        read_text(p)
    msg = _one_line_error(exc)
    assert "byte offset 7" in msg and "--encoding" in msg and "latin-1" in msg and "0xe9" in msg


def test_read_text_unknown_encoding(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hi")
    with pytest.raises(DataError, match="unknown text encoding"):
        read_text(p, encoding="no-such-codec")


# ---------------------------------------------------------------------------- encode_file
def test_encode_file_matches_encode_text_across_chunk_boundaries(tmp_path):
    # multi-byte characters of every UTF-8 length straddle the chunk_chars=5 byte reads
    text = ("aé日🙂" * 37 + "\n") * 11 + "end"
    p = tmp_path / "corpus.txt"
    p.write_bytes(text.encode("utf-8"))
    for chunk in (1, 2, 3, 5, 7, 64, 10_000):
        vocab, ids = encode_file(p, tmp_path / f"ids{chunk}.npy", chunk_chars=chunk)
        assert vocab == Vocab(text)
        assert isinstance(ids, np.memmap) and not ids.flags.writeable
        assert ids.dtype == vocab.dtype and ids.shape == (len(text),)
        np.testing.assert_array_equal(ids, encode_text(text, vocab))
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith(".")) == []  # no temp files left
    # the .npy is an ordinary array file
    np.testing.assert_array_equal(np.load(tmp_path / "ids5.npy"), encode_text(text, vocab))


def test_encode_file_other_encoding(tmp_path):
    text = "naïve café " * 100
    p = tmp_path / "u16.txt"
    p.write_bytes(text.encode("utf-16"))
    vocab, ids = encode_file(p, tmp_path / "ids.npy", encoding="utf-16", chunk_chars=3)
    assert vocab.decode(ids) == text


@pytest.mark.parametrize("chunk", [4, 5, 6, 1000])
def test_encode_file_decode_error_offset(tmp_path, chunk):
    good = "日本語ab".encode("utf-8")  # 11 bytes
    p = tmp_path / "bad.txt"
    p.write_bytes(good + b"\xff" + b"more text")
    with pytest.raises(DataError, match="byte offset 11") as exc:
        encode_file(p, tmp_path / "ids.npy", chunk_chars=chunk)
    assert "--encoding" in _one_line_error(exc)
    assert not (tmp_path / "ids.npy").exists()
    assert list(tmp_path.iterdir()) == [p]  # no temp files either


def test_encode_file_truncated_character_at_end(tmp_path):
    p = tmp_path / "cut.txt"
    p.write_bytes("ab日".encode("utf-8")[:-1])  # the last character is missing its final byte
    with pytest.raises(DataError, match="byte offset 2"):
        encode_file(p, tmp_path / "ids.npy", chunk_chars=2)


def test_encode_file_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        encode_file(tmp_path / "missing.txt", tmp_path / "ids.npy")
    with pytest.raises(DataError, match="directory"):
        encode_file(tmp_path, tmp_path / "ids.npy")
    p = tmp_path / "bin"
    p.write_bytes(b"\x00\x01\x02abc")
    with pytest.raises(DataError, match="binary"):
        encode_file(p, tmp_path / "ids.npy")
    p = tmp_path / "t.txt"
    p.write_text("some text")
    with pytest.raises(DataError, match="overwrite"):
        encode_file(p, p)
    assert p.read_text() == "some text"
    p.write_bytes(b"\xef\xbb\xbf")  # a byte-order mark and nothing else
    with pytest.raises(DataError, match="no text"):
        encode_file(p, tmp_path / "ids.npy", encoding="utf-8-sig")


def test_encode_file_memory_is_bounded_by_chunk_not_file(tmp_path):
    # 8 MB corpus, 32 K-character chunks: peak traced memory must stay far below the file size
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghij klmnopqrstuvwxyzé\n"))
    text = "".join(alphabet[rng.integers(0, len(alphabet), 1 << 20)])
    p = tmp_path / "big.txt"
    with open(p, "w", encoding="utf-8") as f:
        for _ in range(8):
            f.write(text)
    del text
    size = p.stat().st_size
    chunk = 1 << 15
    tracemalloc.start()
    try:
        vocab, ids = encode_file(p, tmp_path / "big.npy", chunk_chars=chunk)
        batches = TBPTTBatches(ids, batch_size=16, seq_len=64)
        for k in range(0, len(batches), 97):
            batches.batch(k)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ids) == 8 * (1 << 20) and size > 8 * (1 << 20)
    # a fixed 1.1 MB (one flag per Unicode code point) plus about 24 bytes per chunk character
    # (bytes, str, code points, ids): nothing proportional to the file
    bound = 1_500_000 + 32 * chunk
    assert bound < size / 3
    assert peak < bound, f"peak {peak} bytes for a {size}-byte file"


# ---------------------------------------------------------------------------- split_corpus
def test_split_corpus_contiguous_nanogpt_style():
    ids = np.arange(1000)
    train, val, test = split_corpus(ids)
    assert len(train) == 900 and len(val) == 100 and len(test) == 0
    np.testing.assert_array_equal(np.concatenate([train, val, test]), ids)
    assert train[-1] + 1 == val[0]

    train, val, test = split_corpus(ids, val_frac=0.05, test_frac=0.15)
    assert (len(train), len(val), len(test)) == (800, 50, 150)
    np.testing.assert_array_equal(np.concatenate([train, val, test]), ids)

    n = 1115394  # tinyshakespeare: nanoGPT's int(n * 0.9)
    assert len(split_corpus(np.arange(n))[0]) == int(n * 0.9) == 1003854

    train, val, test = split_corpus(ids, val_frac=0.0)
    assert len(train) == 1000 and len(val) == 0 and len(test) == 0


def test_split_corpus_keeps_views(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world " * 50)
    _, ids = encode_file(p, tmp_path / "ids.npy")
    train, val, _ = split_corpus(ids)
    assert isinstance(train, np.memmap) and np.shares_memory(train, ids)


@pytest.mark.parametrize(
    "val,test", [(-0.1, 0.0), (0.1, -0.2), (0.5, 0.5), (1.0, 0.0), (0.7, 0.6), (float("nan"), 0.0)]
)
def test_split_corpus_rejects_bad_fractions(val, test):
    with pytest.raises(DataError):
        split_corpus(np.arange(100), val_frac=val, test_frac=test)


# ---------------------------------------------------------------------------- TBPTTBatches
def test_tbptt_layout():
    L, N, T = 1003, 4, 7
    ids = np.arange(L, dtype=np.uint16) * 3 % 65521  # distinct values, so positions are recoverable
    pos = {int(v): i for i, v in enumerate(ids)}
    b = TBPTTBatches(ids, batch_size=N, seq_len=T)
    S = (L - 1) // N
    assert b.stream_len == S == 250
    assert len(b) == S // T == 35
    assert b.tokens_per_epoch == 35 * T * N

    windows = list(b)
    assert len(windows) == len(b)
    for k, (x, y) in enumerate(windows):
        assert x.shape == y.shape == (T, N) and x.dtype == y.dtype == np.int64
        np.testing.assert_array_equal(x, b.batch(k)[0])
        # y is x shifted by one character: x[t+1] == y[t] within the window, and y's last is the next id
        np.testing.assert_array_equal(x[1:], y[:-1])
        for n in range(N):
            start = pos[int(x[0, n])]
            assert start == n * S + k * T  # stream n, window k
            np.testing.assert_array_equal(x[:, n], ids[start : start + T])
            np.testing.assert_array_equal(y[:, n], ids[start + 1 : start + T + 1])
            if k > 0:
                # window k continues window k-1 of the same stream
                assert pos[int(x[0, n])] == pos[int(windows[k - 1][0][-1, n])] + 1
    # streams are contiguous, non-overlapping pieces: concatenating stream n over all windows
    for n in range(N):
        stream = np.concatenate([x[:, n] for x, _ in windows])
        np.testing.assert_array_equal(stream, ids[n * S : n * S + len(b) * T])


def test_tbptt_exact_minimum_length():
    N, T = 3, 5
    ids = np.arange(N * T + 1)
    b = TBPTTBatches(ids, N, T)
    assert len(b) == 1
    x, y = b.batch(0)
    np.testing.assert_array_equal(x.T, np.arange(15).reshape(3, 5))
    assert y[-1, -1] == 15
    assert b.batch(-1)[0].tolist() == x.tolist()
    with pytest.raises(IndexError):
        b.batch(1)


def test_tbptt_too_short():
    with pytest.raises(DataError) as exc:
        TBPTTBatches(np.arange(15), batch_size=3, seq_len=5)
    msg = _one_line_error(exc)
    assert "16" in msg and "has 15" in msg


@pytest.mark.parametrize("n,t", [(0, 5), (2, 0), (-1, 3), (2.5, 3)])
def test_tbptt_bad_shape(n, t):
    with pytest.raises(DataError):
        TBPTTBatches(np.arange(100), n, t)


def test_tbptt_on_memmap_does_not_copy(tmp_path):
    text = "the quick brown fox jumps over the lazy dog\n" * 40
    p = tmp_path / "t.txt"
    p.write_text(text)
    vocab, ids = encode_file(p, tmp_path / "ids.npy")
    b = TBPTTBatches(ids, batch_size=4, seq_len=16)
    assert b.ids is ids  # kept as the memmap, sliced per batch
    x, y = b.batch(2)
    S = b.stream_len
    assert vocab.decode(x[:, 1]) == text[S + 32 : S + 48]
    assert vocab.decode(y[:, 1]) == text[S + 33 : S + 49]


# ---------------------------------------------------------------------------- default corpus
def test_default_corpus_deterministic_and_nonempty():
    text, desc = default_corpus(max_bytes=300_000)
    again, desc2 = default_corpus(max_bytes=300_000)
    assert text == again and desc == desc2
    assert 250_000 < len(text.encode("utf-8")) <= 300_000
    assert "files" in desc and f"{len(text)} characters" in desc
    assert "def " in text and "import " in text
    small, _ = default_corpus(max_bytes=1000)
    assert text.startswith(small) and len(small.encode("utf-8")) <= 1000
    with pytest.raises(DataError):
        default_corpus(max_bytes=0)
