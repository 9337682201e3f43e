"""Data traps: high-bit-depth and odd-mode images, truncated files under --skip-bad, an index build
keyed by its records' content, image paths that survive a move, every index row checked, distinct
image file names, batch-independent pixel scaling, duplicate YAML keys, a negative MedMNIST limit.

Every case asserts the correct result against an independent computation, or the one-line error
(CLI: exit 2 with one line naming the file; API: ValueError / DataError), and that nothing was lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jomed_fast.candidate_retrieval import Retrieval
from jomed_fast.cli import main
from jomed_fast.data import DataError, IndexRecord, Sample, load_index_records, load_samples, save_png, write_samples
from jomed_fast.data.io import load_image
from jomed_fast.data.records import safe_filename
from jomed_fast.index import Index
from jomed_fast.index.__main__ import main as index_main
from jomed_fast.retriever import TinyCLIP
from jomed_fast.retriever.tiny_clip import images_to_tensor

N, SIZE = 12, 16


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _run(argv, capsys, entry=main):
    code = entry([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def _one_line(err: str) -> str:
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def _range_scaled(a: np.ndarray) -> np.ndarray:
    """The reference: min..max of the image onto 0..255 in float64, rounded, as RGB."""
    v = a.astype(np.float64)
    u = np.rint((v - v.min()) * 255.0 / (v.max() - v.min())).astype(np.uint8)
    return np.repeat(u[:, :, None], 3, axis=2)


# ------------------------------------------------------------------------------------------------
# 1. images as they are
# ------------------------------------------------------------------------------------------------
HIGH_BIT = {
    "png16": (lambda g: g.integers(1000, 40000, (9, 7)).astype(np.uint16), "png"),
    "tiff16": (lambda g: g.integers(0, 4096, (9, 7)).astype(np.uint16), "tiff"),  # 12-bit data
    "tiff32": (lambda g: g.integers(-1024, 3072, (9, 7)).astype(np.int32), "tiff"),  # CT in HU
    "tiff_float": (lambda g: g.uniform(-0.5, 2.5, (9, 7)).astype(np.float32), "tiff"),
}


@pytest.mark.parametrize("kind", sorted(HIGH_BIT))
def test_high_bit_depth_images_scale_by_their_range(tmp_path, kind):
    make, ext = HIGH_BIT[kind]
    a = make(np.random.default_rng(0))
    path = tmp_path / f"x.{ext}"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode in ("I;16", "I", "F")
    got = load_image(path)
    assert got.dtype == np.uint8 and got.shape == (9, 7, 3)
    np.testing.assert_array_equal(got, _range_scaled(a))
    assert got.min() == 0 and got.max() == 255  # neither white nor clipped: the full range is used


def test_window_and_flat_images(tmp_path):
    a = np.random.default_rng(1).integers(-1024, 3072, (8, 5)).astype(np.int32)
    Image.fromarray(a).save(tmp_path / "ct.tiff")
    lo, hi = -160, 240  # a soft-tissue window
    ref = np.clip(np.rint((a.astype(np.float64) - lo) * 255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(load_image(tmp_path / "ct.tiff", window=(lo, hi)), np.repeat(ref[..., None], 3, 2))
    with pytest.raises(ValueError, match="window: expected finite low < high"):
        load_image(tmp_path / "ct.tiff", window=(240, -160))
    save_png(tmp_path / "rgb.png", _rgb(0))
    with pytest.raises(ValueError, match="window: applies to high-bit-depth images"):
        load_image(tmp_path / "rgb.png", window=(0, 100))
    Image.fromarray(np.full((4, 4), 5000, np.uint16)).save(tmp_path / "flat.png")
    np.testing.assert_array_equal(load_image(tmp_path / "flat.png"), np.zeros((4, 4, 3), np.uint8))


def test_sixteen_bit_images_through_the_loaders(tmp_path):
    a = np.random.default_rng(2).integers(0, 65536, (6, 10)).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "xray.png")
    (tmp_path / "s.jsonl").write_text(json.dumps({"id": "x", "image_path": "xray.png", "answer": "yes"}) + "\n")
    eager = load_samples(tmp_path / "s.jsonl", load_images=True)[0].image
    lazy = load_samples(tmp_path / "s.jsonl", verify_images="decode")[0].load_image()
    np.testing.assert_array_equal(eager, _range_scaled(a))
    np.testing.assert_array_equal(lazy, _range_scaled(a))


def test_palette_grey_alpha_cmyk_and_bilevel_convert(tmp_path):
    g = np.random.default_rng(3)
    idx = g.integers(0, 4, (5, 6)).astype(np.uint8)
    palette = np.array([[10, 20, 30], [200, 0, 50], [0, 255, 0], [90, 90, 250]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.reshape(-1).tolist())
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), palette[idx])
    grey, alpha = g.integers(0, 256, (2, 5, 6)).astype(np.uint8)
    Image.fromarray(np.stack([grey, alpha], -1), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png"), np.repeat(grey[..., None], 3, 2))
    cmyk = g.integers(0, 256, (5, 6, 4)).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tiff")
    k = cmyk[..., 3:].astype(np.float64)
    ref = (255.0 - cmyk[..., :3]) * (255.0 - k) / 255.0
    assert np.abs(load_image(tmp_path / "c.tiff").astype(np.float64) - ref).max() <= 1.0
    bits = g.integers(0, 2, (5, 6)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_image(tmp_path / "b.png"), np.repeat(bits[..., None] * np.uint8(255), 3, 2))


# ------------------------------------------------------------------------------------------------
# shared data for the index cases: data/index.jsonl + data/imgs/*.png, and a tiny encoder
# ------------------------------------------------------------------------------------------------
def _captions(n=N):
    return [f"chest film case {i} shows finding {i % 3}" for i in range(n)]


def _write_records(data: Path, captions) -> Path:
    (data / "imgs").mkdir(parents=True, exist_ok=True)
    for i in range(len(captions)):
        if not (data / "imgs" / f"{i}.png").exists():
            save_png(data / "imgs" / f"{i}.png", _rgb(i))
    rows = [{"id": f"r{i}", "image_path": f"imgs/{i}.png", "text": t} for i, t in enumerate(captions)]
    (data / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data / "index.jsonl"


@pytest.fixture()
def setup(tmp_path):
    torch.manual_seed(0)
    enc = TinyCLIP.from_captions(_captions() + ["edited"], width=8, depth=1, dim=16, image_size=SIZE)
    enc.save(tmp_path / "enc")
    return tmp_path, _write_records(tmp_path / "data", _captions()), enc


# ------------------------------------------------------------------------------------------------
# 2. truncated and half-written images are bad records
# ------------------------------------------------------------------------------------------------
def test_truncated_image_is_a_bad_record_that_skip_bad_skips(setup, capsys):
    root, records, _enc = setup
    img = root / "data" / "imgs" / "2.png"
    img.write_bytes(img.read_bytes()[:-40])  # cut inside the image data: the header still reads
    base = [
        "build-index",
        "--records",
        records,
        "--encoder",
        root / "enc",
        "--batch-size",
        4,
        "--chunk-size",
        4,
        "--no-progress",
    ]
    code, _, err = _run(base + ["--out", root / "ix"], capsys)
    assert code == 2 and "index.jsonl:3: unreadable image 'imgs/2.png'" in _one_line(err) and "'r2'" in err
    code, out, err = _run(base + ["--out", root / "ix", "--skip-bad"], capsys)
    assert code == 0, err
    assert json.loads(out)["count"] == N - 1 and json.loads(out)["skipped"] == 1
    ix = Index.open(root / "ix")
    assert [r["id"] for r in ix.records()] == [f"r{i}" for i in range(N) if i != 2]  # only the bad one left out
    # headers only: the build itself meets the file, and says so in one line naming it
    code, _, err = _run(base + ["--out", root / "ix2", "--verify-images", "open"], capsys)
    assert code == 2 and "2.png: unreadable image" in _one_line(err) and "'r2'" in err
    # a record's own load_image() says the same (a DataError, never PIL's OSError)
    with pytest.raises(DataError, match=r"2\.png: unreadable image"):
        load_index_records(records, verify_images="open")[2].load_image()
    # the samples of train-* / predict are decoded at load too: --skip-bad skips the file there as well
    from jomed_fast.cli.common import load_samples_from

    (root / "data" / "s.jsonl").write_text(
        "".join(json.dumps({"id": f"s{i}", "image_path": f"imgs/{i}.png", "answer": "yes"}) + "\n" for i in range(4))
    )
    got = load_samples_from({"samples": str(root / "data" / "s.jsonl"), "skip_bad": True}, None)
    assert [s.id for s in got] == ["s0", "s1", "s3"] and got.n_skipped == 1


def test_half_written_jpeg_is_caught_at_load(tmp_path):
    Image.fromarray(_rgb(5)).save(tmp_path / "a.jpg", quality=90)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "s.jsonl").write_text(
        json.dumps({"id": "j", "image_path": "a.jpg", "answer": "no"})
        + "\n"
        + json.dumps({"id": "k", "image_path": "b.png", "answer": "no"})
        + "\n"
    )
    save_png(tmp_path / "b.png", _rgb(6))
    with pytest.raises(DataError, match=r"s\.jsonl:1: unreadable image 'a\.jpg'"):
        load_samples(tmp_path / "s.jsonl", verify_images="decode")
    got = load_samples(tmp_path / "s.jsonl", verify_images="decode", skip_bad=True)
    assert [s.id for s in got] == ["k"] and got.n_skipped == 1


# ------------------------------------------------------------------------------------------------
# 3. the build's resume is keyed by content; empty input; paths that survive a move
# ------------------------------------------------------------------------------------------------
class _Interrupt(Exception):
    pass


def _count_texts(enc, fail_at=None):
    calls = []
    orig = enc.encode_texts

    def encode_texts(texts):
        if fail_at is not None and len(calls) == fail_at:
            raise _Interrupt()
        calls.append(len(texts))
        return orig(texts)

    enc.encode_texts = encode_texts
    return calls


def test_resume_after_edited_captions_embeds_the_changed_chunks_again(setup, caplog):
    root, records, enc = setup
    opts = dict(batch_size=2, chunk_size=4, progress=False)  # 3 chunks of 4 rows, 2 encoder calls each
    _count_texts(enc, fail_at=4)  # stops at chunk 2's first batch: chunks 0 and 1 are finished
    with pytest.raises(_Interrupt):
        Index.build(load_index_records(records), enc, root / "ix", **opts)
    assert sorted(p.name for p in (root / "ix" / "chunks").glob("*.text.npy")) == ["000000.text.npy", "000001.text.npy"]
    del enc.encode_texts
    edited = _captions()
    edited[1] = "edited"  # a caption of finished chunk 0
    _write_records(root / "data", edited)
    calls = _count_texts(enc)
    with caplog.at_level(logging.WARNING, logger="jomed_fast.index.build"):
        resumed = Index.build(load_index_records(records), enc, root / "ix", **opts)
    assert sum(calls) == 8  # chunk 0 again (changed) and chunk 2 (unfinished); chunk 1 kept
    assert "chunk(s) [0] changed" in caplog.text
    del enc.encode_texts
    fresh = Index.build(load_index_records(records), enc, root / "fresh", **opts)
    assert resumed.manifest["sha256"] == fresh.manifest["sha256"]  # no old caption left anywhere
    assert [r["text"] for r in resumed.records()] == edited
    ref = enc.encode_texts(["edited"]).detach().to(torch.float16)
    assert torch.equal(torch.from_numpy(np.array(resumed.embeddings["text"][1])), ref[0])


def test_resume_refuses_another_encoder_or_chunk_size(setup):
    root, records, enc = setup
    _count_texts(enc, fail_at=1)
    with pytest.raises(_Interrupt):
        Index.build(load_index_records(records), enc, root / "ix", batch_size=2, chunk_size=4, progress=False)
    del enc.encode_texts
    with pytest.raises(ValueError, match=r"in progress .*\(chunk_size changed\)"):
        Index.build(load_index_records(records), enc, root / "ix", batch_size=2, chunk_size=6, progress=False)
    other = TinyCLIP.from_captions(["x"], width=8, depth=1, dim=16, image_size=SIZE)
    with pytest.raises(ValueError, match=r"in progress .*\(encoder changed\)"):
        Index.build(load_index_records(records), other, root / "ix", batch_size=2, chunk_size=4, progress=False)


def test_zero_records_are_refused(setup, capsys):
    root, records, enc = setup
    empty = root / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = _run(["build-index", "--records", empty, "--encoder", root / "enc", "--out", root / "ix"], capsys)
    assert code == 2 and f"--records: {empty} holds no index record" in _one_line(err)
    bad = root / "bad.jsonl"
    bad.write_text('{"id": "a", "image_path": "nope.png", "text": "x"}\n')
    code, _, err = _run(
        ["build-index", "--records", bad, "--encoder", root / "enc", "--out", root / "ix", "--skip-bad"], capsys
    )
    assert code == 2 and "holds no index record to embed (1 bad record(s) skipped)" in _one_line(err)
    with pytest.raises(ValueError, match="records: expected at least one record"):
        Index.build([], enc, root / "ix", progress=False)
    assert not (root / "ix" / "manifest.json").exists()


def test_rows_are_relative_with_sha256_and_survive_a_move(setup, capsys):
    root, records, enc = setup
    Index.build(load_index_records(records), enc, root / "ix", batch_size=4, chunk_size=4, progress=False)
    ix = Index.open(root / "ix", enc)
    rows = ix.records()
    assert rows[3]["image_path"] == "imgs/3.png" and ix.manifest["image_root"] == "../data"
    assert rows[3]["image_sha256"] == hashlib.sha256((root / "data" / "imgs" / "3.png").read_bytes()).hexdigest()
    code, out, err = _run(["verify", root / "ix"], capsys, index_main)
    assert code == 0 and json.loads(out)["images"] == {"checked": N, "unchecked": 0}

    shutil.move(root / "data", root / "moved")  # the data moves, the index stays
    code, _, err = _run(["verify", root / "ix"], capsys, index_main)
    assert code == 2 and f"{N} image(s) missing (first: row 0 ('r0')" in _one_line(err)
    code, out, _ = _run(["verify", root / "ix", "--image-root", root / "moved"], capsys, index_main)
    assert code == 0 and json.loads(out)["images"]["checked"] == N
    with pytest.raises(ValueError, match=r"row 0 \('r0'\): image .* not found .*--index-records"):
        Retrieval(Index.open(root / "ix")).candidate(0)
    moved = load_index_records(root / "moved" / "index.jsonl")
    r = Retrieval(Index.open(root / "ix"), moved)  # the records at their new place match every row
    np.testing.assert_array_equal(r.candidate(5).image, _rgb(5))

    save_png(root / "moved" / "imgs" / "7.png", _rgb(100))  # an image edited in place
    code, _, err = _run(["verify", root / "ix", "--image-root", root / "moved"], capsys, index_main)
    assert code == 2 and "1 image(s) changed since the build (first: row 7 ('r7')" in _one_line(err)
    with pytest.raises(ValueError, match=r"records: row 7 \('r7'\) has another image"):
        Retrieval(Index.open(root / "ix"), load_index_records(root / "moved" / "index.jsonl"))

    shutil.move(root / "moved", root / "data")
    with pytest.raises(ValueError, match=r"row 7 \('r7'\): image .*7\.png changed since the index was built"):
        Retrieval(Index.open(root / "ix")).candidate(7)  # the index's own rows: checked when first decoded
    save_png(root / "data" / "imgs" / "7.png", _rgb(7))
    shutil.copytree(root, root.parent / "elsewhere")  # data and index move together: still whole
    far = Retrieval(Index.open(root.parent / "elsewhere" / "ix"))
    np.testing.assert_array_equal(far.candidate(7).image, _rgb(7))
    assert far.candidate(7).text == _captions()[7]


# ------------------------------------------------------------------------------------------------
# 4. every row of --index-records is checked
# ------------------------------------------------------------------------------------------------
def test_every_row_of_the_given_records_is_checked(setup, capsys):
    root, records, enc = setup
    ix = Index.build(load_index_records(records), enc, root / "ix", batch_size=4, chunk_size=4, progress=False)
    good = load_index_records(records)
    assert [c.id for c in (Retrieval(ix, good).candidate(n) for n in range(N))] == [f"r{i}" for i in range(N)]
    swapped = list(good)
    swapped[1], swapped[2] = swapped[2], swapped[1]  # rows neither first, middle nor last
    with pytest.raises(ValueError, match=r"records: row 1 is 'r2' but the index has 'r1' there"):
        Retrieval(ix, swapped)
    recaptioned = list(good)
    recaptioned[4] = IndexRecord(id="r4", image_path=good[4].image_path, text="another caption")
    with pytest.raises(ValueError, match=r"records: row 4 \('r4'\) has the caption 'another caption'"):
        Retrieval(ix, recaptioned)
    other_image = list(good)
    other_image[9] = IndexRecord(id="r9", image_path=good[3].image_path, text=good[9].text)
    with pytest.raises(ValueError, match=r"records: row 9 \('r9'\) has another image"):
        Retrieval(ix, other_image)
    # through the CLI's loader: the same check on the records file given with --index-records
    lines = records.read_text().splitlines()
    lines[5], lines[6] = lines[6], lines[5]
    (root / "data" / "swapped.jsonl").write_text("\n".join(lines) + "\n")
    from jomed_fast.cli.common import load_retrieval_from

    with pytest.raises(ValueError, match="records: row 5 is 'r6'"):
        load_retrieval_from(
            {
                "index": str(root / "ix"),
                "encoder": str(root / "enc"),
                "trust_remote_code": False,
                "index_records": str(root / "data" / "swapped.jsonl"),
                "exclude_self": True,
                "near_duplicate": None,
            }
        )


def test_in_memory_records_are_checked_by_their_pixels(tmp_path):
    torch.manual_seed(0)
    enc = TinyCLIP.from_captions(_captions(), width=8, depth=1, dim=16, image_size=SIZE)
    recs = [IndexRecord(id=f"m{i}", image_path=None, text=t, image=_rgb(i)) for i, t in enumerate(_captions())]
    ix = Index.build(recs, enc, tmp_path / "ix", batch_size=4, chunk_size=4, progress=False)
    Retrieval(ix, recs)
    changed = list(recs)
    changed[10] = IndexRecord(id="m10", image_path=None, text=recs[10].text, image=_rgb(99))
    with pytest.raises(ValueError, match=r"records: row 10 \('m10'\) has another image .*pixels_sha256"):
        Retrieval(ix, changed)
    from jomed_fast.data import write_index_records

    write_index_records(recs, tmp_path / "w" / "index.jsonl", images_dir=tmp_path / "w" / "imgs")
    Retrieval(ix, load_index_records(tmp_path / "w" / "index.jsonl"))  # the same pixels, from PNG files


# ------------------------------------------------------------------------------------------------
# 5. distinct ids, distinct image files
# ------------------------------------------------------------------------------------------------
def test_image_file_names_are_injective_and_old_files_still_load(tmp_path):
    ids = ["case/1", "case_1", "case 1", "Case_1", "case_1.", "con", "a" * 300]
    names = [safe_filename(i) for i in ids]
    assert len({n.lower() for n in names}) == len(ids)  # distinct on case-insensitive file systems too
    assert safe_filename("case_1") == "case_1" and safe_filename("syn-idx-0000001") == "syn-idx-0000001"
    assert all(len(n) < 100 and "/" not in n for n in names)
    samples = [Sample(id=i, image_path=None, answer="yes", image=_rgb(k)) for k, i in enumerate(ids)]
    write_samples(samples, tmp_path / "s.jsonl", images_dir=tmp_path / "images")
    assert len(list((tmp_path / "images").iterdir())) == len(ids)
    back = load_samples(tmp_path / "s.jsonl", load_images=True)
    for k, s in enumerate(back):
        assert s.id == ids[k]
        np.testing.assert_array_equal(s.image, _rgb(k))  # each its own image: nothing overwritten
    # a file written under the earlier name ("case/1" -> images/case_1.png) still loads
    save_png(tmp_path / "images" / "case_1.png", _rgb(50))
    (tmp_path / "old.jsonl").write_text(
        json.dumps({"id": "case/1", "image_path": "images/case_1.png", "answer": "yes"}) + "\n"
    )
    np.testing.assert_array_equal(load_samples(tmp_path / "old.jsonl", load_images=True)[0].image, _rgb(50))


# ------------------------------------------------------------------------------------------------
# 6. an image encodes the same whatever else is in its batch
# ------------------------------------------------------------------------------------------------
def test_tiny_retriever_scales_each_image_alone():
    torch.manual_seed(0)
    enc = TinyCLIP.from_captions(["x"], width=8, depth=1, dim=16, image_size=SIZE).eval()
    dark = np.random.default_rng(0).integers(0, 2, (SIZE, SIZE, 3), dtype=np.uint8)  # pixels 0 and 1
    bright = _rgb(1)
    with torch.no_grad():
        alone = enc.encode_images([dark])
        batch = enc.encode_images([dark, bright])
        as_float = enc.encode_images([dark.astype(np.float32) / 255.0])
    torch.testing.assert_close(batch[0], alone[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(as_float, alone, atol=1e-6, rtol=0)
    x = images_to_tensor([dark])
    torch.testing.assert_close(x, torch.from_numpy(dark).permute(2, 0, 1)[None].double().div(255).float())
    with pytest.raises(ValueError, match=r"images\[0\]: expected float pixels in \[0, 1\]"):
        images_to_tensor([bright.astype(np.float32)])
    with pytest.raises(TypeError, match=r"images\[0\]: expected uint8 or float pixels, got dtype uint16"):
        images_to_tensor([dark.astype(np.uint16)])


# ------------------------------------------------------------------------------------------------
# 7. one option given twice in a YAML file
# ------------------------------------------------------------------------------------------------
def test_yaml_option_given_twice_is_an_error_naming_both(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("records: r.jsonl\nbatch_size: 8\nbatch-size: 16\n")
    code, _, err = _run(["build-index", "--config", cfg], capsys)
    assert code == 2 and str(cfg) in _one_line(err) and "'batch_size' and 'batch-size'" in err
    cfg.write_text("batch_size: 8\nchunk_size: 4\nbatch_size: 16\n")
    code, _, err = _run(["build-index", "--config", cfg], capsys)
    assert code == 2 and "key 'batch_size' given twice (lines 1 and 3)" in _one_line(err)


# ------------------------------------------------------------------------------------------------
# 8. MedMNIST limit
# ------------------------------------------------------------------------------------------------
def test_medmnist_limit_must_be_positive(tmp_path):
    from jomed_fast.data import medmnist_to_jsonl

    g = np.random.default_rng(0)
    arrays = {}
    for split, k in (("train", 5), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = g.integers(0, 256, (k, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(k) % 2)[:, None].astype(np.uint8)
    np.savez(tmp_path / "b.npz", **arrays)
    for bad in (-1, 0, 2.0, True):
        with pytest.raises(ValueError, match=f"limit: expected a positive int or None, got {bad!r}"):
            medmnist_to_jsonl(tmp_path / "b.npz", tmp_path / "out", "breast", limit=bad)
    assert not (tmp_path / "out").exists()
    out = medmnist_to_jsonl(tmp_path / "b.npz", tmp_path / "out", "breast", splits="train", limit=4)
    assert list(out) == ["train"] and len(load_samples(out["train"], "breast")) == 4
    out = medmnist_to_jsonl(tmp_path / "b.npz", tmp_path / "all", "breast")
    assert [len(load_samples(p, "breast")) for p in out.values()] == [5, 2, 3]  # None keeps every record
