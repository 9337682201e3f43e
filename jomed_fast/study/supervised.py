r"""Supervised image classifiers beside the retrieval systems: what the study's labelled images
give without any reader or retrieval.

Both train on every labelled image the pipeline sees, the training queries and the index records
(together the official training split), choose their setting on the validation queries by
macro-F1 (ties: accuracy, then the earlier candidate), and answer the test queries:

* ``pixel_logreg``: multinomial logistic regression (scikit-learn, lbfgs) on the standardised
  pixels :math:`x = (p - \mu) / \sigma` per pixel and channel (:math:`\mu, \sigma` of the training
  images), over :math:`C \in \{0.001, 0.01, 0.1, 1\}` and class weights none / balanced;
* ``small_cnn``: two 3×3 convolutions (16 and 32 channels, ReLU, 2×2 max-pooling) and a linear
  layer, Adam (lr 1e-3, batch 64) on the class-weighted cross-entropy (weights
  :math:`w_c = N / (C n_c)`, the stage-1 reader's ``inverse-frequency``), the epoch of ``epochs``
  kept whose validation macro-F1 is highest. Seeded: the same seed gives the same weights.

Single-label tasks only (both studies' tasks are).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .._extras import require

__all__ = ["LOGREG_GRID", "images_array", "pixel_logreg", "small_cnn"]

LOGREG_GRID = tuple((c, w) for c in (0.001, 0.01, 0.1, 1.0) for w in (None, "balanced"))


def images_array(images: Sequence[np.ndarray]) -> np.ndarray:
    """``[N, 3, H, W]`` float32 in [0, 1] of ``[H, W, 3]`` (or grey ``[H, W]``) uint8 images."""
    out = []
    for i, im in enumerate(images):
        a = np.asarray(im)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, -1)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"images[{i}]: expected [H, W, 3] uint8, got {a.dtype} {a.shape}")
        out.append(a.transpose(2, 0, 1).astype(np.float32) / 255.0)
    return np.stack(out)


def _sklearn(name: str):
    return require(f"sklearn.{name}", ("study",), "the study's supervised baselines")


def _score(y: np.ndarray, pred: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(macro-F1 over the C classes, accuracy): what picks a setting."""
    metrics = _sklearn("metrics")
    f1 = metrics.f1_score(y, pred, labels=list(range(num_classes)), average="macro", zero_division=0)
    return float(f1), float(metrics.accuracy_score(y, pred))


def _check(y: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(f"{name}: expected [N] class indices in 0..{num_classes - 1}, got {y.dtype} {y.shape}")
    return y.astype(np.int64)


def pixel_logreg(train_x, train_y, val_x, val_y, test_x, num_classes: int, seed: int = 0) -> dict:
    """``{"test": [N_test] predictions, "selected": {"C", "class_weight"}, "val": (macro-F1, acc)}``."""
    train_y, val_y = _check(train_y, num_classes, "train_y"), _check(val_y, num_classes, "val_y")
    flat = [np.asarray(x, np.float64).reshape(len(x), -1) for x in (train_x, val_x, test_x)]
    mu, sd = flat[0].mean(0), flat[0].std(0) + 1e-6
    tr, va, te = ((x - mu) / sd for x in flat)
    linear, exceptions = _sklearn("linear_model"), _sklearn("exceptions")
    best = None
    for c, weight in LOGREG_GRID:
        model = linear.LogisticRegression(C=c, class_weight=weight, max_iter=500, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", exceptions.ConvergenceWarning)
            model.fit(tr, train_y)
        score = _score(val_y, model.predict(va), num_classes)
        if best is None or score > best[0]:
            best = (score, c, weight, model)
    assert best is not None
    score, c, weight, model = best
    return {"test": model.predict(te).astype(np.int64), "selected": {"C": c, "class_weight": weight}, "val": score}


class SmallCNN(torch.nn.Module):
    def __init__(self, num_classes: int, side: int):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Linear(32 * (side // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, 3, H, W] in [0, 1]
        return self.head(self.features(x * 2 - 1).flatten(1))


def small_cnn(
    train_x, train_y, val_x, val_y, test_x, num_classes: int, *, epochs: int = 30, seed: int = 0, batch_size: int = 64
) -> dict:
    """``{"test": predictions, "selected": {"epoch"}, "val": (macro-F1, acc)}`` (module docstring)."""
    if epochs < 1:
        raise ValueError(f"epochs: expected >= 1, got {epochs}")
    train_y, val_y = _check(train_y, num_classes, "train_y"), _check(val_y, num_classes, "val_y")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = torch.as_tensor(np.asarray(train_x, np.float32)), torch.as_tensor(train_y)
    vx, tx = (torch.as_tensor(np.asarray(a, np.float32)) for a in (val_x, test_x))
    model = SmallCNN(num_classes, int(x.shape[-1]))
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1).double()
    loss_fn = torch.nn.CrossEntropyLoss(weight=(len(y) / (num_classes * counts)).float())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    best: tuple | None = None
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            score = _score(val_y, model(vx).argmax(1).numpy(), num_classes)
            if best is None or score > best[0]:
                best = (score, epoch, model(tx).argmax(1).numpy().astype(np.int64))
    assert best is not None
    return {"test": best[2], "selected": {"epoch": best[1]}, "val": best[0]}
