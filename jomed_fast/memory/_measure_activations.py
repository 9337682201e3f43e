"""Measure the CPU activation peak of one stage-1 step of a reader (run in a fresh process).

``python -m jomed_fast.memory._measure_activations CKPT_DIR T`` loads the reader in NF4 with LoRA
and non-reentrant gradient checkpointing, warms up with two 64-token steps, then runs one T-token
forward + backward and prints JSON: RSS before the step, peak RSS (``ru_maxrss``) and their
difference. Run it with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc returns freed tensors to the OS
and RSS follows torch's live bytes. Used by tests/test_memory.py.
"""
import sys, resource, torch, json
torch.set_num_threads(1)
from jomed_fast.readers.loading import load_reader
d = sys.argv[1]; T=int(sys.argv[2])
r=load_reader(d,quantization='nf4'); r.add_lora()
m=r.hf_model; m.train()
m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
def rss():
    return int(open('/proc/self/statm').read().split()[1])*4096
def step(T):
    ids=torch.randint(0,700,(1,T))
    out=m(input_ids=ids, use_cache=False, logits_to_keep=1)
    out.logits.float().sum().backward()
    m.zero_grad(set_to_none=False)
step(64); step(64)
base=rss()
step(T)
peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024
print(json.dumps({"base":base,"peak":peak,"delta":peak-base}))
