"""Measure the CPU activation peak of one stage-1 step of a reader (run in a fresh process).

``python -m jomed_fast.memory._measure_activations CKPT_DIR T`` loads the reader in NF4 with LoRA
and non-reentrant gradient checkpointing, warms up with two 64-token steps, then runs one T-token
forward + backward and prints JSON: resident bytes before the step, the peak during it and their
difference. The peak is the kernel's high-water mark (``memory.peak.PeakMemory``: VmHWM), reset
just before the step so the loading and quantization peaks are not counted. Run it with
``MALLOC_MMAP_THRESHOLD_=65536`` so glibc returns freed tensors to the OS and the resident size
follows torch's live bytes. Used by tests/test_memory.py.
"""

import json
import sys
from typing import cast

import torch
from transformers import PreTrainedModel

from jomed_fast.memory.peak import PeakMemory, resident_bytes
from jomed_fast.readers.hf_reader import load_reader


def main(checkpoint: str, tokens: int) -> dict:
    torch.set_num_threads(1)
    reader = load_reader(checkpoint, quantization="nf4")
    reader.add_lora()
    model = cast(PreTrainedModel, reader.hf_model)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def step(T: int) -> None:
        ids = torch.randint(0, 700, (1, T), generator=torch.Generator().manual_seed(T))
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
        out.logits.float().sum().backward()
        model.zero_grad(set_to_none=False)

    step(64)
    step(64)
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    base = resident_bytes()
    step(tokens)
    peak = memory.peak()
    return {"base": base, "peak": peak, "delta": peak - base}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
