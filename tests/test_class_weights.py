"""Stage 1 for imbalanced tasks: the class-weighted answer loss against a float64 computation over
the unmodified Hugging Face model's logits (weighted NLL over the class-restricted log-probs), its
gradients, the inverse-frequency weights against scikit-learn's ``balanced``, the options' checks,
and checkpoint selection by macro-F1 (scikit-learn's ``f1_score``) and accuracy."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from sklearn.utils.class_weight import compute_class_weight

from jomed_fast.data.synthetic import generate
from jomed_fast.readers import IGNORE_INDEX, load_reader, tiny
from jomed_fast.scoring import CandidateScorer
from jomed_fast.train.checkpoint import load_weights
from jomed_fast.train.class_weights import class_weight_vector, restricted_answer_nll
from jomed_fast.train.loop import RunState
from jomed_fast.train.reader import ReaderTrainConfig, _ReaderStage, train_reader, validation_predictions
from jomed_fast.train.reader_data import ExampleSet

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


# validation classes of different sizes, so that predictions of different classes score differently
VAL_COUNTS = (1, 4, 2, 1, 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ds = generate(n_train=12, n_val=40, n_test=0, index_size=4, seed=2)
    val = [s for c, n in enumerate(VAL_COUNTS) for s in [s for s in ds.val if s.label == c][:n]]
    assert [sum(s.label == c for s in val) for c in range(5)] == list(VAL_COUNTS)
    ds.val = val
    return ds, tiny.build("qwen2_vl", tmp_path_factory.mktemp("reader") / "qwen2_vl")


def _reader(path, seed=0):
    torch.manual_seed(seed)
    reader = load_reader(path, quantization=None, lora=True, device="cpu")
    with torch.no_grad():  # a fresh adapter has B = 0: give it weights so every LoRA matrix gets gradients
        for name, p in reader.lora_parameters().items():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return reader.train()


def _reference_nll(reader, batch, allowed) -> torch.Tensor:
    """Per row, float64: minus the sum over supervised positions of the log-softmax over the allowed
    tokens of the unmodified HF model's logits, at the position that predicts each token."""
    logits = reader.model(**batch, use_cache=False).logits.double()  # [B, L, V]
    labels = batch["labels"]
    out = []
    for b in range(labels.shape[0]):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            restricted = torch.log_softmax(logits[b, t, allowed], dim=-1)
            total = total - restricted[allowed.tolist().index(y)]
        out.append(total)
    return torch.stack(out)


def test_weighted_loss_and_gradients_match_a_float64_reference(setup):
    ds, path = setup
    reader = _reader(path)
    config = ReaderTrainConfig(batch_size=2, grad_accum=2, class_weights="1,3,0.5,2,1.5", layout="paper")
    train = ExampleSet(ds.train, ds.task, "paper")
    weights = class_weight_vector(config.class_weights, [s.label for s in ds.train], ds.task.num_classes)
    stage = _ReaderStage(config, reader, ds.task, train, ExampleSet(ds.val, ds.task, "paper"), weights)
    allowed = stage.allowed
    batches = [[0, 5], [2, 9]]  # a step of two micro-batches of different classes
    loss = stage.step_loss(batches, RunState())
    ours = {k: p.grad.clone() for k, p in reader.lora_parameters().items()}
    reader.model.zero_grad(set_to_none=True)

    ids = [j for b in batches for j in b]
    batch = train.encode(reader, ids)
    ref_rows = _reference_nll(reader, batch, allowed)
    w = weights[[ds.train[j].label for j in ids]]
    ref = (w * ref_rows).sum() / w.sum()
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), abs=1e-5)
    for k, p in reader.lora_parameters().items():
        torch.testing.assert_close(ours[k].double(), p.grad.double(), atol=1e-6, rtol=1e-4)
    assert len({ds.train[j].label for j in ids}) > 1 and sum(float(g.abs().sum()) for g in ours.values()) > 0
    with torch.no_grad():  # the per-row values themselves
        got = restricted_answer_nll(reader, batch, allowed).double()
    torch.testing.assert_close(got, ref_rows.detach(), atol=1e-5, rtol=1e-5)


