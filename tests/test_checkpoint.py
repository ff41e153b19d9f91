"""Checkpoints: bit-exact round trips, clear errors, atomic replacement under SIGKILL."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from bptt.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    UnverifiedCheckpointWarning,
    content_digest,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
    sidecar_path,
)


def _tensors(rng):
    return {
        "model": {
            "encoder.weight": rng.standard_normal((7, 5)).astype(np.float32),
            "decoder.bias": rng.standard_normal(5),  # float64
            "emb": rng.integers(-5, 5, (3, 2)).astype(np.int64),
            "empty": np.zeros((0, 4), dtype=np.float32),
        },
        "optim": {
            "m.encoder.weight": rng.standard_normal((7, 5)).astype(np.float32),
            "step_mask": np.array([True, False, True]),
            "counts": np.arange(6, dtype=np.uint16).reshape(2, 3),
        },
        "extra": {"noise": rng.standard_normal(4).astype(np.float16)},
    }


def _meta(rng):
    return {
        "kind": "char_lm",
        "config": {"cell": "lstm", "hidden": 128, "layers": 2, "dropout": 0.25},
        "vocab": list("\n !abcé日🙂"),
        "step": 1234,
        "best_val_loss": 1.4375,
        "optimizer": {"name": "adam", "lr": 2e-3, "betas": [0.9, 0.999]},
        "rng": rng_state(rng),
    }


def _assert_same_tensors(got, want):
    assert got.keys() == want.keys()
    for ns in want:
        assert got[ns].keys() == want[ns].keys()
        for name, arr in want[ns].items():
            out = got[ns][name]
            assert out.dtype == arr.dtype and out.shape == arr.shape, (ns, name)
            assert out.tobytes() == arr.tobytes(), (ns, name)  # bit-exact, NaN payloads included


def test_round_trip(tmp_path, rng):
    tensors, meta = _tensors(rng), _meta(rng)
    tensors["model"]["decoder.bias"][0] = np.nan
    path = tmp_path / "run" / "ckpt.safetensors"  # the directory is created
    save_checkpoint(path, tensors, meta)
    got, got_meta = load_checkpoint(path)
    _assert_same_tensors(got, tensors)
    assert got_meta == {"format_version": FORMAT_VERSION, **meta}
    # only the checkpoint and its sidecar: no temporary files left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.json", "ckpt.safetensors"]


def test_sidecar_is_readable_json_with_same_meta(tmp_path, rng):
    meta = _meta(rng)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"model": {"w": np.ones(2)}}, meta)
    assert sidecar_path(path) == tmp_path / "ckpt.json"
    side = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    assert side == {"format_version": FORMAT_VERSION, **meta}
    assert "日" in sidecar_path(path).read_text(encoding="utf-8")  # unescaped, for people
    # the sidecar is never read back: deleting or breaking it changes nothing
    sidecar_path(path).write_text("garbage")
    assert load_checkpoint(path)[1]["step"] == 1234
    # a checkpoint not named *.safetensors never collides with its sidecar
    assert sidecar_path(tmp_path / "x.json") == tmp_path / "x.json.json"


def test_flat_tensors_go_under_model_and_numpy_meta(tmp_path):
    path = tmp_path / "flat.safetensors"
    w = np.arange(6, dtype=np.float64).reshape(2, 3)
    save_checkpoint(path, {"w": w, "rnn.bias": np.zeros(3)}, {"step": np.int64(7), "lr": np.float32(0.5), "a": np.arange(3)})
    tensors, meta = load_checkpoint(path)
    assert list(tensors) == ["model"] and set(tensors["model"]) == {"w", "rnn.bias"}
    np.testing.assert_array_equal(tensors["model"]["w"], w)
    assert meta == {"format_version": FORMAT_VERSION, "step": 7, "lr": 0.5, "a": [0, 1, 2]}


def test_overwrite_replaces_and_keeps_permissions(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"model": {"w": np.zeros(3)}}, {"step": 1})
    save_checkpoint(path, {"model": {"w": np.ones(3)}}, {"step": 2})
    tensors, meta = load_checkpoint(path)
    assert meta["step"] == 2 and tensors["model"]["w"].tolist() == [1, 1, 1]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_rng_continues_identically(tmp_path, rng):
    rng.standard_normal(17)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"model": {"w": np.zeros(1)}}, {"rng": rng_state(rng)})
    restored = restore_rng(load_checkpoint(path)[1]["rng"])
    np.testing.assert_array_equal(restored.standard_normal(50), rng.standard_normal(50))
    np.testing.assert_array_equal(restored.integers(0, 2**63, 20), rng.integers(0, 2**63, 20))
    assert restored.random() == rng.random()


@pytest.mark.parametrize("name", ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"])
def test_rng_state_every_bit_generator(name):
    gen = np.random.Generator(getattr(np.random, name)(42))
    gen.integers(0, 10, 3, dtype=np.uint32)  # leaves a buffered half-word in some generators
    state = json.loads(json.dumps(rng_state(gen)))
    twin = restore_rng(state)
    np.testing.assert_array_equal(twin.integers(0, 1000, 100, dtype=np.uint32), gen.integers(0, 1000, 100, dtype=np.uint32))
    np.testing.assert_array_equal(twin.random(100), gen.random(100))


@pytest.mark.parametrize("state", [{}, {"bit_generator": "os.system"}, {"bit_generator": "PCG64", "state": "x"}, [1]])
def test_restore_rng_rejects_invalid(state):
    with pytest.raises(CheckpointError, match="RNG state"):
        restore_rng(state)


# ---------------------------------------------------------------------------- bad files
def _one_line(exc):
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture
def good_file(tmp_path, rng):
    path = tmp_path / "good.safetensors"
    save_checkpoint(path, _tensors(rng), _meta(rng))
    return path


def test_missing_file(tmp_path, good_file):
    with pytest.raises(CheckpointError, match="not found") as exc:
        load_checkpoint(tmp_path / "nowhere" / "nope.safetensors")
    _one_line(exc)
    assert "holds" not in str(exc.value)
    with pytest.raises(CheckpointError, match="not found") as exc:  # a mistyped name: the message names the others
        load_checkpoint(tmp_path / "nope.safetensors")
    _one_line(exc)
    assert str(exc.value).endswith(f"({tmp_path} holds {good_file})")
    for i in range(5):
        (tmp_path / f"c{i}.safetensors").write_bytes(good_file.read_bytes())
    with pytest.raises(CheckpointError, match=r"holds .* and 2 more\)$"):  # six files: four named
        load_checkpoint(tmp_path / "nope.safetensors")


def test_directory(tmp_path, good_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="directory") as exc:
        load_checkpoint(empty)
    assert "holds" not in str(exc.value)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.safetensors", "best.safetensors"):
        (run / name).write_bytes(good_file.read_bytes())
    with pytest.raises(CheckpointError, match="directory") as exc:
        load_checkpoint(run)  # a run directory: the message names the checkpoints inside
    _one_line(exc)
    assert str(exc.value).endswith(f"(it holds {run / 'best.safetensors'}, {run / 'last.safetensors'})")


@pytest.mark.parametrize("keep", [0, 4, 8, 100, -1])
def test_truncated_file(tmp_path, good_file, keep):
    data = good_file.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(CheckpointError, match="not a valid checkpoint") as exc:
        load_checkpoint(bad)
    _one_line(exc)


def test_random_bytes(tmp_path):
    bad = tmp_path / "random.safetensors"
    for seed in range(5):
        bad.write_bytes(np.random.default_rng(seed).bytes(5000))
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(bad)
        _one_line(exc)


def test_pickle_is_never_loaded(tmp_path):
    import pickle

    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    with pytest.raises(CheckpointError, match="not a valid checkpoint"):
        load_checkpoint(bad)


def _write_raw(path, meta_value, names=("model.w",)):
    """A well-formed safetensors file with arbitrary bptt metadata (or none, if meta_value is None)."""
    from safetensors.numpy import save_file

    metadata = None if meta_value is None else {"bptt": meta_value}
    save_file({n: np.zeros(2, dtype=np.float32) for n in names}, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "meta_value, match",
    [
        (None, "without 'bptt' metadata"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"step": 3}', "format_version"),
        ('{"format_version": "1"}', "format_version"),
        ('{"format_version": 0}', "format_version"),
    ],
)
def test_invalid_metadata(tmp_path, meta_value, match):
    path = tmp_path / "x.safetensors"
    _write_raw(path, meta_value)
    with pytest.raises(CheckpointError, match=match) as exc:
        load_checkpoint(path)
    _one_line(exc)


def test_other_metadata_key_is_rejected(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "x.safetensors"
    save_file({"model.w": np.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="without 'bptt' metadata"):
        load_checkpoint(path)


def test_tensor_without_namespace(tmp_path):
    path = tmp_path / "x.safetensors"
    _write_raw(path, json.dumps({"format_version": 1}), names=("weight",))
    with pytest.raises(CheckpointError, match="no namespace"):
        load_checkpoint(path)


def test_future_version(tmp_path):
    path = tmp_path / "future.safetensors"
    _write_raw(path, json.dumps({"format_version": FORMAT_VERSION + 1, "step": 1}))
    with pytest.raises(CheckpointError, match="newer bptt") as exc:
        load_checkpoint(path)
    _one_line(exc)


def test_corrupted_header(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n // 2] = ord("\\")  # break the JSON header in the middle
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)


# ---------------------------------------------------------------------------- writing
def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file, not a directory")
    with pytest.raises(CheckpointError, match="cannot") as exc:
        save_checkpoint(blocker / "ckpt.safetensors", {"model": {"w": np.zeros(2)}}, {})
    _one_line(exc)
    with pytest.raises(CheckpointError):
        save_checkpoint(blocker / "sub" / "ckpt.safetensors", {"model": {"w": np.zeros(2)}}, {})
    assert blocker.read_text() == "I am a file, not a directory"


def test_failed_save_keeps_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"model": {"w": np.ones(3)}}, {"step": 1})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"model": {"w": np.ones(3)}}, {"step": object()})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"model": {"w": np.array([object()])}}, {"step": 2})
    assert load_checkpoint(path)[1]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.json", "ckpt.safetensors"]


_WRITER = r"""
import sys
import numpy as np
from bptt.checkpoint import save_checkpoint

