"""Multi-label tasks: the reader's answer is a set of labels.

Exactness: the label-set head's answer-set log-probabilities and per-label marginals against a
brute-force enumeration — every answer of the language as its own token sequence, appended to
the full prompt and run alone through the *unmodified* Hugging Face model, each step's softmax
taken (in float64) over the tokens that continue some answer of the language, found by scanning
all the answers' sequences. Then the pipeline: a synthetic task whose correct sets (of two and
three labels) are known, fused and thresholded, its metrics and oracle; stage 2's gold target.
"""

import itertools
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from jomed_fast import prompts
from jomed_fast.readers import load_reader, tiny
from jomed_fast.scoring import Candidate, CandidateScorer
from jomed_fast.scoring.label_set_head import LabelSetHead
from jomed_fast.tasks import Task

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
# "1" is a prefix of "10": the trie shares it, and the end token tells them apart
TASK = Task(
    name="findings",
    kind="multilabel",
    labels=("0", "1", "2", "10"),
    label_names=("normal", "cyst", "mass", "calcification"),
    question="Select all findings you see from the given labels",
    instructions="Provide answer according to the labels:\n0 - 'normal'\n1 - 'cyst'\n2 - 'mass'\n10 - 'calcification'\n\n",
)


def _image(h, w, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel")
    out = {}
    for arch in tiny.ARCHS:
        path = tiny.build(arch, root / arch)
        reader = load_reader(path, device="cpu")
        reader.model.requires_grad_(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = tiny.model_class(arch).from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        out[arch] = (reader, hf)
    return out


@torch.no_grad()
def brute_force_set_log_probs(hf, processor, task, layout, qimg, cand, verbalizer, sets):
    """``log p(S)`` per answer ``S`` (float64): each answer's tokens after the full prompt, one HF
    forward per answer, each step normalised over the continuations the language allows there."""
    messages, images = prompts.build_messages(layout, task, qimg, None, cand)
    enc = processor.encode(images, messages)
    P = enc["input_ids"].shape[1]
    seqs = [verbalizer.target_ids(list(s)) for s in sets]
    out = []
    for seq in seqs:
        e = dict(enc)
        e["input_ids"] = torch.cat([enc["input_ids"], torch.tensor([seq])], 1)
        e["attention_mask"] = torch.ones_like(e["input_ids"])
        if "mm_token_type_ids" in enc:
            zeros = torch.zeros(1, len(seq), dtype=enc["mm_token_type_ids"].dtype)
            e["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], zeros], 1)
        logits = hf(**e, use_cache=False).logits[0, P - 1 : P - 1 + len(seq)].double()
        total = 0.0
        for t, tok in enumerate(seq):
            nxt = sorted({o[t] for o in seqs if len(o) > t and o[:t] == seq[:t]})
            total += float(logits[t, tok] - logits[t, nxt].logsumexp(0))
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("max_labels", [None, 2], ids=["all_sets", "at_most_2"])
@pytest.mark.parametrize("layout", prompts.LAYOUTS)
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_label_marginals_equal_brute_force_enumeration(models, arch, layout, max_labels):
    reader, hf = models[arch]
    scorer = CandidateScorer(reader, TASK, layout, max_labels=max_labels)
    head = scorer.head
    assert isinstance(head, LabelSetHead) and head.mode == "label_sets"
    sets = list(itertools.chain.from_iterable(itertools.combinations(range(4), m) for m in range(1, 5)))
    if max_labels is not None:
        sets = [s for s in sets if len(s) <= max_labels]
    assert [tuple(s) for s in head.sets] == sets
    qimgs = [_image(42, 42, 1), _image(48, 36, 2)]
    cands = [
        [Candidate(_image(28, 28, 10), "a small round cyst"), Candidate(None, "irregular mass")],
        [Candidate(_image(42, 28, 11), "punctate echogenic foci"), Candidate(_image(28, 42, 12), "")],
    ]
    set_lp = scorer.score(qimgs, None, cands, label_sets=True)
    marg = scorer.score(qimgs, None, cands)
    assert set_lp.shape == (2, 2, len(sets)) and marg.shape == (2, 2, 4)
    for b in range(2):
        for k in range(2):
            want = brute_force_set_log_probs(
                hf, reader.processor, TASK, layout, qimgs[b], cands[b][k], scorer.verbalizer, sets
            )
            torch.testing.assert_close(set_lp[b, k].double(), want, atol=ATOL, rtol=0)
            p = want.exp()
            # a distribution over the answers (each HF forward rounds its own fp32 logits)
            assert float(p.sum()) == pytest.approx(1.0, abs=1e-6)
            want_marg = torch.stack([p[[i for i, s in enumerate(sets) if c in s]].sum() for c in range(4)])
            torch.testing.assert_close(marg[b, k].double().exp(), want_marg, atol=ATOL, rtol=0)
            # marginals are not a softmax over the labels: they sum to the expected number of labels
            expected_size = float((p * torch.tensor([len(s) for s in sets], dtype=torch.float64)).sum())
            assert float(marg[b, k].double().exp().sum()) == pytest.approx(expected_size, abs=1e-4)
            assert expected_size > 1.0
