r"""Offline tiny CLIP-style dual encoder (built in code) and its contrastive pre-training.

Image tower: conv stem + ``depth`` residual conv blocks -> mean pool -> linear -> ``[N, D]``.
Text tower: word-level tokenizer (built from captions) -> embedding bag (mean) -> MLP -> ``[N, D]``.
Both outputs are L2-normalised: :math:`e = f(x) / \lVert f(x) \rVert_2`.

Pre-training minimises the symmetric InfoNCE (CLIP) loss over a batch of B pairs

.. math:: S = e^{t}\, E_I E_T^\top \in \mathbb{R}^{B\times B},\qquad
          \mathcal{L} = \tfrac12\big(\mathrm{CE}(S, \mathrm{diag}) + \mathrm{CE}(S^\top, \mathrm{diag})\big)

with learnable log-temperature :math:`t` (initialised to :math:`\log(1/0.07)`, clamped at log 100).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from jomed_fast._files import replace_dir_atomically
from jomed_fast._manifest import CorruptFile

_WORD = re.compile(r"[a-z0-9]+")


def tokenize_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class TinyConfig:
    image_size: int = 32
    width: int = 32
    depth: int = 4
    dim: int = 64
    vocab: list = field(default_factory=lambda: ["<unk>"])
    max_words: int = 32


class _Block(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.conv = nn.Conv2d(w, w, 3, padding=1)
        self.norm = nn.GroupNorm(4, w)

    def forward(self, x):
        return x + F.gelu(self.norm(self.conv(x)))


class TinyImageTower(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, cfg.width, 3, stride=2, padding=1), nn.GELU())
        self.layers = nn.ModuleList([_Block(cfg.width) for _ in range(cfg.depth)])
        self.proj = nn.Linear(cfg.width, cfg.dim)

    def forward(self, x):  # x [N, 3, H, W] float in [0, 1]
        h = self.stem(x * 2 - 1)
        for layer in self.layers:
            h = layer(h)
        return self.proj(h.mean((2, 3)))


class TinyTextTower(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.emb = nn.EmbeddingBag(len(cfg.vocab), cfg.dim * 2, mode="mean")
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(cfg.dim * 2, cfg.dim))

    def forward(self, ids, offsets):
        return self.mlp(self.emb(ids, offsets))


def images_to_tensor(images) -> torch.Tensor:
    """``[N, H, W, 3]`` images (an array or a list of arrays; grey ``[H, W]`` allowed) -> float
    ``[N, 3, H, W]`` in [0, 1].

    Each image is scaled by its own dtype, never by the batch's values, so an image encodes the same
    alone or beside any others: uint8 pixels are divided by 255, float pixels are taken as already in
    [0, 1] (checked). Any other dtype is refused (a uint16 array has no agreed 8-bit scale:
    ``jomed_fast.data.io.high_bit_to_uint8`` makes one).
    """
    arrs = []
    for i, im in enumerate(images):
        a = np.asarray(im)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, -1)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"images[{i}]: expected [H, W, 3] or [H, W], got shape {a.shape}")
        if a.dtype == np.uint8:
            a = a.astype(np.float32) / 255.0
        elif np.issubdtype(a.dtype, np.floating):
            if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
                raise ValueError(
                    f"images[{i}]: expected float pixels in [0, 1] (or uint8 in 0..255), got "
                    f"values in [{np.nanmin(a):g}, {np.nanmax(a):g}]"
                )
            a = a.astype(np.float32)
        else:
            raise TypeError(f"images[{i}]: expected uint8 or float pixels, got dtype {a.dtype}")
        arrs.append(a)
    if not arrs:
        raise ValueError("images: expected at least one image, got none")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


class TinyCLIP(nn.Module):
    """Tiny dual encoder; ``encode_images`` / ``encode_texts`` return L2-normalised ``[N, D]``."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.config = cfg
        self.vision = TinyImageTower(cfg)
        self.text = TinyTextTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._w2i = {w: i for i, w in enumerate(cfg.vocab)}

    @classmethod
    def from_captions(cls, captions: Sequence[str], seed: int = 0, **kw) -> "TinyCLIP":
        vocab = ["<unk>"] + sorted({w for c in captions for w in tokenize_words(c)})
        torch.manual_seed(seed)
        return cls(TinyConfig(vocab=vocab, **kw))

    @property
    def dim(self) -> int:
        return self.config.dim

    def image_layers(self) -> list[nn.Module]:
        """The image tower's blocks, in order (what :class:`QueryEncoder` unfreezes from the end)."""
        return list(self.vision.layers)

    def image_head_modules(self) -> list[nn.Module]:
        """What follows the blocks (the projection to the joint space): trained with them, as the
        HF encoder's post-layernorm and visual projection are."""
        return [self.vision.proj]

    def _text_batch(self, texts):
        ids, offs = [], []
        for t in texts:
            offs.append(len(ids))
            w = tokenize_words(t)[: self.config.max_words] or ["<unk>"]
            ids.extend(self._w2i.get(x, 0) for x in w)
        dev = self.logit_scale.device
        return torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(offs, dtype=torch.long, device=dev)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision(x), dim=-1)

    def encode_images(self, images) -> torch.Tensor:
        x = images if isinstance(images, torch.Tensor) else images_to_tensor(images)
        return self.image_features(x.to(self.logit_scale.device))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got a single str")
        return F.normalize(self.text(*self._text_batch(texts)), dim=-1)

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()

    def save(self, out_dir) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (and their manifest) as one directory, atomically."""
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

        def fill(tmp: Path) -> None:
            (tmp / "config.json").write_text(json.dumps(asdict(self.config)))
            save_file(sd, str(tmp / "model.safetensors"))

        return replace_dir_atomically(out_dir, fill)

    @classmethod
    def load(cls, path) -> "TinyCLIP":
        p = Path(path)
        for f in ("config.json", "model.safetensors"):
            if not (p / f).is_file():
                raise ValueError(f"path: {p / f} not found (expected a TinyCLIP directory)")
        m = cls(TinyConfig(**json.loads((p / "config.json").read_text())))
        try:
            state = load_file(str(p / "model.safetensors"))
        except SafetensorError as exc:
            raise CorruptFile(f"path: {p / 'model.safetensors'} is unreadable ({exc}): truncated or damaged") from exc
        m.load_state_dict(state)
        return m.eval()


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over ``[B, D]`` normalised embeddings (see module docstring)."""
    s = logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T
    y = torch.arange(s.shape[0], device=s.device)
    return 0.5 * (F.cross_entropy(s, y) + F.cross_entropy(s.T, y))