path = sys.argv[1]
start = int(sys.argv[2])
n = 5_000_000  # 20 MB of float32
for step in range(start, start + 10_000):
    # every tensor and the meta encode the step, so a mix of two versions is detectable
    save_checkpoint(path, {"model": {"a": np.full(n, step, np.float32)},
                           "optim": {"b": np.full(1000, -step, np.int64)}},
                    {"step": step, "check": [step] * 100})
    print(step, flush=True)
"""


def test_sigkill_during_writes_never_tears_the_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    rng = np.random.default_rng(1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    start = 0
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(start)], stdout=subprocess.PIPE, env=env, text=True
        )
        try:
            first = proc.stdout.readline()  # one complete save, so the process is in its write loop
            assert first.strip() == str(start), "writer failed to start"
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        done = [int(line) for line in [first, *proc.stdout.read().split()] if line.strip()]
        proc.stdout.close()

        tensors, meta = load_checkpoint(path)  # must never raise
        step = meta["step"]
        # the newest finished save, or the one whose rename landed just before the kill
        assert done[-1] <= step <= done[-1] + 1
        assert meta["check"] == [step] * 100
        a, b = tensors["model"]["a"], tensors["optim"]["b"]
        assert a.shape == (5_000_000,) and (a == step).all()
        assert (b == -step).all()
        start = step + 1

    # temporary files of killed writers are removed by the next save
    save_checkpoint(path, {"model": {"a": np.zeros(1)}}, {"step": start})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.json", "ckpt.safetensors"]
    assert load_checkpoint(path)[1]["step"] == start


# ---------------------------------------------------------------------------- content digest
def _char_lm_checkpoint(path):
    from bptt.lm.model import CharLM, CharLMConfig
    from bptt.nn.optim import Adam

    model = CharLM(CharLMConfig(vocab_size=7, model="lstm", hidden=6, layers=2), rng=0)
    opt = Adam(model, lr=1e-3)
    arrays, opt_meta = opt.state_dict()
    meta = {"kind": "char_lm", "model_config": model.config.to_dict(), "vocab": list("\n abcde"),
            "iteration": 12, "optimizer": opt_meta}
    save_checkpoint(path, {"model": model.state_dict(), "optim": arrays}, meta)
    return model.state_dict()


def _seq2seq_checkpoint(path):
    from bptt.seq2seq.model import Seq2Seq, Seq2SeqConfig

    cfg = Seq2SeqConfig(src_vocab=9, tgt_vocab=8, embedding=4, hidden=6, attention="general")
    model = Seq2Seq(cfg, rng=np.random.default_rng(1))
    save_checkpoint(path, {"model": model.state_dict()}, {"kind": "seq2seq", "config": cfg.to_dict(), "step": 3})
    return model.state_dict()


def _data_start(data: bytes) -> int:
    (n,) = struct.unpack("<Q", data[:8])
    return 8 + n


@pytest.mark.parametrize("make", [_char_lm_checkpoint, _seq2seq_checkpoint], ids=["char_lm", "seq2seq"])
def test_flipped_tensor_byte_is_detected(tmp_path, make, recwarn):
    path = tmp_path / "ckpt.safetensors"
    state = make(path)
    data = path.read_bytes()
    header = json.loads(data[8:_data_start(data)])
    assert header["__metadata__"]["bptt_sha256"].startswith("sha256:")
    tensors, _ = load_checkpoint(path)  # intact: loads, no warning
    assert not [w for w in recwarn if issubclass(w.category, UnverifiedCheckpointWarning)]
    _assert_same_tensors({"model": tensors["model"]}, {"model": state})

    # one byte in the middle of one tensor's data (a recurrent weight matrix)
    name = next(k for k in header if k.startswith("model.") and "weight_hh" in k)
    lo, hi = header[name]["data_offsets"]
    pos = _data_start(data) + (lo + hi) // 2
    bad = bytearray(data)
    bad[pos] ^= 0x01
    bad_path = tmp_path / "flipped.safetensors"
    bad_path.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="corrupted") as exc:
        load_checkpoint(bad_path)
    assert str(bad_path) in _one_line(exc)

    # verify=False loads it anyway, and the damage is where we put it
    tensors, meta = load_checkpoint(bad_path, verify=False)
    got, want = tensors["model"][name[len("model."):]], state[name[len("model."):]]
    diff = np.flatnonzero(got.view(np.uint8).ravel() != want.view(np.uint8).ravel())
    assert diff.tolist() == [(lo + hi) // 2 - lo]


def test_flipped_meta_digit_and_swapped_names_are_detected(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"model": {"a": np.arange(4.0), "b": np.arange(4.0) + 10}}, {"step": 1234})
    data = path.read_bytes()
    # a flipped digit in the meta still parses as JSON: only the digest notices
    bad = tmp_path / "meta.safetensors"
    bad.write_bytes(data.replace(b'\\"step\\": 1234', b'\\"step\\": 1235'))
    assert bad.read_bytes() != data
    assert load_checkpoint(bad, verify=False)[1]["step"] == 1235
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(bad)
    # two same-shaped tensors whose names are swapped in the header: the data bytes are unchanged
    swapped = tmp_path / "swapped.safetensors"
    swapped.write_bytes(data.replace(b'"model.a"', b'"model.X"').replace(b'"model.b"', b'"model.a"')
                        .replace(b'"model.X"', b'"model.b"'))
    assert load_checkpoint(swapped, verify=False)[0]["model"]["a"].tolist() == [10, 11, 12, 13]
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(swapped)


def test_old_format_without_digest_loads_with_a_notice(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "old.safetensors"
    save_file({"model.w": np.arange(3, dtype=np.float32)}, str(path),
              metadata={"bptt": json.dumps({"format_version": 1, "step": 5})})
    with pytest.warns(UnverifiedCheckpointWarning) as record:
        tensors, meta = load_checkpoint(path)
    assert meta["step"] == 5 and tensors["model"]["w"].tolist() == [0, 1, 2]
    assert len(record) == 1
    msg = str(record[0].message)
    assert str(path) in msg and "\n" not in msg
    assert record[0].filename == __file__  # points at the caller, not at checkpoint.py
    # verify=False: no notice
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(path, verify=False)


@pytest.mark.parametrize("value", ["md5:abc", "sha256:" + "0" * 63, "sha256:" + "0" * 64])
def test_invalid_or_wrong_digest(tmp_path, value):
    from safetensors.numpy import save_file

    path = tmp_path / "x.safetensors"
    save_file({"model.w": np.zeros(2)}, str(path),
              metadata={"bptt": json.dumps({"format_version": 1}), "bptt_sha256": value})
    with pytest.raises(CheckpointError, match="digest|corrupted") as exc:
        load_checkpoint(path)
    _one_line(exc)


def test_digest_is_independent_of_layout_and_byte_order(rng):
    meta = json.dumps({"format_version": 1})
    a = rng.standard_normal((3, 4))
    b = np.arange(5, dtype=np.int32)
    d1 = content_digest({"m.a": a, "m.b": b}, meta)
    assert d1 == content_digest({"m.b": b, "m.a": a}, meta)  # insertion order
    assert d1 == content_digest({"m.a": np.asfortranarray(a), "m.b": b.astype(">i4")}, meta)  # memory layout, byte order
    assert d1 != content_digest({"m.a": a.reshape(4, 3), "m.b": b}, meta)  # shape
    assert d1 != content_digest({"m.a": a, "m.b": b.astype(np.uint32)}, meta)  # dtype
    assert d1 != content_digest({"m.a": a, "m.c": b}, meta)  # name
    assert d1 != content_digest({"m.a": a, "m.b": b}, meta + " ")  # meta
    assert len(d1) == len("sha256:") + 64


def test_new_checkpoints_stay_plain_safetensors(tmp_path, rng, torch):
    from safetensors.numpy import load_file as np_load
    from safetensors.torch import load_file as torch_load

    tensors = _tensors(rng)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, tensors, _meta(rng))
    flat = {f"{ns}.{k}": v for ns, group in tensors.items() for k, v in group.items()}
    got_np = np_load(str(path))
    got_t = torch_load(str(path))
    assert got_np.keys() == flat.keys() == got_t.keys()
    for k, v in flat.items():
        assert got_np[k].tobytes() == v.tobytes()
        t = got_t[k]
        assert tuple(t.shape) == v.shape
        np.testing.assert_array_equal(t.numpy(), v)
