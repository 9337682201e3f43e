"""Stage-2 score cache: exact float32 rows round-trip through the file, one record per distinct pair,
a torn or corrupt tail is truncated on open (earlier batches survive whole), hits/misses/seconds add
up; the reader fingerprint follows the checkpoint's files and the LoRA weights; the gold
log-likelihoods and the data order are what their definitions say."""

import os
import struct
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from jomed_fast.readers.fingerprint import reader_fingerprint
from jomed_fast.train.data_order import batches_per_epoch, epoch_batches, epoch_order
from jomed_fast.train.pair_scores import gold_log_likelihoods
from jomed_fast.train.score_cache import FILE_MAGIC, CacheDamageWarning, ScoreCache

NS = ("f" * 64, "synthetic", "shared_query|first_token|norm")


def _rows(n, C=5, seed=0):
    return np.random.RandomState(seed).randn(n, C).astype(np.float32)


def _pairs(q, cs):
    return [(f"q{q}", f"c{c}") for c in cs]


def test_round_trip_is_exact_and_never_duplicates(tmp_path):
    path = tmp_path / "cache.bin"
    a, b = _rows(4, seed=1), _rows(3, seed=2)
    with ScoreCache(path) as cache:
        assert cache.append(NS, _pairs(0, range(4)), a, seconds=0.4) == 4
        # two already stored, one repeated inside the call: only c4 and c5 are new
        assert cache.append(NS, _pairs(0, [2, 4, 5]) + _pairs(0, [4]), np.concatenate([b, b[1:2]]), seconds=0.1) == 2
        assert len(cache) == 6
    with ScoreCache(path) as cache:
        assert len(cache) == 6 and cache.stats.duplicates_on_disk == 0 and cache.stats.truncated_bytes == 0
        got = cache.lookup(NS, _pairs(0, [0, 3, 4, 9]))
        assert got[3] is None
        assert np.array_equal(got[0], a[0]) and np.array_equal(got[1], a[3]) and np.array_equal(got[2], b[1])
        assert got[0].dtype == np.float32
        assert (cache.stats.hits, cache.stats.misses) == (3, 1)
        # saved seconds: the per-pair seconds recorded when each hit was scored (0.1 and 0.1/4... see append)
        assert cache.stats.saved_seconds == pytest.approx(0.1 + 0.1 + 0.1 / 4)
        assert cache.stats.hit_rate == pytest.approx(0.75)
        # another namespace (another reader) shares nothing
        assert cache.lookup(("0" * 64,) + NS[1:], _pairs(0, [0]))[0] is None


def _frame_count(path):
    data = path.read_bytes()
    off, n = len(FILE_MAGIC), 0
    while off < len(data):
        _, length, _ = struct.unpack_from("<4sII", data, off)
        off += 12 + length
        n += 1
    return n, off == len(data)