def pretrain(
    model: TinyCLIP,
    images,
    captions: Sequence[str],
    *,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Contrastive (CLIP) pre-training on N (image, caption) pairs; returns per-step losses. A
    batch holds ``min(batch_size, N)`` pairs (N < batch_size: one whole-set batch per epoch)."""
    x = images if isinstance(images, torch.Tensor) else images_to_tensor(images)
    if len(x) != len(captions):
        raise ValueError(f"captions: expected {len(x)} captions (one per image), got {len(captions)}")
    if len(x) < 2:
        raise ValueError(f"images: contrastive pre-training needs at least 2 pairs, got {len(x)}")
    batch_size = min(batch_size, len(x))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    losses = []
    steps = epochs * max(1, len(x) // batch_size)
    with tqdm(total=steps, desc="clip pretrain", disable=not progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for s in range(0, len(x) - batch_size + 1, batch_size):
                b = perm[s : s + batch_size]
                loss = clip_loss(
                    model.image_features(x[b]), model.encode_texts([captions[i] for i in b]), model.logit_scale
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def recall_at_k(model, images, captions: Sequence[str], k: int = 10) -> float:
    """Image->caption recall@k: fraction of images whose own caption is in the top k (ties by text)."""
    ei = model.encode_images(images)
    et = model.encode_texts(list(captions))
    s = ei @ et.T
    # a caption string equal to the true one counts as a hit (captions repeat in synthetic data)
    top = s.topk(k, dim=1).indices
    hits = [any(captions[j] == captions[i] for j in top[i].tolist()) for i in range(len(captions))]
    return float(np.mean(hits))
