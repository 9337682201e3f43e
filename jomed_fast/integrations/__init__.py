"""jomed_fast's kernels in other people's models.

* :mod:`.hf` — ``patch_class_head(model)``: any Hugging Face causal LM or VLM (bare, PEFT-wrapped,
  bitsandbytes-quantized) returns class-restricted log-probabilities ``[B, C]`` at the answer
  position from ``model(**batch, class_token_ids=ids)``, through ``ops.head_class_log_softmax``
  (no ``[B, L, V]`` logits); reversible (``patch.remove()`` or a ``with`` block).
* :mod:`.hf_trainer` — ``class_nll_loss`` and ``ClassHeadTrainerMixin``: the answer NLL over the
  classes for ``transformers.Trainer`` and TRL trainers.

Importing this package imports neither transformers nor peft; they load when a model is patched.
"""

from .hf import ClassHeadPatch, as_class_token_ids, find_class_head_patch, patch_class_head
from .hf_trainer import ClassHeadTrainerMixin, class_nll_loss

__all__ = [
    "ClassHeadPatch",
    "ClassHeadTrainerMixin",
    "as_class_token_ids",
    "class_nll_loss",
    "find_class_head_patch",
    "patch_class_head",
]
