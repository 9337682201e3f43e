r"""The LVLM reranker's prompt (the paper's o3 study, Listing 1) and the parser of its reply.

The paper gives an LVLM the query image, the task's label list and the K = 4 retrieved
(caption, image) pairs, asks for the single candidate most informative for classifying the image,
and reads the answer as ``Caption Number: <n>``; a variant shows the captions only. PAPER.md holds
that digest of Listing 1, not its full text: the wording below keeps every instruction the digest
names, in its words, and adds only the numbering the answer refers to::

    [instruction] You are given a medical image to classify, the labels it can take, and K
    candidates retrieved for it, each a caption with its image (variant: a caption).
    Labels:
    0 - 'Benign'  ...                        (the task's legend, or its labels one per line)
    Image to classify: [query image]
    Caption 1: {caption_1} [image_1]   ...   Caption K: {caption_K} [image_K]
    Select the single candidate most informative for classifying the image.
    Output: Caption Number: <n>

The selected candidate's prediction is the reranker's answer (:mod:`.lvlm_rerank`).

Parsing (:func:`parse_choice`), in order, case-insensitive, markdown emphasis ignored:

1. ``Caption Number: n`` (also ``Caption No. n``, ``Caption #n``, ``Caption Number n``, a number
   word ``one`` … ``ten``): the *last* such statement counts (a model that reasons first states
   its answer last);
2. else a reply that is only a number (``"3"``, ``"3."``, ``"**3**"``);
3. else ``Caption n`` mentions naming exactly one distinct number.

A number outside ``1..K``, several distinct ``Caption n`` mentions, or none of the above is a
reply that names no valid candidate: ``Choice(None, reason)``, never mapped to a candidate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Choice", "Part", "parse_choice", "rerank_prompt"]

Part = tuple[str, Any]  # ("text", str) or ("image", an image)

INSTRUCTION = (
    "You are given a medical image to classify, the labels it can take, and {k} candidates retrieved for it, {what}."
)
SELECT = "Select the single candidate most informative for classifying the image."
OUTPUT = "Output: Caption Number: <n>"


def _labels(task) -> str:
    if not task.has_label_set:
        raise ValueError(f"task: the LVLM reranker needs a task with a label list, got {task.name!r} (open answers)")
    return task.legend() if task.label_names else "".join(f"{label}\n" for label in task.labels)


def rerank_prompt(task, query_image: Any, candidates: list[tuple[Any, str]], with_images: bool = True) -> list[Part]:
    """The prompt's parts in order: text and images (``candidates``: ``(image, caption)`` pairs;
    ``with_images`` False is the captions-only variant, whose candidate images are left out)."""
    if len(candidates) < 2:
        raise ValueError(f"candidates: expected at least 2 to choose from, got {len(candidates)}")
    if query_image is None:
        raise ValueError("query_image: the LVLM reranker shows the query image; got None")
    what = "each a caption with its image" if with_images else "each a caption"
    parts: list[Part] = [
        ("text", f"{INSTRUCTION.format(k=len(candidates), what=what)}\nLabels:\n{_labels(task)}Image to classify:"),
        ("image", query_image),
    ]
    for n, (image, caption) in enumerate(candidates, start=1):
        parts.append(("text", f"\nCaption {n}: {caption}"))
        if with_images:
            if image is None:
                raise ValueError(f"candidates[{n - 1}]: has no image for the variant with images")
            parts.append(("image", image))
    parts.append(("text", f"\n{SELECT}\n{OUTPUT}"))
    return parts


@dataclass(frozen=True)
class Choice:
    """A parsed reply: ``index`` the chosen candidate (0-based) or None, and why."""

    index: int | None
    reason: str


_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER = r"(\d+|" + "|".join(_WORDS) + r")\b"
_STATED = re.compile(r"caption\s*(?:number|no\.?|num\.?|#)\s*[:=#-]?\s*[<(\[]?\s*" + _NUMBER, re.IGNORECASE)
_ONLY_NUMBER = re.compile(r"^\W*(\d+)\W*$")
_MENTION = re.compile(r"\bcaption\s*[:#]?\s*" + _NUMBER, re.IGNORECASE)


def _value(token: str) -> int:
    return int(token) if token.isdigit() else _WORDS[token.lower()]


def _checked(n: int, k: int, how: str) -> Choice:
    if 1 <= n <= k:
        return Choice(n - 1, how)
    return Choice(None, f"names caption {n}, expected one of 1..{k}")


def parse_choice(reply: str, k: int) -> Choice:
    """The candidate a reply names among ``k`` (see the module docstring for the rules)."""
    if not isinstance(reply, str):
        raise TypeError(f"reply: expected the model's text, got {type(reply).__name__}")
    text = reply.replace("*", "").replace("_", " ").replace("`", "")
    stated = _STATED.findall(text)
    if stated:
        return _checked(_value(stated[-1]), k, "stated Caption Number")
    only = _ONLY_NUMBER.match(text)
    if only:
        return _checked(int(only.group(1)), k, "a bare number")
    mentioned = sorted({_value(m) for m in _MENTION.findall(text)})
    if len(mentioned) == 1:
        return _checked(mentioned[0], k, "one caption mentioned")
    if mentioned:
        return Choice(None, f"names several captions {mentioned}")
    return Choice(None, "names no caption number")