def test_inverse_frequency_is_scikit_learns_balanced_weights():
    labels = [0] * 7 + [1] * 2 + [2] * 4
    got = class_weight_vector("inverse-frequency", labels, 3)
    want = compute_class_weight("balanced", classes=np.arange(3), y=np.array(labels))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match=r"class_weights: inverse-frequency needs every class .* \[3\] have none"):
        class_weight_vector("inverse-frequency", labels, 4)
    with pytest.raises(ValueError, match=r"config.class_weights: expected 3 weights \(one per class\), got 2"):
        class_weight_vector("1,2", labels, 3)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"class_weights": "1,-2"}, r"config.class_weights: expected 'inverse-frequency' or one positive number"),
        ({"class_weights": "1,x"}, r"config.class_weights: expected .* got '1,x'"),
        ({"class_weights": "1"}, r"config.class_weights: expected .* \(at least 2"),
        ({"class_weights": "1,inf"}, r"config.class_weights"),
        ({"select_by": "f1"}, r"config.select_by: expected one of \('val_loss', 'macro_f1', 'accuracy'\)"),
    ],
)
def test_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        ReaderTrainConfig(**options)


def test_weights_per_class_are_counted_against_the_task(setup, tmp_path):
    ds, path = setup
    config = ReaderTrainConfig(max_steps=1, class_weights="1,2,3")
    with pytest.raises(ValueError, match=r"config.class_weights: expected 5 weights \(one per class\), got 3"):
        train_reader(config, _reader(path), ds.task, ds.train, ds.val, tmp_path / "run", progress=False)


def _macro_f1(preds, golds, c):
    return f1_score(golds, preds, average="macro", labels=list(range(c)), zero_division=0)


@pytest.mark.parametrize("select_by", ["macro_f1", "accuracy"])
def test_selection_keeps_the_best_class_metric(setup, tmp_path, select_by):
    ds, path = setup
    reader = _reader(path)
    config = ReaderTrainConfig(
        lr=5e-2,
        batch_size=4,
        epochs=2,
        max_steps=4,
        eval_every=1,
        save_every=4,
        select_by=select_by,
        class_weights="inverse-frequency",
        gradient_checkpointing=False,
    )
    res = train_reader(config, reader, ds.task, ds.train, ds.val, tmp_path / "run", progress=False)
    golds = [s.label for s in ds.val]
    c = ds.task.num_classes
    assert [s for s, _ in res.val_metrics] == [0, 1, 2, 3, 4]
    values = []
    for _, m in res.val_metrics:
        assert m["macro_f1"] == pytest.approx(_macro_f1(m["predictions"], golds, c))
        assert m["accuracy"] == pytest.approx(accuracy_score(golds, m["predictions"]))
        values.append(m[select_by])
    assert len(set(values)) > 1, values  # training moves the metric, so the choice means something
    best = int(np.argmax(values))  # the earliest of the highest
    assert res.best_step == res.val_metrics[best][0] and res.best_value == pytest.approx(values[best])
    assert res.best_val_loss == pytest.approx(res.val_metrics[best][1]["val_loss"])
    assert res.select_by == select_by and res.class_weights == pytest.approx(
        compute_class_weight("balanced", classes=np.arange(c), y=np.array([s.label for s in ds.train])).tolist()
    )
    # the logged predictions are the model's: the final weights and the best checkpoint's, rescored
    val = ExampleSet(ds.val, ds.task, "paper")
    scorer = CandidateScorer(reader, ds.task, "paper")
    assert validation_predictions(scorer, val, 3) == res.val_metrics[-1][1]["predictions"]
    saved = load_weights(tmp_path / "run" / "checkpoints" / "best")
    with torch.no_grad():
        for k, p in reader.trainable_parameters().items():
            p.copy_(saved[k])
    assert validation_predictions(scorer, val, 3) == res.val_metrics[best][1]["predictions"]
    written = json.loads((tmp_path / "run" / "result.json").read_text())
    assert written["best_step"] == res.best_step and written["select_by"] == select_by
    identity = json.loads((tmp_path / "run" / "identity.json").read_text())
    assert json.dumps(identity).count("inverse-frequency") == 1 and select_by in json.dumps(identity)
