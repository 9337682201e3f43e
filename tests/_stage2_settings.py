"""The stage-2 settings the tests train with (``RetrieverTrainConfig`` fields): a few quick steps
with no warm-up, refresh, mixing or decay, so a test sees what its own change does."""

FAST = {
    "k": 8,
    "batch_size": 4,
    "refresh_every": None,
    "alpha": None,
    "lr": 1e-2,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "tau_reader": 0.1,
    "tau_retriever": 0.1,
    "checkpoint_every": 100,
}
