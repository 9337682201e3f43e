"""A stage-1 run in its own process, for the kill-and-resume test (``tests/test_train_reader_resume.py``).

    python tests/_stage1_run.py SPEC_JSON

``SPEC_JSON`` names the tiny reader directory, the retriever / index directories (or none: reader
only), the run directory, the ``ReaderTrainConfig`` options, the synthetic data sizes and
``sleep_s`` (a pause after every step, so that a test can kill the run mid-epoch). Deterministic:
one thread, fixed seeds, the same data every time.
"""

import json
import sys
import time
import warnings


def main(spec_path: str) -> None:
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    from jomed_fast.candidate_retrieval import Retrieval
    from jomed_fast.data.synthetic import generate
    from jomed_fast.index import Index
    from jomed_fast.readers import load_reader
    from jomed_fast.retriever import TinyCLIP
    from jomed_fast.train.reader import ReaderTrainConfig, train_reader

    with open(spec_path) as fh:
        spec = json.load(fh)
    ds = generate(**spec["data"])
    torch.manual_seed(int(spec.get("init_seed", 0)))  # the fresh LoRA adapter's A matrices are drawn at load
    reader = load_reader(spec["reader"], quantization="nf4", lora=True, device="cpu")
    retrieval = retriever = None
    if spec.get("retriever"):
        retriever = TinyCLIP.load(spec["retriever"])
        retrieval = Retrieval(Index.open(spec["index"], retriever), ds.index)
    sleep_s = float(spec.get("sleep_s", 0.0))

    def on_step(info):
        if sleep_s:
            time.sleep(sleep_s)

    train_reader(
        ReaderTrainConfig.from_dict(spec["config"]),
        reader,
        ds.task,
        ds.train,
        ds.val,
        spec["run_dir"],
        retrieval=retrieval,
        retriever=retriever,
        progress=False,
        on_step=on_step,
    )


if __name__ == "__main__":
    main(sys.argv[1])
