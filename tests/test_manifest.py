"""Model directories the project writes carry a manifest (sha256 per file) that every loader checks:
one flipped bit in an adapter, a checkpoint's weights or Adam state, or an encoder is a one-line
error naming the file; a lost ``LATEST`` resumes from the newest whole step checkpoint."""

import hashlib
import json

import pytest
import torch

from jomed_fast import _manifest
from jomed_fast._files import replace_dir_atomically
from jomed_fast._manifest import MANIFEST, CorruptFile, directory_digest, verify_dir
from jomed_fast.readers import load_reader, tiny
from jomed_fast.retriever import TinyCLIP, load_encoder
from jomed_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def _flip_bit(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


def _fill(tmp):
    (tmp / "a.bin").write_bytes(bytes(range(256)) * 4)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.json").write_text('{"x": 1}')


def test_directories_carry_a_manifest_of_every_file(tmp_path):
    out = replace_dir_atomically(tmp_path / "d", _fill)
    manifest = json.loads((out / MANIFEST).read_text())
    want = {
        rel: {"size": (out / rel).stat().st_size, "sha256": hashlib.sha256((out / rel).read_bytes()).hexdigest()}
        for rel in ("a.bin", "sub/b.json")
    }
    assert manifest == {"format": "jomed-manifest-v1", "files": want}
    assert verify_dir(out) == manifest
    # the digest is the content's: the same files elsewhere give the same digest, other files another
    again = replace_dir_atomically(tmp_path / "elsewhere", _fill)
    assert directory_digest(again) == directory_digest(out)
    (again / "sub" / "b.json").write_text('{"x": 2}')
    with pytest.raises(CorruptFile):
        directory_digest(again)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _flip_bit(d / "a.bin"), r"a.bin: sha256 differs from its manifest's"),
        (
            lambda d: (d / "a.bin").write_bytes((d / "a.bin").read_bytes()[:100]),
            r"a.bin: 100 bytes, its manifest says 1024",
        ),
        (lambda d: (d / "sub" / "b.json").unlink(), r"b.json: listed in .* but missing"),
        (lambda d: (d / MANIFEST).write_text("{not json"), r"unreadable manifest"),
    ],
)
def test_a_damaged_directory_is_a_one_line_error_naming_the_file(tmp_path, damage, message):
    _manifest._clear_memo()
    out = replace_dir_atomically(tmp_path / "d", _fill)
    damage(out)
    with pytest.raises(CorruptFile, match=message) as info:
        verify_dir(out)
    assert "\n" not in str(info.value)


def test_without_a_manifest_only_required_verification_fails(tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "w.bin").write_bytes(b"x")
    assert verify_dir(tmp_path / "hub") is None
    with pytest.raises(CorruptFile, match="has no jomed_manifest.json"):
        verify_dir(tmp_path / "hub", required=True)


def test_flipped_bit_in_an_adapter_or_a_reader_is_refused(tmp_path):
    ckpt = tiny.build("qwen2_vl", tmp_path / "reader")
    reader = load_reader(ckpt, lora=True, device="cpu")
    with torch.no_grad():
        for p in reader.lora_parameters().values():
            p.normal_(0, 0.05)
    adapter = reader.save_adapter(tmp_path / "adapter")
    load_reader(ckpt, lora=adapter, device="cpu")  # whole: loads
    _flip_bit(adapter / "adapter_model.safetensors", offset=-8)
    with pytest.raises(CorruptFile, match=r"adapter_model.safetensors: sha256 differs"):
        load_reader(ckpt, lora=adapter, device="cpu")
    _flip_bit(ckpt / "model.safetensors", offset=-8)
    with pytest.raises(CorruptFile, match=r"model.safetensors: sha256 differs"):
        load_reader(ckpt, device="cpu")


def test_flipped_bit_in_an_encoder_is_refused(tmp_path):
    torch.manual_seed(0)
    enc = TinyCLIP.from_captions(["a small cyst", "a large mass"], width=8, depth=1, dim=16)
    out = enc.save(tmp_path / "enc")
    assert load_encoder(out).fingerprint() == enc.fingerprint()
    _flip_bit(out / "model.safetensors", offset=-4)
    with pytest.raises(CorruptFile, match="model.safetensors: sha256 differs"):
        load_encoder(out)


def _state(seed):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.randn(4, 3)
    opt.step()
    return {"w": w}, opt


@pytest.mark.parametrize("name", ["weights.safetensors", "state.safetensors", "state.json"])
def test_flipped_bit_in_a_training_checkpoint_is_refused(tmp_path, name):
    params, opt = _state(0)
    path = save_checkpoint(tmp_path, 5, params=params, optimizer=opt)
    _flip_bit(path / name, offset=-3 if name != "state.json" else 2)
    with pytest.raises(CorruptFile, match=rf"{name}: sha256 differs"):
        load_checkpoint(path, params=_state(1)[0], optimizer=_state(1)[1])


def test_without_latest_the_newest_whole_step_checkpoint_resumes(tmp_path):
    params, opt = _state(0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, params=params, optimizer=opt, keep=3)
    root = tmp_path / "checkpoints"
    (root / "LATEST").unlink()
    assert latest_checkpoint(tmp_path) == root / "step-00000003"
    _flip_bit(root / "step-00000003" / "weights.safetensors", offset=-3)  # damaged: the one before
    assert latest_checkpoint(tmp_path) == root / "step-00000002"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_records_digest_follows_content_not_paths(tmp_path):
    import shutil

    import numpy as np

    from jomed_fast.data import IndexRecord, Sample, records_digest, save_png

    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    a, b = tmp_path / "a.png", tmp_path / "moved" / "b.png"
    save_png(a, img)
    b.parent.mkdir()
    shutil.copy(a, b)
    base = [Sample("s1", str(a), "1", label=1), IndexRecord("r1", str(a), "a cyst")]
    assert records_digest(base) == records_digest(
        [Sample("s1", str(b), "1", label=1), IndexRecord("r1", str(b), "a cyst")]
    )
    changed = [
        [Sample("s1", str(a), "2", label=2), base[1]],  # relabelled
        [Sample("s2", str(a), "1", label=1), base[1]],  # another id
        [base[0], IndexRecord("r1", str(a), "a mass")],  # another caption
        [base[1], base[0]],  # another order
        [Sample("s1", None, "1", label=1, image=img[::-1].copy()), base[1]],  # another image
    ]
    digests = {records_digest(c) for c in changed}
    assert len(digests) == len(changed) and records_digest(base) not in digests
