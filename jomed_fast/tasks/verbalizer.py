"""Verbalizers: a task's classes as token ids of a given tokenizer.

The reader answers with text; class-restricted scoring (``p_C``, the paper's sharp posterior) and
restricted decoding need each class as token ids. :func:`build_verbalizer` returns a
:class:`Verbalizer` holding

* ``sequences[c]`` — the token ids of label ``c`` at the start of the answer (``"10"`` and
  ``"benign"`` are usually several tokens);
* ``class_token_ids`` — one id per class for single-position scoring with
  ``ops.head_class_log_softmax`` (the first token of each class; only defined when those differ);
* ``end_token_id`` — the end-of-answer token (the tokenizer's ``eos_token`` by default: Qwen2-VL's
  ``<|im_end|>``, Pixtral's ``</s>``); it closes every class sequence so that ``"1"`` and ``"10"``
  are told apart;
* multi-label only: ``separator_ids`` (the separator's tokens between two labels, e.g. ``","``
  and ``" "`` for byte-level BPEs that split the space off) and ``continuation_sequences[c]``
  (label ``c`` after a separator; differs from ``sequences[c]`` for SentencePiece-style
  tokenizers that glue the space to the next word, ``"▁3"``);
* ``allowed_token_ids`` — every token an answer may contain: label tokens, separator tokens
  (every variant met when encoding all label pairs) and the end token.

Restricted decoding follows the answer grammar ``label`` (single label) or
``label (separator label)* end`` (multi-label): :meth:`Verbalizer.allowed_next` gives the tokens
allowed after a partial answer, and :class:`RestrictedDecoding` applies it as a Hugging Face
``LogitsProcessor``.

Validation (``ValueError`` naming the task, the classes and the tokenizer's ids): every label
encodes to at least one token and decodes back to itself (no ``<unk>``); no two classes share a
sequence; a class that is a prefix of another needs an end token; the end token and the
separator's tokens never occur inside a label; multi-label tasks need an end token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .._checks import is_int
from .spec import Task, normalize


# ----------------------------------------------------------------------------------------------
# Tokenizer adapter: `tokenizers.Tokenizer` or a transformers tokenizer (fast or slow).
# ----------------------------------------------------------------------------------------------
class _TokenizerAdapter:
    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        if (
            hasattr(tokenizer, "get_vocab_size")
            and hasattr(tokenizer, "encode_batch")
            and not callable(getattr(tokenizer, "convert_tokens_to_ids", None))
        ):
            self.kind = "tokenizers"
        elif callable(tokenizer) and callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
            self.kind = "transformers"
        else:
            raise TypeError(
                "tokenizer: expected a `tokenizers.Tokenizer` or a transformers tokenizer, "
                f"got {type(tokenizer).__name__}"
            )

    @property
    def vocab_size(self) -> int:
        if self.kind == "tokenizers":
            return int(self.tok.get_vocab_size(with_added_tokens=True))
        return int(len(self.tok))

    @property
    def eos_id(self) -> Optional[int]:
        if self.kind == "tokenizers":
            return None
        eid = getattr(self.tok, "eos_token_id", None)
        return int(eid) if eid is not None else None

    def encode(self, text: str) -> tuple[list[int], Optional[list[tuple[int, int]]]]:
        if self.kind == "tokenizers":
            enc = self.tok.encode(text, add_special_tokens=False)
            return list(enc.ids), [tuple(o) for o in enc.offsets]
        if getattr(self.tok, "is_fast", False):
            out = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]
        out = self.tok(text, add_special_tokens=False)
        return list(out["input_ids"]), None

    def decode(self, ids: Sequence[int]) -> str:
        if self.kind == "tokenizers":
            return self.tok.decode(list(ids), skip_special_tokens=False)
        return self.tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_to_id(self, token: str) -> Optional[int]:
        if self.kind == "tokenizers":
            tid = self.tok.token_to_id(token)
            return int(tid) if tid is not None else None
        tid = self.tok.convert_tokens_to_ids(token)
        unk = getattr(self.tok, "unk_token_id", None)
        if tid is None or (unk is not None and tid == unk and token != getattr(self.tok, "unk_token", None)):
            return None
        return int(tid)


def _resolve_end_token(tok: _TokenizerAdapter, end_token: Any, task: Task) -> Optional[int]:
    if end_token is None:
        return tok.eos_id
    if is_int(end_token):
        if not 0 <= end_token < tok.vocab_size:
            raise ValueError(f"end_token: id {end_token} outside the vocabulary 0..{tok.vocab_size - 1}")
        return int(end_token)
    if isinstance(end_token, str):
        tid = tok.token_to_id(end_token)
        if tid is None:
            ids, _ = tok.encode(end_token)
            if len(ids) != 1:
                raise ValueError(
                    f"end_token: {end_token!r} is not one token of this tokenizer (encodes to {ids}); "
                    f"task {task.name!r} needs a single end-of-answer token"
                )
            tid = ids[0]
        return int(tid)
    raise TypeError(f"end_token: expected a token string or id, got {type(end_token).__name__}")


# ----------------------------------------------------------------------------------------------
# The verbalizer.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verbalizer:
    task_name: str
    kind: str
    labels: tuple[str, ...]
    sequences: tuple[tuple[int, ...], ...]
    end_token_id: Optional[int]
    separator_ids: tuple[int, ...]
    continuation_sequences: tuple[tuple[int, ...], ...]
    allowed_token_ids: tuple[int, ...]
    vocab_size: int

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def is_multilabel(self) -> bool:
        return self.kind == "multilabel"

    @property
    def single_token(self) -> bool:
        """Every class is exactly one token (at the start of the answer)."""
        return all(len(s) == 1 for s in self.sequences)

    @property
    def first_tokens_unique(self) -> bool:
        firsts = [s[0] for s in self.sequences]
        return len(set(firsts)) == len(firsts)

    @property
    def class_token_ids(self) -> tuple[int, ...]:
        """The first token of each class: ``class_ids`` for ``ops.head_class_log_softmax``.

        Scoring the first token alone is exact when the first tokens differ (each class is then
        decided at the answer's first position). Raises ``ValueError`` otherwise: score whole
        sequences (``padded_sequences``) instead.
        """
        firsts = [s[0] for s in self.sequences]
        if len(set(firsts)) != len(firsts):
            clashes: dict[int, list[str]] = {}
            for lab, f in zip(self.labels, firsts):
                clashes.setdefault(f, []).append(lab)
            shared = {tid: labs for tid, labs in clashes.items() if len(labs) > 1}
            raise ValueError(
                f"task {self.task_name!r}: classes share their first token ({shared}); single-position "
                "class scoring cannot tell them apart, score the full sequences (padded_sequences) instead"
            )
        return tuple(firsts)

    def sequence(self, c: int, *, with_end: bool = True) -> tuple[int, ...]:
        s = self.sequences[c]
        return s + (self.end_token_id,) if with_end and self.end_token_id is not None else s

    def target_ids(self, label: Any, *, with_end: bool = True) -> list[int]:
        """Token ids of the canonical answer for ``label`` (index, or a set for multi-label)."""
        if self.is_multilabel:
            idx = sorted({int(i) for i in ([label] if isinstance(label, int) else label)})
            if not idx:
                raise ValueError(f"task {self.task_name!r}: a multi-label answer needs at least one label")
            out = list(self.sequences[idx[0]])
            for i in idx[1:]:
                out += list(self.separator_ids) + list(self.continuation_sequences[i])
        else:
            out = list(self.sequences[int(label)])
        if with_end and self.end_token_id is not None:
            out.append(self.end_token_id)
        return out

    def padded_sequences(self, pad_id: int = 0, *, with_end: bool = True):
        """``(ids [C, T] int64, mask [C, T] bool)``: every class sequence, right-padded."""
        import torch

        seqs = [self.sequence(c, with_end=with_end) for c in range(self.num_classes)]
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), int(pad_id), dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.bool)
        for c, s in enumerate(seqs):
            ids[c, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[c, : len(s)] = True
        return ids, mask

    def allowed_mask(self, vocab_size: Optional[int] = None):
        """Bool ``[V]``: True on ``allowed_token_ids``."""
        import torch

        v = int(vocab_size if vocab_size is not None else self.vocab_size)
        if max(self.allowed_token_ids) >= v:
            raise ValueError(f"vocab_size: {v} is smaller than the largest allowed id {max(self.allowed_token_ids)}")
        mask = torch.zeros(v, dtype=torch.bool)
        mask[list(self.allowed_token_ids)] = True
        return mask

    # ------------------------------------------------------------------------------------------
    # restricted decoding
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _continuations(table: Sequence[tuple[int, ...]], partial: Sequence[int]) -> tuple[set[int], bool]:
        """Next tokens that extend ``partial`` inside a label of ``table``; whether it is a whole label."""
        n = len(partial)
        nxt: set[int] = set()
        complete = False
        p = tuple(partial)
        for s in table:
            if s[:n] == p:
                if len(s) > n:
                    nxt.add(s[n])
                else:
                    complete = True
        return nxt, complete

    def allowed_next(self, prefix: Sequence[int]) -> tuple[int, ...]:
        """Token ids allowed after the partial answer ``prefix`` (sorted); ``()`` when it is complete.

        Raises ``ValueError`` when ``prefix`` is not a valid partial answer.
        """
        prefix = [int(t) for t in prefix]
        end = self.end_token_id
        if not self.is_multilabel:
            seqs = [self.sequence(c) for c in range(self.num_classes)]
            nxt, complete = self._continuations(seqs, prefix)
            if not nxt and not complete:
                raise ValueError(f"task {self.task_name!r}: {prefix} is not a prefix of any class answer")
            return tuple(sorted(nxt))
        # multi-label: label (sep label)* end
        table = self.sequences
        partial: list[int] = []
        sep_pos = -1  # -1: inside a label; k >= 0: k separator tokens consumed
        for i, t in enumerate(prefix):
            if sep_pos >= 0:
                if t == self.separator_ids[sep_pos]:
                    sep_pos += 1
                    if sep_pos == len(self.separator_ids):
                        sep_pos, table, partial = -1, self.continuation_sequences, []
                    continue
                raise ValueError(f"task {self.task_name!r}: {prefix} breaks the separator at position {i}")
            nxt, complete = self._continuations(table, partial)
            if t in nxt:
                partial.append(t)
            elif complete and t == end:
                if i != len(prefix) - 1:
                    raise ValueError(f"task {self.task_name!r}: {prefix} continues after the end token")
                return ()
            elif complete and t == self.separator_ids[0]:
                sep_pos = 1
                if sep_pos == len(self.separator_ids):
                    sep_pos, table, partial = -1, self.continuation_sequences, []
            else:
                raise ValueError(f"task {self.task_name!r}: {prefix} is not a valid multi-label answer (position {i})")
        if sep_pos >= 0:
            return (self.separator_ids[sep_pos],)
        nxt, complete = self._continuations(table, partial)
        if complete:
            nxt |= {self.separator_ids[0], end}  # type: ignore[arg-type]
        return tuple(sorted(nxt))

    def logits_processor(self, prompt_length: Any) -> "RestrictedDecoding":
        return RestrictedDecoding(self, prompt_length)


class RestrictedDecoding:
    """A Hugging Face ``LogitsProcessor``: only the tokens the answer grammar allows keep their score.

    ``prompt_length`` is an int, or one int per row, marking where the answer starts in
    ``input_ids``. A finished answer allows only the end token (or nothing else changes when the
    task has none).
    """

    def __init__(self, verbalizer: Verbalizer, prompt_length: Any):
        self.v = verbalizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        import torch

        out = torch.full_like(scores, float("-inf"))
        for b in range(input_ids.shape[0]):
            start = self.prompt_length if isinstance(self.prompt_length, int) else int(self.prompt_length[b])
            allowed = list(self.v.allowed_next(input_ids[b, start:].tolist()))
            if not allowed and self.v.end_token_id is not None:
                allowed = [self.v.end_token_id]
            if allowed:
                idx = torch.tensor(allowed, dtype=torch.long, device=scores.device)
                out[b, idx] = scores[b, idx]
        return out


# ----------------------------------------------------------------------------------------------
# Building.
# ----------------------------------------------------------------------------------------------
def _encode_label(tok: _TokenizerAdapter, task: Task, label: str, prefix_space: bool) -> tuple[int, ...]:
    text = (" " + label) if prefix_space else label
    ids, _ = tok.encode(text)
    if not ids:
        raise ValueError(f"task {task.name!r}: label {label!r} encodes to no tokens")
    back = tok.decode(ids)
    if normalize(back) != normalize(label):
        raise ValueError(
            f"task {task.name!r}: the tokenizer cannot represent label {label!r}: it encodes to {ids}, "
            f"which decodes to {back!r}"
        )
    return tuple(ids)


def _split_pair(
    tok: _TokenizerAdapter, a: str, sep: str, b: str, task: Task
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Encode ``a + sep + b``; return (all ids, a-part, sep-part, b-part)."""
    text = a + sep + b
    ids, offsets = tok.encode(text)
    la, ls = len(a), len(sep)
    if offsets is not None:
        pa: list[int] = []
        ps: list[int] = []
        pb: list[int] = []
        for tid, (s, e) in zip(ids, offsets):
            if e <= s:  # zero-width (special) token
                ps.append(tid)
                continue
            in_a, in_s, in_b = s < la, s < la + ls and e > la, e > la + ls
            if in_a and (in_s or in_b):
                raise ValueError(
                    f"task {task.name!r}: the tokenizer merges label {a!r} with the separator {sep!r} "
                    f"into one token in {text!r}; choose another separator"
                )
            (pa if in_a else pb if in_b else ps).append(tid)
        return ids, pa, ps, pb
    ids_a, _ = tok.encode(a)
    for sep_variant in (sep, sep.rstrip()):
        ids_as, _ = tok.encode(a + sep_variant)
        if ids_as[: len(ids_a)] == ids_a and ids[: len(ids_as)] == ids_as:
            return ids, ids_a, ids_as[len(ids_a) :], ids[len(ids_as) :]
    raise ValueError(
        f"task {task.name!r}: cannot split {text!r} into label and separator tokens with this "
        "(slow) tokenizer; use a fast tokenizer"
    )


def build_verbalizer(task: Task, tokenizer: Any, *, end_token: Any = None, prefix_space: bool = False) -> Verbalizer:
    """Token ids of every class of ``task`` under ``tokenizer``; see the module docstring.

    Args:
        task: the task; it must have a label set.
        tokenizer: a ``tokenizers.Tokenizer`` or a transformers tokenizer.
        end_token: end-of-answer token (string or id); default the tokenizer's ``eos_token``.
        prefix_space: encode the answer as ``" " + label`` (when the prompt ends without a space
            before the answer, e.g. ``"Answer:"``); chat templates put the answer at the start
            of the assistant turn, so the default is False.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task: expected a Task, got {type(task).__name__}")
    if not task.labels:
        raise ValueError(
            f"task {task.name!r} ({task.kind}) has no label set to verbalize; attach one with task.with_labels(...)"
        )
    tok = _TokenizerAdapter(tokenizer)
    end = _resolve_end_token(tok, end_token, task)
    labels = task.labels
    if task.is_multilabel and end is None:
        raise ValueError(
            f"task {task.name!r}: multi-label answers need an end-of-answer token; the tokenizer has no "
            "eos_token, pass end_token="
        )
    seqs = tuple(_encode_label(tok, task, lab, prefix_space) for lab in labels)

    def check_distinct(table: Sequence[tuple[int, ...]], where: str) -> None:
        for i in range(len(table)):
            for j in range(len(table)):
                if i == j:
                    continue
                si, sj = table[i], table[j]
                if si == sj:
                    raise ValueError(
                        f"task {task.name!r}: classes {labels[i]!r} and {labels[j]!r} have the same token ids "
                        f"{list(si)} {where}; they cannot be told apart"
                    )
                if end is None and len(si) < len(sj) and sj[: len(si)] == si:
                    raise ValueError(
                        f"task {task.name!r}: class {labels[i]!r} {list(si)} is a prefix of {labels[j]!r} "
                        f"{list(sj)} {where}; pass end_token= (the tokenizer has no eos_token)"
                    )

    check_distinct(seqs, "at the start of the answer")
    label_tokens = {t for s in seqs for t in s}
    if end is not None and end in label_tokens:
        raise ValueError(f"task {task.name!r}: the end token {end} occurs inside a label's tokens")

    separator_ids: tuple[int, ...] = ()
    continuation = seqs
    allowed = set(label_tokens)
    if task.is_multilabel:
        sep = task.separator
        variants: dict[int, dict[tuple[int, ...], int]] = {j: {} for j in range(len(labels))}
        sep_variants: dict[tuple[int, ...], int] = {}
        cont_tokens: set[int] = set()
        for _i, a in enumerate(labels):
            for j, b in enumerate(labels):
                ids, _pa, ps, pb = _split_pair(tok, ((" " + a) if prefix_space else a), sep, b, task)
                allowed.update(ids)
                if not ps:
                    raise ValueError(f"task {task.name!r}: separator {sep!r} encodes to no tokens between labels")
                sep_variants[tuple(ps)] = sep_variants.get(tuple(ps), 0) + 1
                variants[j][tuple(pb)] = variants[j].get(tuple(pb), 0) + 1
                cont_tokens.update(pb)
        # canonical = the most frequent variant (ties: the first met)
        separator_ids = max(sep_variants, key=lambda k: sep_variants[k])
        continuation = tuple(max(variants[j], key=lambda k: variants[j][k]) for j in range(len(labels)))
        for j, cs in enumerate(continuation):
            if not cs:
                raise ValueError(f"task {task.name!r}: label {labels[j]!r} vanishes after the separator")
        check_distinct(continuation, "after the separator")
        sep_tokens = {t for v in sep_variants for t in v}
        clash = sep_tokens & (label_tokens | cont_tokens)
        if clash:
            raise ValueError(
                f"task {task.name!r}: separator {sep!r} shares tokens {sorted(clash)} with the labels; "
                "answers could not be split"
            )
        if end in sep_tokens or end in cont_tokens:
            raise ValueError(f"task {task.name!r}: the end token {end} occurs inside the separator or a label")
        allowed.update(sep_tokens)
    if end is not None:
        allowed.add(end)
    return Verbalizer(
        task_name=task.name,
        kind=task.kind,
        labels=labels,
        sequences=seqs,
        end_token_id=end,
        separator_ids=tuple(separator_ids),
        continuation_sequences=tuple(continuation),
        allowed_token_ids=tuple(sorted(allowed)),
        vocab_size=tok.vocab_size,
    )