@pytest.mark.parametrize("damage", ["torn", "crc", "garbage"])
def test_torn_or_corrupt_tail_is_truncated_and_earlier_batches_survive(tmp_path, damage):
    path = tmp_path / "cache.bin"
    with ScoreCache(path) as cache:
        cache.append(NS, _pairs(0, range(3)), _rows(3), seconds=0.3)
        size_one = path.stat().st_size
        cache.append(NS, _pairs(1, range(3)), _rows(3, seed=5), seconds=0.3)
    full = path.read_bytes()
    if damage == "torn":  # a crash in the middle of the second batch's write
        path.write_bytes(full[: size_one + (len(full) - size_one) // 2])
    elif damage == "crc":  # a flipped bit inside the second frame
        flipped = bytearray(full)
        flipped[-3] ^= 0x10
        path.write_bytes(bytes(flipped))
    else:
        path.write_bytes(full + b"\x00\x01junk")
    written = path.stat().st_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = ScoreCache(path)
    # a crash's torn tail goes silently; whole bytes that are not a valid frame are reported
    assert [w.category for w in caught] == ([] if damage == "torn" else [CacheDamageWarning])
    with cache:
        expect = 6 if damage == "garbage" else 3
        assert len(cache) == expect
        assert cache.stats.truncated_bytes == written - (size_one if damage != "garbage" else len(full))
        # the second batch is gone entirely (never half of it), the first is intact
        assert cache.get(NS, "q0", "c2") is not None
        if damage != "garbage":
            assert all(cache.get(NS, "q1", f"c{c}") is None for c in range(3))
            cache.append(NS, _pairs(1, range(3)), _rows(3, seed=5), seconds=0.3)
    n, clean = _frame_count(path)
    assert clean and n == 2
    with ScoreCache(path) as cache:
        assert len(cache) == 6 and cache.stats.truncated_bytes == 0


def test_torn_header_bad_magic_lock_and_argument_errors(tmp_path):
    path = tmp_path / "cache.bin"
    path.write_bytes(FILE_MAGIC[:3])  # crash while the header was written
    with ScoreCache(path) as cache:
        assert len(cache) == 0 and cache.stats.truncated_bytes == 3
        with pytest.raises(ValueError, match="open in another process"):
            ScoreCache(path)
        with pytest.raises(ValueError, match="rows: expected shape"):
            cache.append(NS, _pairs(0, [0, 1]), _rows(3), seconds=0.0)
        with pytest.raises(ValueError, match="namespace"):
            cache.lookup(("a", "b"), [])
        with pytest.raises(ValueError, match="seconds"):
            cache.append(NS, _pairs(0, [0]), _rows(1), seconds=float("nan"))
    (tmp_path / "other.bin").write_bytes(b"PK\x03\x04 not a cache")
    with pytest.raises(ValueError, match="not a jomed_fast score cache"):
        ScoreCache(tmp_path / "other.bin")


def test_gold_log_likelihoods_pick_each_querys_gold_class():
    rows = torch.randn(3, 4, 5)
    labels = torch.tensor([4, 0, 2])
    got = gold_log_likelihoods(rows, labels)
    ref = torch.stack([torch.stack([rows[b, k, labels[b]] for k in range(4)]) for b in range(3)])
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="labels: expected class indices"):
        gold_log_likelihoods(rows, torch.tensor([5, 0, 0]))
    with pytest.raises(ValueError, match="labels: expected shape"):
        gold_log_likelihoods(rows, torch.tensor([1, 0]))


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = epoch_order(10, seed=3, epoch=1)
    assert sorted(a) == list(range(10)) and a == epoch_order(10, seed=3, epoch=1)
    assert a != epoch_order(10, seed=3, epoch=2) and a != epoch_order(10, seed=4, epoch=1)
    assert epoch_order(5, 0, 0, shuffle=False) == [0, 1, 2, 3, 4]
    assert epoch_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]] and batches_per_epoch(7, 3) == 3


def _fake_reader(path, lora=None):
    r = SimpleNamespace(
        path=path,
        family="qwen2_vl",
        quantization=None,
        compute_dtype=torch.float32,
        model=None,
        has_lora=lora is not None,
        lora={"r": 8} if lora is not None else None,
    )
    r.lora_parameters = lambda: lora or {}
    return r


def test_reader_fingerprint_follows_files_and_lora(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    base = reader_fingerprint(_fake_reader(tmp_path))
    assert base == reader_fingerprint(_fake_reader(tmp_path)) and len(base) == 64
    lora = {"x.lora_A.weight": torch.zeros(2, 3)}
    with_lora = reader_fingerprint(_fake_reader(tmp_path, lora))
    assert with_lora != base
    lora["x.lora_A.weight"][0, 0] = 1e-7  # a trained adapter is another reader
    assert reader_fingerprint(_fake_reader(tmp_path, lora)) != with_lora
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))  # new size/mtime key: rehashed
    assert reader_fingerprint(_fake_reader(tmp_path)) != base
    with pytest.raises(TypeError, match="reader: expected"):
        reader_fingerprint(object())
