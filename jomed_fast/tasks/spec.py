"""The task specification: what the reader is asked and how its answer is read back.

A :class:`Task` is a frozen record of *data* (kind, label strings, fixed question, instructions)
plus the pure functions that go with it:

* ``label_index`` / ``encode_answer`` — **strict**: a ground-truth answer from a data file to a
  class index (or a set of indices for multi-label); anything outside the label set is a
  ``ValueError`` that names the answer and lists the labels. Loaders use these.
* ``parse`` — **lenient**: a model generation to a class index / set, or ``None`` when no label
  can be read. Robust to whitespace, case, quotes and trailing punctuation; a label must appear as
  a whole word (``"10"`` never reads as ``"1"``). Evaluation uses this.
* ``format_answer`` — the canonical answer text (training target): the label string, or for
  multi-label the sorted label strings joined by ``separator`` (``"0, 3, 14"``).
* ``preamble`` / ``prompt`` — the task's text before and after the query image. Where the
  instructions go is ``instructions_position``: ``"before_query_image"`` (the paper's listings:
  the label legend between the retrieved context and the query image, the question after it) or
  ``"after_query_image"`` (the reference code: ``instructions + question`` after the image);
  ``prompt`` writes the question through ``question_template`` (``"{question}?"`` in the paper's
  VQA listing).
* ``context`` — the text after a retrieved image (``context_template``: ``"background:{text}\\n\\n"``
  in the paper's Breast listing, ``"background: {text}\\n\\n"`` in the reference code).

Kinds: ``binary`` and ``multiclass`` (one label), ``multilabel`` (a set of labels, answered as
comma-separated label indices), ``vqa_closed`` (yes/no), ``vqa_open`` (free text; no label set
unless one is attached with :meth:`Task.with_labels`).

The token ids of each class (class-restricted scoring and decoding) depend on a tokenizer as well:
``jomed_fast.tasks.verbalizer.build_verbalizer(task, tokenizer)``. This module knows nothing of
tokenizers, so the verbalizer depends on it and never the other way round.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Optional, Union, cast

from .._checks import is_int

KINDS = ("binary", "multiclass", "multilabel", "vqa_closed", "vqa_open")
INSTRUCTION_POSITIONS = ("after_query_image", "before_query_image")

Label = Union[int, frozenset]

# Characters stripped from both ends of an answer before it is compared with the labels.
_STRIP = " \t\r\n'\"`.,;:!?()[]{}<>*_"


def normalize(text: str) -> str:
    """Unicode NFKC, casefold, collapse whitespace, strip quotes/brackets/punctuation at the ends."""
    if not isinstance(text, str):
        raise TypeError(f"normalize: expected text as str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.split()).strip(_STRIP)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_open_answer(text: str) -> str:
    """SQuAD normalisation for open-ended answers: lower case, punctuation deleted (``"x-ray"`` ->
    ``"xray"``, as SQuAD's evaluation script), articles dropped, whitespace collapsed; NFKC and
    casefold first so full-width and accented forms compare equal. ``jomed_fast.eval`` uses it."""
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    text = _PUNCT.sub("", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@dataclass(frozen=True)
class Task:
    """A task spec. Immutable; build variants with :meth:`with_labels` or ``dataclasses.replace``.

    Attributes:
        name: registry name (``get_task(name)``).
        kind: one of :data:`KINDS`.
        labels: the answer strings the reader emits, one per class, in class-index order
            (``("No", "Yes")``, ``("0", ..., "6")``). Empty only for ``vqa_open``.
        question: the fixed question, or ``None`` when every sample brings its own (VQA).
        instructions: the task's fixed text besides the question (the label legend).
        label_names: human-readable class names in class order (the legend), or ``()``.
        separator: multi-label answer separator (canonical form; parsing accepts any spacing).
        context_template: the text that follows a retrieved image; ``{text}`` is its caption.
        source_label_map: dataset integer label -> class index, when they differ (BreastMNIST
            stores 0 = malignant, 1 = normal/benign; the Breast task's class 1 is "Yes" = cancer,
            so the map is ``(1, 0)``). ``None`` means the dataset label *is* the class index.
        prompt_source: where the question/instructions come from (repository path or a note).
        instructions_position: where ``instructions`` go, one of :data:`INSTRUCTION_POSITIONS`:
            ``"after_query_image"`` (right before the question) or ``"before_query_image"``
            (after the retrieved context, before the query image).
        question_template: how the question is written; ``{question}`` is the question.
    """

    name: str
    kind: str
    labels: tuple[str, ...]
    question: Optional[str]
    instructions: str = ""
    label_names: tuple[str, ...] = ()
    separator: str = ", "
    context_template: str = "background: {text}\n\n"
    source_label_map: Optional[tuple[int, ...]] = None
    description: str = ""
    prompt_source: str = ""
    instructions_position: str = "after_query_image"
    question_template: str = "{question}"

    # ------------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task.name: expected a non-empty str, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        labels = tuple(self.labels)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", tuple(self.label_names))
        for i, lab in enumerate(labels):
            if not isinstance(lab, str) or not lab.strip():
                raise ValueError(f"Task {self.name!r}: labels[{i}] must be a non-empty str, got {lab!r}")
            if lab != lab.strip():
                raise ValueError(f"Task {self.name!r}: labels[{i}]={lab!r} has surrounding whitespace")
        seen: dict[str, int] = {}
        for i, lab in enumerate(labels):
            key = normalize(lab)
            if key in seen:
                raise ValueError(
                    f"Task {self.name!r}: labels[{seen[key]}]={labels[seen[key]]!r} and labels[{i}]={lab!r} "
                    "are the same answer after normalisation (case/whitespace)"
                )
            seen[key] = i
        if self.kind == "vqa_open":
            pass  # free text; a label set is optional
        elif len(labels) < 2:
            raise ValueError(f"Task {self.name!r} ({self.kind}): expected at least 2 labels, got {len(labels)}")
        if self.kind == "binary" and len(labels) != 2:
            raise ValueError(f"Task {self.name!r}: a binary task has exactly 2 labels, got {len(labels)}")
        if self.label_names and len(self.label_names) != len(labels):
            raise ValueError(
                f"Task {self.name!r}: label_names has {len(self.label_names)} entries, labels has {len(labels)}"
            )
        if self.kind == "multilabel":
            if not self.separator.strip():
                raise ValueError(f"Task {self.name!r}: separator must contain a non-space character")
            sep = self.separator.strip()
            for lab in labels:
                if sep in lab:
                    raise ValueError(f"Task {self.name!r}: label {lab!r} contains the separator {sep!r}")
        if self.question is not None and not isinstance(self.question, str):
            raise TypeError(f"Task {self.name!r}: question must be a str or None, got {type(self.question).__name__}")
        if self.instructions_position not in INSTRUCTION_POSITIONS:
            raise ValueError(
                f"Task {self.name!r}: instructions_position must be one of {INSTRUCTION_POSITIONS}, "
                f"got {self.instructions_position!r}"
            )
        if self.question_template.count("{question}") != 1:
            raise ValueError(
                f"Task {self.name!r}: question_template must contain '{{question}}' once, got {self.question_template!r}"
            )
        if "{text}" not in self.context_template:
            raise ValueError(
                f"Task {self.name!r}: context_template must contain '{{text}}', got {self.context_template!r}"
            )
        if self.source_label_map is not None:
            m = tuple(int(x) for x in self.source_label_map)
            object.__setattr__(self, "source_label_map", m)
            if not all(0 <= x < len(labels) for x in m):
                raise ValueError(
                    f"Task {self.name!r}: source_label_map {m} has class indices outside 0..{len(labels) - 1}"
                )

    # ------------------------------------------------------------------------------------------
    # basic properties
    # ------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def is_multilabel(self) -> bool:
        return self.kind == "multilabel"

    @property
    def is_open(self) -> bool:
        return self.kind == "vqa_open"

    @property
    def has_label_set(self) -> bool:
        return len(self.labels) > 0

    def with_labels(self, labels: Iterable[str], name: Optional[str] = None) -> "Task":
        """A copy with another label set (e.g. an open-VQA answer vocabulary built from training data)."""
        labels = tuple(dict.fromkeys(str(x).strip() for x in labels if str(x).strip()))
        return dataclasses.replace(self, labels=labels, label_names=(), name=name or self.name)

    @cached_property
    def identity(self) -> str:
        """``name@digest``: the task's name and a sha256 prefix of every field that changes what the
        reader is shown or how its answer is read (labels, question, instructions and their
        position, templates, separator, label map); ``description`` and ``prompt_source`` are notes.
        Run identities and the score cache key on it, so a task whose prompt changes under the same
        name never reuses results computed with the old one."""
        from ..identity import json_digest

        notes = {"description", "prompt_source"}
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in notes}
        return f"{self.name}@{json_digest(fields)[:16]}"

    # ------------------------------------------------------------------------------------------
    # prompts
    # ------------------------------------------------------------------------------------------
    def prompt(self, question: Optional[str] = None) -> str:
        """The text after the query image: the question through ``question_template``, after the
        instructions when they go after the query image (``instructions_position``).

        ``question`` overrides the fixed question (a sample's own question); it is required when
        the task has none (VQA).
        """
        q = question if question is not None else self.question
        if q is None:
            raise ValueError(f"Task {self.name!r} has no fixed question: pass the sample's question")
        text = self.question_template.replace("{question}", q)
        return text if self.instructions_position == "before_query_image" else self.instructions + text

    def preamble(self) -> str:
        """The task's text right before the query image: the instructions when they go there, else ``""``."""
        return self.instructions if self.instructions_position == "before_query_image" else ""

    def context(self, text: str) -> str:
        """The text after a retrieved image: ``context_template`` with its caption."""
        return self.context_template.format(text=text)

    # ------------------------------------------------------------------------------------------
    # answers
    # ------------------------------------------------------------------------------------------
    @cached_property
    def _lookup(self) -> dict[str, int]:
        return {normalize(lab): i for i, lab in enumerate(self.labels)}

    @cached_property
    def _name_lookup(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, n in enumerate(self.label_names):
            out.setdefault(normalize(n), i)
        return out

    @staticmethod
    def _word_regex(strings: Iterable[tuple[str, int]]) -> Optional[tuple[re.Pattern, list[int]]]:
        """One alternation of whole-word matches, longest first (so "10" wins over "1")."""
        items = sorted(((normalize(s), i) for s, i in strings), key=lambda t: -len(t[0]))
        items = [(s, i) for s, i in items if s]
        if not items:
            return None
        alt = "|".join(f"(?P<c{n}>{re.escape(s)})" for n, (s, _) in enumerate(items))
        return re.compile(rf"(?<!\w)(?:{alt})(?!\w)"), [i for _, i in items]

    @cached_property
    def _label_regex(self) -> Optional[tuple[re.Pattern, list[int]]]:
        return self._word_regex((lab, i) for i, lab in enumerate(self.labels))

    @cached_property
    def _name_regex(self) -> Optional[tuple[re.Pattern, list[int]]]:
        return self._word_regex((n, i) for i, n in enumerate(self.label_names))

    @staticmethod
    def _matches(compiled: Optional[tuple[re.Pattern, list[int]]], text: str) -> list[int]:
        if compiled is None:
            return []
        pat, idx = compiled
        # every alternative is a named group g<i>, so the one that matched is always named
        return [idx[int(str(m.lastgroup)[1:])] for m in pat.finditer(text)]

    def _require_labels(self, what: str) -> None:
        if not self.labels:
            raise ValueError(
                f"Task {self.name!r} ({self.kind}) has no label set, so {what} is undefined; "
                "attach an answer vocabulary with task.with_labels(...) or compare normalised text"
            )

    def label_index(self, answer: Union[str, int]) -> int:
        """Strict: one ground-truth answer -> its class index (case/whitespace-insensitive).

        Raises ``ValueError`` naming the answer and the label set when it is not a label.
        """
        self._require_labels("label_index")
        if not (isinstance(answer, str) or is_int(answer)):
            raise TypeError(f"Task {self.name!r}: answer must be a str (or int), got {type(answer).__name__}")
        key = normalize(str(answer))
        try:
            return self._lookup[key]
        except KeyError:
            raise ValueError(
                f"answer {answer!r} is outside the label set of task {self.name!r}: expected one of {list(self.labels)}"
            ) from None

    def encode_answer(self, answer: Union[str, int, list, tuple]) -> Label:
        """Strict: a ground-truth answer (as stored in a data file) -> class index or frozenset.

        Multi-label answers are a string of separator-separated labels (``"0, 3"``) or a list of
        labels; the empty answer is refused (a multi-label sample has at least one label, e.g.
        "No finding"). Single-label answers are a string/int or a one-element list.
        """
        self._require_labels("encode_answer")
        if self.is_multilabel:
            if isinstance(answer, (list, tuple)):
                items = [str(a) for a in answer]
            elif isinstance(answer, str) or is_int(answer):
                items = str(answer).split(self.separator.strip())
            else:
                raise TypeError(
                    f"Task {self.name!r}: a multi-label answer must be a str or a list, got {type(answer).__name__}"
                )
            if not items or all(not normalize(x) for x in items):
                raise ValueError(f"Task {self.name!r}: empty multi-label answer {answer!r}")
            out = set()
            for x in items:
                if not normalize(x):
                    raise ValueError(f"Task {self.name!r}: empty item in multi-label answer {answer!r}")
                out.add(self.label_index(x))
            return frozenset(out)
        if isinstance(answer, (list, tuple)):
            if len(answer) != 1:
                raise ValueError(
                    f"Task {self.name!r} ({self.kind}) takes one answer per sample, got {len(answer)}: {answer!r}"
                )
            answer = answer[0]
        return self.label_index(cast(Union[str, int], answer))  # label_index checks the type

    def from_source_label(self, value: Union[int, Iterable[int]]) -> Label:
        """A dataset's integer label (or multi-hot row) -> class index (or frozenset), via ``source_label_map``."""
        self._require_labels("from_source_label")
        m = self.source_label_map
        n_src = len(m) if m is not None else self.num_classes

        def one(v: int) -> int:
            v = int(v)
            if not 0 <= v < n_src:
                raise ValueError(f"label {v} is outside the label set of task {self.name!r}: expected 0..{n_src - 1}")
            return m[v] if m is not None else v

        if self.is_multilabel:
            row = [int(x) for x in value]  # type: ignore[union-attr]
            if len(row) != n_src:
                raise ValueError(f"task {self.name!r}: a multi-hot label row has {len(row)} entries, expected {n_src}")
            bad = [x for x in row if x not in (0, 1)]
            if bad:
                raise ValueError(f"task {self.name!r}: multi-hot label row must be 0/1, got {row}")
            return frozenset(one(j) for j, x in enumerate(row) if x)
        return one(value)  # type: ignore[arg-type]

    def parse(self, text: str) -> Optional[Label]:
        """Lenient: a model generation -> class index / frozenset of indices, or ``None``.

        Single label: an exact (normalised) label, then an exact class name, then the first label
        appearing as a whole word, then the first class name appearing as a whole word.
        Multi-label: every label that appears as a whole word (``"0, 3,14"``, ``"labels: 3 and 12"``);
        ``None`` when there is none.
        """
        self._require_labels("parse")
        if not isinstance(text, str):
            raise TypeError(f"Task {self.name!r}: parse expects the generated text as str, got {type(text).__name__}")
        norm = normalize(text)
        if self.is_multilabel:
            found = self._matches(self._label_regex, norm)
            return frozenset(found) if found else None
        if norm in self._lookup:
            return self._lookup[norm]
        if norm in self._name_lookup:
            return self._name_lookup[norm]
        for pat in (self._label_regex, self._name_regex):
            found = self._matches(pat, norm)
            if found:
                return found[0]
        return None

    def format_answer(self, label: Any) -> str:
        """Canonical answer text: the label string, or sorted labels joined by ``separator``."""
        self._require_labels("format_answer")
        if self.is_multilabel:
            if is_int(label):
                label = [label]
            idx = sorted({int(i) for i in label})
            if not idx:
                raise ValueError(f"Task {self.name!r}: a multi-label answer needs at least one label")
            for i in idx:
                self._check_index(i)
            return self.separator.join(self.labels[i] for i in idx)
        if not isinstance(label, numbers.Integral):  # NumPy integers too (labels read from arrays)
            raise TypeError(f"Task {self.name!r}: label must be an int class index, got {type(label).__name__}")
        self._check_index(int(label))
        return self.labels[int(label)]

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_classes:
            raise ValueError(f"task {self.name!r}: class index {i} outside 0..{self.num_classes - 1}")

    def is_correct(self, prediction: Optional[Label], target: Label) -> bool:
        """Exact match (subset accuracy for multi-label, as the reference's accuracy_score2)."""
        if prediction is None:
            return False
        if self.is_multilabel:
            return _as_set(prediction) == _as_set(target)
        return int(cast(int, prediction)) == int(cast(int, target))

    def legend(self) -> str:
        """``"0 - 'Name'"`` lines for the label names (empty when the task has none)."""
        return "".join(f"{lab} - '{name}'\n" for lab, name in zip(self.labels, self.label_names))


def _as_set(label) -> frozenset:
    """A multi-label answer as a set (an int is a one-label set)."""
    return (
        label if isinstance(label, frozenset) else frozenset((label,)) if isinstance(label, int) else frozenset(label)
    )
