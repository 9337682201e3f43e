"""Prompt layouts: how a query and one retrieved (image, caption) pair become the reader's prompt.

Two layouts (``LAYOUTS``); both go through the reader's own chat template with the generation
prompt added (the answer cue), and both keep the task's fixed text where its listing puts it:
``task.preamble()`` (the label legend, for the paper's tasks that have one) right before the query
image, ``task.prompt(question)`` (the question; the reference variants put the legend here too)
right after it, ``task.context(caption)`` (``"background:{caption}\\n\\n"`` for Breast) right after
the retrieved image.

``paper`` — the order of the paper and its code (one user turn)::

    [retrieved image] "{context}{preamble}" [query image] "{prompt}"  <answer cue>

e.g. Derma: ``[retrieved image] "background:{caption}\\n\\n{legend}\\n\\n" [query image] "{question}"``.

``shared_query`` — the query first, so that everything before the candidate is shared by the K
prompts of a query (its KV-cache is computed once)::

    "{preamble}" [query image] "{prompt}\\n\\n" [retrieved image] "{context}"  <answer cue>

(the caption's trailing blank line moves in front of the retrieved image: the turn ends right
after the caption).

Rendered with the tiny readers' templates (Qwen2-VL, Pixtral), ``paper`` reads (for a task
without a preamble, context ``"background: {caption}\\n\\n"``)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|><|vision_end|>background: {caption}\\n\\n
    <|vision_start|><|image_pad|><|vision_end|>{legend}{question}<|im_end|>\\n<|im_start|>assistant\\n

    <s>[INST][IMG]background: {caption}\\n\\n[IMG]{legend}{question}[/INST]

Variants used by the analyses: a query without an image (``query_image=None``: the query image
part is left out), a candidate without an image (``Candidate(None, caption)``: caption only) and
no candidate at all (``candidate=None``: the plain query prompt, the paper's no-retrieval baseline).

Splitting (``split_query``): the K prompts of a query share a token prefix. It is found on the
token ids of the full prompts, never assumed: the prefix is the longest common prefix of the K
tokenized prompts and of the tokenized *shared part* (the prompt cut right before the candidate's
first part), so it never reaches into the candidate and ``prefix + segment_k`` is, token for
token, what tokenizing prompt k alone gives. In ``paper`` the prefix is the chat template's
system part (the same for every query); in ``shared_query`` it is system + query image + question.
Image placeholders stay one token per image here; the scorer expands them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

__all__ = [
    "LAYOUTS",
    "Candidate",
    "QueryPrompts",
    "as_candidate",
    "as_image",
    "prompt_parts",
    "build_messages",
    "render_prompt",
    "split_query",
]

LAYOUTS = ("paper", "shared_query")


# ---------------------------------------------------------------------------------------------
# Candidates and images
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Candidate:
    """A retrieved (image, caption) pair.

    Attributes:
        image: a PIL image, an ``[H, W, 3]`` / ``[H, W]`` uint8 (or float in [0, 1]) array, or
            None for a caption-only candidate.
        text: the caption / report (may be empty).
        id: an optional identifier (an index record's id); not used for scoring.
    """

    image: Any
    text: str
    id: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise TypeError(f"Candidate.text: expected a str, got {type(self.text).__name__}")


def as_candidate(obj: Any, name: str = "candidate") -> Candidate:
    """A ``Candidate`` from a ``Candidate``, a dict or an object with ``image``/``text`` (an index
    record: its ``load_image()`` is called when it holds an ``image_path`` but no pixels), or an
    ``(image, text)`` tuple."""
    if isinstance(obj, Candidate):
        return obj
    if isinstance(obj, dict):
        if "text" not in obj:
            raise ValueError(f"{name}: expected a dict with 'image' and 'text' keys, got keys {sorted(obj)}")
        image, text, cid = obj.get("image"), obj["text"], obj.get("id")
    elif isinstance(obj, tuple) and len(obj) == 2:
        image, text, cid = obj[0], obj[1], None
    elif hasattr(obj, "text") and hasattr(obj, "image"):
        image, text, cid = obj.image, obj.text, getattr(obj, "id", None)
        if (
            image is None
            and getattr(obj, "image_path", None) is not None
            and callable(getattr(obj, "load_image", None))
        ):
            image = obj.load_image()
    else:
        raise TypeError(
            f"{name}: expected a Candidate, a dict / record with 'image' and 'text', or an (image, text) tuple, "
            f"got {type(obj).__name__}"
        )
    if not isinstance(text, str):
        raise TypeError(f"{name}.text: expected a str, got {type(text).__name__}")
    return Candidate(image=image, text=text, id=None if cid is None else str(cid))


def as_image(image: Any, name: str = "image"):
    """A PIL RGB image from a PIL image or an ``[H, W]`` / ``[H, W, 1|3|4]`` array (uint8, or float in [0, 1])."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode == "RGB":
            return image
        from .data.io import as_rgb_uint8  # 16-bit and float modes by their range, not PIL's clip to white

        return Image.fromarray(as_rgb_uint8(image, name=name))
    if hasattr(image, "__array__") and not isinstance(image, (str, bytes)):
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
            raise ValueError(f"{name}: expected an [H, W] or [H, W, 3] image array, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"{name}: expected a uint8 or float image array, got dtype {arr.dtype}")
            if np.issubdtype(arr.dtype, np.floating):
                if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                    raise ValueError(f"{name}: a float image array must hold values in [0, 1]")
                arr = np.round(arr * 255.0)
            elif arr.min() < 0 or arr.max() > 255:
                raise ValueError(f"{name}: an integer image array must hold values in [0, 255]")
            arr = arr.astype(np.uint8)
        img = Image.fromarray(np.ascontiguousarray(arr))
        return img if img.mode == "RGB" else img.convert("RGB")
    raise TypeError(f"{name}: expected a PIL image or an image array, got {type(image).__name__}")


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------
def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout


def prompt_parts(layout: str, task, query_image: Any, question: Optional[str], candidate: Optional[Candidate]):
    """The user turn's content parts in order, and how many leading parts do not depend on the
    candidate: ``(parts, n_shared)``; a part is ``("image", obj)`` or ``("text", str)``."""
    _check_layout(layout)
    prompt, preamble = task.prompt(question), task.preamble()
    lead = [("text", preamble)] if preamble else []
    query = [("image", query_image)] if query_image is not None else []
    if candidate is None:
        return lead + query + [("text", prompt)], len(lead) + len(query) + 1
    cand_image = [("image", candidate.image)] if candidate.image is not None else []
    context = _context(layout, task, candidate.text)
    if layout == "paper":
        # the preamble follows the context in one text part, as the listings write them
        return cand_image + [("text", context + preamble)] + query + [("text", prompt)], 0
    head = lead + query + [("text", prompt + "\n\n")]
    return head + cand_image + [("text", context)], len(head)


def _context(layout: str, task, text: str) -> str:
    """The candidate's caption text: ``task.context`` (``paper``), without its trailing newlines
    (``shared_query``, where it ends the turn)."""
    context = task.context(text)
    return context if layout == "paper" else context.rstrip("\n")


def _messages(parts) -> list[dict]:
    content = []
    for kind, value in parts:
        content.append({"type": "image"} if kind == "image" else {"type": "text", "text": value})
    return [{"role": "user", "content": content}]


def build_messages(
    layout: str, task, query_image: Any, question: Optional[str] = None, candidate: Optional[Candidate] = None
) -> tuple[list[dict], list[Any]]:
    """``(messages, images)``: the chat messages of one prompt (image parts as ``{"type": "image"}``)
    and its images in placeholder order; what ``ReaderProcessor.encode(images, messages)`` takes."""
    parts, _ = prompt_parts(layout, task, query_image, question, candidate)
    return _messages(parts), [v for kind, v in parts if kind == "image"]


def render_prompt(
    processor,
    layout: str,
    task,
    query_image: Any,
    question: Optional[str] = None,
    candidate: Optional[Candidate] = None,
) -> str:
    """The prompt's text through the reader's chat template (generation prompt added), one
    placeholder token per image."""
    messages, _ = build_messages(layout, task, query_image, question, candidate)
    return processor.apply_chat_template(messages, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# Splitting a query's K prompts into a shared prefix and K segments
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class QueryPrompts:
    """One query's K prompts as token ids, split at the shared prefix (one placeholder per image).

    Attributes:
        prefix_ids: the tokens shared by the K prompts.
        prefix_images: the images of the prefix's placeholders, in order.
        segments: the K remaining token lists (``prefix_ids + segments[k]`` is prompt k).
        segment_images: each segment's images in placeholder order.
    """

    prefix_ids: list[int]
    prefix_images: list[Any]
    segments: list[list[int]]
    segment_images: list[list[Any]]


_SENTINEL = "\x00jomed-candidate-text\x00"


def _render_all(processor, layout, task, query_image, question, candidates) -> list[str]:
    """The K prompt texts. The chat template runs once per candidate *shape* (with / without an
    image) with a sentinel for the caption, which is then substituted; the first substitution is
    checked against a direct rendering (a template that rewrites text falls back to rendering each)."""
    # per shape: (template, the sentinel's context in it), or None where substitution is unsafe
    shapes: dict[tuple, tuple[str, str] | None] = {}
    texts = []
    for cand in candidates:
        if cand is None:
            texts.append(render_prompt(processor, layout, task, query_image, question, None))
            continue
        key = (cand.image is not None,)
        if key not in shapes:
            probe = Candidate(image=cand.image, text=_SENTINEL)
            template = render_prompt(processor, layout, task, query_image, question, probe)
            direct = render_prompt(processor, layout, task, query_image, question, cand)
            context, sentinel_context = _context(layout, task, cand.text), _context(layout, task, _SENTINEL)
            substitutes = (
                template.count(sentinel_context) == 1 and template.replace(sentinel_context, context) == direct
            )
            shapes[key] = (template, sentinel_context) if substitutes else None
        entry = shapes[key]
        if entry is None:
            texts.append(render_prompt(processor, layout, task, query_image, question, cand))
        else:
            template, sentinel_context = entry
            texts.append(template.replace(sentinel_context, _context(layout, task, cand.text)))
    return texts


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        for s in seqs[1:]:
            if s[i] != t:
                return i
    return n


def split_query(
    processor,
    layout: str,
    task,
    query_image: Any,
    question: Optional[str],
    candidates: Sequence[Optional[Candidate]],
    name: str = "candidates",
    question_name: str = "question",
) -> QueryPrompts:
    """Tokenize a query's K prompts and split them at their shared prefix (see the module docstring).

    ``processor``: a ``ReaderProcessor`` (its ``apply_chat_template``, ``tokenizer`` and
    ``image_token_id``). Raises ``ValueError`` naming the argument when a caption or the question
    holds text that the tokenizer reads as an image placeholder.
    """
    _check_layout(layout)
    texts = _render_all(processor, layout, task, query_image, question, candidates)
    shared_parts, n_shared = prompt_parts(layout, task, query_image, question, candidates[0])
    shared_text = processor.apply_chat_template(_messages(shared_parts[:n_shared]), add_generation_prompt=False)
    encoded = processor.tokenizer([shared_text, task.prompt(question)] + texts, add_special_tokens=False)["input_ids"]
    shared_ids, question_ids, full = encoded[0], encoded[1], encoded[2:]
    image_id = processor.image_token_id

    # every prompt must hold exactly one placeholder per image part
    if image_id in question_ids:
        raise ValueError(
            f"{question_name}: holds text that the tokenizer reads as the image token {processor.image_token!r}"
        )
    images_of = []
    for k, cand in enumerate(candidates):
        parts, _ = prompt_parts(layout, task, query_image, question, cand)
        imgs = [v for kind, v in parts if kind == "image"]
        found = sum(1 for t in full[k] if t == image_id)
        if found != len(imgs):
            raise ValueError(
                f"{name}[{k}].text: the prompt holds {found} image placeholder token(s) for {len(imgs)} image(s); "
                f"a caption must not contain the image token {processor.image_token!r}"
            )
        images_of.append(imgs)

    P = _common_prefix_length([shared_ids] + list(full))
    prefix = full[0][:P]
    n_prefix_images = sum(1 for t in prefix if t == image_id)
    prefix_images = images_of[0][:n_prefix_images]
    if not all(img is query_image for img in prefix_images):  # by construction; a template change would show here
        raise RuntimeError(f"layout {layout!r}: the shared prefix reached into a candidate's image")
    return QueryPrompts(
        prefix_ids=list(prefix),
        prefix_images=list(prefix_images),
        segments=[list(ids[P:]) for ids in full],
        segment_images=[imgs[n_prefix_images:] for imgs in images_of],
    )
