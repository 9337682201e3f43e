r"""The class-restricted head on any Hugging Face causal LM or VLM, as one reversible patch.

``patch = patch_class_head(model)`` gives ``model`` (a ``*ForCausalLM``, a ``*ForConditionalGeneration``,
a model of ``AutoModelForImageTextToText``; bare or wrapped by PEFT, before or after the patch;
16/32-bit or bitsandbytes-quantized) two keyword arguments::

    log_probs = model(**batch, class_token_ids=ids)                         # float32 [B, C]
    log_probs = model(**batch, class_token_ids=ids, answer_positions=pos)   # pos: [B]

.. math::

    \log p(c \mid x_b) = \operatorname{log\_softmax}_c\big(h_b \cdot W_{\mathrm{ids}_c} + b_{\mathrm{ids}_c}\big),
    \qquad h_b = S_{b,\,\mathrm{pos}_b}

with ``S`` ``[B, L, H]`` the last hidden states of the model's backbone, ``model.base_model`` (the
module its LM head reads: for a VLM the vision tower, projector and decoder together, where
``get_decoder()`` is the text decoder alone and cannot take pixel values); ``W`` ``[V, H]`` and ``b``
``[V]`` (when there is one) the LM head, ``model.get_output_embeddings()``, tied to the input
embeddings or not; ``pos_b`` the answer position, by default the last non-padding token of row b
(the last 1 of ``attention_mask``, so left and right padding both work; the last token without a
mask), or ``answer_positions[b]`` (``[-L, L)``). :func:`jomed_fast.ops.head_class_log_softmax`
reads only the C class rows of ``W``: neither ``[B, L, V]`` nor ``[B, V]`` logits are formed.
Gradients reach the hidden states, LoRA adapters and the head as the plain computation
``log_softmax(model(**batch).logits[range(B), pos][:, ids], -1)`` gives them.

Without ``class_token_ids`` a call is the model's own forward, argument for argument, and
``generate`` never passes it, so generation is unchanged. The patch is an instance attribute
``forward`` on the transformers model (inside a PEFT wrapper, where PEFT's forward calls it);
its signature is the model's plus the two keywords, so ``Trainer`` keeps an ``answer_positions``
column. ``patch.remove()``, or leaving ``with patch_class_head(model):``, restores the forward
that was there before.

Class ids (``class_token_ids``): a list or tuple of ints, a NumPy array or a tensor of any integer
dtype, ``[C]`` or ``[C, 1]`` (what ``tokenizer(labels, add_special_tokens=False)["input_ids"]``
gives for one-token labels), distinct, in ``[0, V)``; converted to int64 on the head's device once
per call (an int64 tensor already there is used as it is). A class of several tokens is an error
naming it (``jomed_fast.scoring.class_head.ClassHead`` scores those by teacher forcing).

Refused at patch time, each with an error naming the cause: encoder-decoder models (their head
reads the decoder with its own inputs), and heads whose logits are not ``lm_head(hidden)`` — a
config with ``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere) or ``logits_scaling``
(Granite) — where the class head would disagree with the model. Refused at call time: a quantized
LM head (transformers keeps ``lm_head`` unquantized unless told otherwise) and a LoRA adapter on
the LM head (its update is not in ``W``; ``modules_to_save=["lm_head"]`` works).
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

import numpy as np
import torch

from .. import ops

__all__ = [
    "ClassHeadPatch",
    "as_class_token_ids",
    "as_integer_tensor",
    "find_class_head_patch",
    "lm_head_parameters",
    "patch_class_head",
    "transformers_model",
]

_PATCH_ATTR = "_jomed_class_head_patch"
_MISSING = object()
_HEAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Config fields of models whose logits are a function of lm_head(hidden), not lm_head(hidden) itself.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None,),
    "logit_scale": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
}
# Forward arguments that shape the returned ModelOutput, which the class head does not return.
_OUTPUT_ARGUMENTS = ("output_attentions", "output_hidden_states", "return_dict", "num_items_in_batch")
_EXTRA_KEYWORDS = ("class_token_ids", "answer_positions")


# ----------------------------------------------------------------------------------------- inputs
def as_integer_tensor(name: str, value: Any) -> torch.Tensor:
    """``value`` (a tensor, a NumPy array, a nested list / tuple of ints) as an integer tensor of its
    own integer dtype and device; a float, bool or complex one is a ``TypeError`` naming ``name``."""
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected integer ids, got a NumPy array of dtype {value.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(value).astype(np.int64, copy=False))
    elif isinstance(value, (list, tuple)):
        try:
            tensor = torch.tensor(value) if len(value) else torch.zeros(0, dtype=torch.int64)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{name}: expected a flat list of ints (or one int per class), got {value!r:.200}"
            ) from exc
    else:
        raise TypeError(f"{name}: expected a list of ints, a NumPy array or a tensor, got {type(value).__name__}")
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name}: expected integer ids, got dtype {tensor.dtype}")
    return tensor


def _ragged_class(value: Any) -> tuple[int, list] | None:
    """The first class of a list of per-class token lists that is not exactly one token."""
    if not isinstance(value, (list, tuple)):
        return None
    for c, entry in enumerate(value):
        if isinstance(entry, (list, tuple)) and len(entry) != 1:
            return c, list(entry)
    return None


def as_class_token_ids(
    class_token_ids: Any, vocab_size: int | None, device: torch.device | str, name: str = "class_token_ids"
) -> torch.Tensor:
    """Class token ids as the op takes them: int64 ``[C]`` on ``device``, distinct, in ``[0, vocab_size)``
    (``[0, ∞)`` for ``vocab_size=None``).

    Takes a list / tuple of ints, a NumPy array or a tensor of any integer dtype, shaped ``[C]`` or
    ``[C, 1]`` (one token per class, as tokenizers return them one list per label).
    """
    ragged = _ragged_class(class_token_ids)
    if ragged is not None:
        c, tokens = ragged
        raise ValueError(
            f"{name}: expected one token per class, got class {c} as {len(tokens)} tokens {tokens}; the class "
            "head scores the first answer token (multi-token labels: jomed_fast.scoring.class_head.ClassHead)"
        )
    ids = as_integer_tensor(name, class_token_ids)
    if ids.dim() == 2 and ids.shape[1] == 1:
        ids = ids[:, 0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty [C] (or [C, 1]) of token ids, got shape {tuple(ids.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise ValueError(
            f"{name}: expected token ids in [0, {vocab_size}) (the rows of the LM head), got min {lo} and max {hi}"
        )
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"{name}: expected distinct ids, got {ids.tolist()[:32]}")
    return ids.to(device=device, dtype=torch.int64)


def _answer_positions(
    answer_positions: Any, attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """int64 ``[B]``: the given positions (``[-L, L)``, wrapped), else the last non-padding token of each row."""
    if answer_positions is not None:
        positions = as_integer_tensor("answer_positions", answer_positions)
        if positions.dim() != 1 or positions.shape[0] != batch:
            raise ValueError(f"answer_positions: expected shape [B] = ({batch},), got {tuple(positions.shape)}")
        lo, hi = int(positions.min()), int(positions.max())
        if lo < -length or hi >= length:
            raise ValueError(
                f"answer_positions: expected positions in [-{length}, {length}) (L={length}), got min {lo} and max {hi}"
            )
        return (positions.to(device=device, dtype=torch.int64)) % length
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.int64, device=device)
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask: expected [B, L] = ({batch}, {length}) (the hidden states' rows and length) to find the "
            f"answer positions, got {tuple(attention_mask.shape)}; pass answer_positions [B]"
        )
    present = attention_mask.to(device) != 0
    empty = ~present.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"attention_mask: expected a token in every row, got none in row {int(empty.nonzero()[0])}")
    # last True per row = L - 1 - (first True of the reversed row): one rule for left and right padding
    return length - 1 - present.flip(1).to(torch.int8).argmax(dim=1).to(torch.int64)


# ----------------------------------------------------------------------------------------- model
def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model that ``model`` is or that a PEFT wrapper holds (LoRA layers in it)."""
    peft = sys.modules.get("peft")  # a PeftModel exists only once peft is imported
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def _check_model(model: torch.nn.Module) -> None:
    from transformers import PreTrainedModel

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel or a PEFT model wrapping one, got {name}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"model: expected a decoder-only causal LM or VLM, got the encoder-decoder {name}")
    if model.get_output_embeddings() is None:
        raise ValueError(f"model: expected a model with an LM head (get_output_embeddings()), got {name} with none")
    if model.base_model is model:
        raise ValueError(
            f"model: expected an LM head over a backbone (base_model), got {name} whose base_model is itself"
        )
    text_config = model.config.get_text_config()
    for field, plain in _LOGIT_TRANSFORMS.items():
        value = getattr(text_config, field, None)
        if value not in plain:
            raise ValueError(
                f"model: expected logits = lm_head(hidden), got {name} whose config transforms them "
                f"({field}={value!r}); the class head would not match its logits"
            )
    if any(p in _EXTRA_KEYWORDS for p in inspect.signature(model.forward).parameters):
        raise ValueError(f"model: {name}.forward already takes one of {_EXTRA_KEYWORDS}")


