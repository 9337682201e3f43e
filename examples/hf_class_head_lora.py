"""Class-restricted scoring and LoRA fine-tuning of an unmodified Hugging Face model, with one patch.

``patch_class_head(model)`` makes ``model(**batch, class_token_ids=ids)`` return the ``[B, C]``
log-probabilities of the C answer tokens at each row's last real token, from the LM head's C rows
alone (``jomed_fast.ops.head_class_log_softmax``: the ``[B, L, V]`` logits never exist). The
model here is a tiny ``Qwen2ForCausalLM`` with random weights and the project's offline byte-level
BPE tokenizer; the toy task is "is this finding malignant? yes / no". A LoRA adapter is trained
for a few steps on the class NLL; the script prints the loss and accuracy and exits 1 unless the
loss went down.

    python examples/hf_class_head_lora.py
"""

from __future__ import annotations

import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from jomed_fast.integrations import class_nll_loss, patch_class_head
from jomed_fast.readers.offline_checkpoints import build_tokenizer

MALIGNANT = ["carcinoma", "melanoma", "tumor", "mass"]
BENIGN = ["nevus", "cyst", "normal", "edema"]
TEMPLATES = ["Finding: {}. Is it malignant? Answer:", "The report shows a {}. Malignant? Answer:"]
STEPS = 30


def main() -> int:
    torch.manual_seed(0)
    tokenizer = build_tokenizer("qwen2_vl")  # a real fast tokenizer, built offline
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)

    # One token per class, as the tokenizer returns them ([[id_yes], [id_no]]): passed as they come.
    class_token_ids = tokenizer([" yes", " no"], add_special_tokens=False)["input_ids"]
    prompts = [t.format(word) for t in TEMPLATES for word in MALIGNANT + BENIGN]
    gold = torch.tensor([0 if word in MALIGNANT else 1 for _ in TEMPLATES for word in MALIGNANT + BENIGN])
    tokenizer.padding_side = "left"  # either side works: the answer position comes from attention_mask
    batch = tokenizer(prompts, return_tensors="pt", padding=True)

    patch = patch_class_head(model)  # the one line; patch.remove() undoes it
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))

    def accuracy() -> float:
        with torch.no_grad():
            log_probs = model(**batch, class_token_ids=class_token_ids)  # [B, 2]
        return float((log_probs.argmax(-1) == gold).float().mean())

    print(f"before: accuracy {accuracy():.2f} on {len(prompts)} prompts")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(STEPS):
        log_probs = model(**batch, class_token_ids=class_token_ids)
        loss = class_nll_loss(log_probs, gold)  # labels could be the gold token ids instead (class_token_ids=)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == STEPS - 1:
            print(f"step {step:2d}  class NLL {losses[-1]:.4f}")
    print(f"after:  accuracy {accuracy():.2f}")

    # Without class_token_ids the model is itself: generate works as before.
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print("generate:", repr(tokenizer.decode(out[0, batch["input_ids"].shape[1] :])))
    patch.remove()

    if not losses[-1] < losses[0]:
        print("the class NLL did not go down", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
