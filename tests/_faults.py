"""What the fault tests share: a tiny reader, retriever, index and synthetic split built once per
module, the predict command line over them, and checks of the CLI's one-line errors (the CLI tests
build their own workspaces with ``workspace``)."""

import hashlib
import json

import pytest
import torch

from jomed_fast.cli import main
from jomed_fast.data.synthetic import generate, write_synthetic
from jomed_fast.readers import tiny
from jomed_fast.retriever import TinyCLIP

N_TEST, N_INDEX = 6, 40


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def workspace(root, *, n_train=2, n_val=2, n_test=N_TEST, index_size=N_INDEX):
    """A synthetic split written under ``root/data`` and a tiny CLIP retriever pre-seeded on its captions
    (``root/encoder``): what every CLI test starts from. Returns the data folder."""
    data = write_synthetic(
        generate(n_train=n_train, n_val=n_val, n_test=n_test, index_size=index_size, image_size=32), root / "data"
    )
    captions = [json.loads(line)["text"] for line in (data / "index.jsonl").read_text().splitlines()]
    torch.manual_seed(0)
    TinyCLIP.from_captions(captions, width=8, depth=1, dim=32).save(root / "encoder")
    return data


def build_index(root, data) -> None:
    assert (
        main(
            [
                "build-index",
                "--records",
                str(data / "index.jsonl"),
                "--encoder",
                str(root / "encoder"),
                "--out",
                str(root / "ix"),
                "--no-progress",
            ]
        )
        == 0
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = workspace(root)
    reader = tiny.build("qwen2_vl", root / "reader")
    build_index(root, data)
    return root, data, reader


def base_args(files, out, *extra):
    root, data, reader = files
    return [
        "predict",
        "--reader",
        reader,
        "--samples",
        data / "test.jsonl",
        "--index",
        root / "ix",
        "--index-records",
        data / "index.jsonl",
        "--encoder",
        root / "encoder",
        "--k-text",
        1,
        "--k-image",
        1,
        "--batch-size",
        2,
        "--no-progress",
        "--out",
        out,
        *extra,
    ]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    """Exit 2 and one error line (the last on stderr: loading a reader draws Hugging Face's progress bar)."""
    errors = [line for line in err.splitlines() if line.startswith("jomed-fast ")]
    assert code == 2 and len(errors) == 1 and err.endswith(errors[0] + "\n") and ": error: " in errors[0], err
    for n in needles:
        assert n in errors[0], err


def inputs_digest(files) -> dict:
    root, data, _ = files
    return {p: sha(p) for p in (data / "test.jsonl", data / "index.jsonl", root / "ix" / "records.jsonl")}


@pytest.fixture(scope="module")
def full_run(files, tmp_path_factory):
    """One uninterrupted CLI run: (out path, its bytes)."""
    out = tmp_path_factory.mktemp("full") / "p.jsonl"
    assert main([str(a) for a in base_args(files, out)]) == 0
    return out, out.read_bytes()


def assert_same_predictions(got, want):
    """Equal records but for float rounding (a batch of another size pads the prompts otherwise)."""
    assert [r.query_id for r in got] == [r.query_id for r in want]
    for g, w in zip(got, want):
        assert (g.gold, g.kind, g.fused) == (w.gold, w.kind, w.fused)
        assert [(c.id, c.head, c.prediction) for c in g.candidates] == [
            (c.id, c.head, c.prediction) for c in w.candidates
        ]
        torch.testing.assert_close(
            torch.tensor([c.probs for c in g.candidates]),
            torch.tensor([c.probs for c in w.candidates]),
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(torch.tensor(g.fused_probs), torch.tensor(w.fused_probs), atol=1e-5, rtol=0)