def lm_head_parameters(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight ``[V, H]`` and bias ``[V]`` (or None), read where the model keeps them now
    (PEFT may have wrapped the head since the patch)."""
    head = model.get_output_embeddings()
    if hasattr(head, "base_layer"):  # a PEFT tuner layer: W + its update, which W alone does not hold
        raise ValueError(
            "model: the LM head carries a PEFT adapter, whose update the class head cannot read from its weight; "
            "leave lm_head out of target_modules (modules_to_save=['lm_head'] trains it whole)"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"model: expected an LM head with a [V, H] weight, got {type(head).__name__}")
    if weight.dtype not in _HEAD_DTYPES:
        raise ValueError(
            f"model: expected the LM head in fp16, bf16 or fp32, got a {type(weight).__name__} of dtype {weight.dtype} "
            "(a quantized head); keep lm_head out of the quantization (llm_int8_skip_modules)"
        )
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _patched_signature(original: inspect.Signature) -> inspect.Signature:
    """``(self, <original parameters>, *, class_token_ids=None, answer_positions=None, **kwargs)``."""
    params = list(original.parameters.values())
    var_keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in _EXTRA_KEYWORDS]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return original.replace(parameters=[self_param, *rest, *extra, *var_keyword])


def _make_forward(signature: inspect.Signature, doc: str | None):
    # The patch is found through the module (not a closure), so a deepcopy of the model carries its own.
    def forward(self, *args, class_token_ids=None, answer_positions=None, **kwargs):
        patch = vars(self)[_PATCH_ATTR]
        if class_token_ids is None:
            if answer_positions is not None:
                raise ValueError("answer_positions: expected it together with class_token_ids, got it alone")
            return patch.original_forward(*args, **kwargs)
        return patch.class_log_probs(args, kwargs, class_token_ids, answer_positions)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = doc
    return forward


class ClassHeadPatch:
    """The class head installed on one transformers model (see the module docstring).

    ``model``: the transformers model patched (inside the PEFT wrapper, when there is one).
    ``remove()`` restores the forward that was there before (idempotent); the patch is also a
    context manager that removes itself on exit.
    """

    def __init__(self, model: Any):
        self.model = model
        self._saved_forward = vars(model).get("forward", _MISSING)
        self.original_forward = model.forward
        self._signature = inspect.signature(self.original_forward)
        patched = _make_forward(_patched_signature(self._signature), getattr(self.original_forward, "__doc__", None))
        self._installed = types.MethodType(patched, model)
        setattr(model, _PATCH_ATTR, self)
        model.forward = self._installed

    @property
    def removed(self) -> bool:
        return getattr(self.model, _PATCH_ATTR, None) is not self

    def remove(self) -> None:
        if self.removed:
            return
        if vars(self.model).get("forward") is not self._installed:
            raise RuntimeError(
                f"model: {type(self.model).__name__}.forward was replaced after the class head patch "
                "(by another wrapper); remove that wrapper first"
            )
        if self._saved_forward is _MISSING:
            del self.model.forward
        else:
            self.model.forward = self._saved_forward
        delattr(self.model, _PATCH_ATTR)

    def __enter__(self) -> "ClassHeadPatch":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "installed"
        return f"ClassHeadPatch({type(self.model).__name__}, {state})"

    # -------------------------------------------------------------------------------- compute
    def _named_arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by name, as the model's forward would bind them (``**kwargs`` flattened)."""
        bound = self._signature.bind(*args, **kwargs)
        named: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"{type(self.model).__name__}.forward: extra positional arguments {len(value)}")
            else:
                named[name] = value
        return named

    def class_log_probs(
        self, args: tuple, kwargs: dict, class_token_ids: Any, answer_positions: Any = None
    ) -> torch.Tensor:
        """float32 ``[B, C]``: the class-restricted log-softmax of the LM head at the answer positions."""
        named = self._named_arguments(args, kwargs)
        if named.pop("labels", None) is not None:
            raise ValueError(
                "labels: the class head returns log-probabilities, not a loss; pass labels to "
                "jomed_fast.integrations.class_nll_loss with the log-probabilities instead"
            )
        keep = named.pop("logits_to_keep", 0)
        if not (keep is None or (isinstance(keep, int) and keep == 0)):
            raise ValueError(f"logits_to_keep: the class head reads the answer positions instead; got {keep!r}")
        for name in _OUTPUT_ARGUMENTS:
            named.pop(name, None)
        if named.get("use_cache") is None:
            named["use_cache"] = False  # nothing returned could carry the cache
        outputs = self.model.base_model(**named)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]  # [B, L, H]
        batch, length = hidden.shape[:2]
        positions = _answer_positions(answer_positions, named.get("attention_mask"), batch, length, hidden.device)
        answer_hidden = hidden[torch.arange(batch, device=hidden.device), positions]  # [B, H]
        weight, bias = lm_head_parameters(self.model)
        ids = as_class_token_ids(class_token_ids, weight.shape[0], weight.device)
        # a device map may put the head on another device than the last layer, as the model's own forward allows
        return ops.head_class_log_softmax(answer_hidden.to(weight.device), weight, ids, bias)


def find_class_head_patch(model: torch.nn.Module) -> ClassHeadPatch | None:
    """The patch installed on ``model`` (or on the transformers model a PEFT wrapper holds), if any."""
    return getattr(transformers_model(model), _PATCH_ATTR, None)


def patch_class_head(model: torch.nn.Module) -> ClassHeadPatch:
    """Install the class head on ``model`` (a transformers causal LM / VLM, or a PEFT model wrapping
    one) and return the patch; ``patch.remove()`` or ``with patch_class_head(model): ...`` undoes it."""
    inner = transformers_model(model)
    if find_class_head_patch(inner) is not None:
        raise ValueError(f"model: {type(inner).__name__} already carries the class head; remove that patch first")
    _check_model(inner)
    return ClassHeadPatch(inner)
