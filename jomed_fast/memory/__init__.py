"""Memory planner: predicted peak GPU memory of JOMED runs (weights, LoRA, optimizer, activations,
KV-cache, class-head outputs, workspace). ``plan``, ``format_table``, ``suggest``; CLI
``python -m jomed_fast.memory``. Split: ``arch`` (config -> tensor list), ``weights`` (bytes by
storage kind), ``plan`` (runs, activations, search), ``cli``; ``peak`` measures a call's peak memory (the
benchmarks' and the planner's checks)."""

from .arch import SHIPPED, describe, load_config
from .plan import LAYOUTS, STAGES, MemoryPlan, Run, format_table, plan, suggest, tokens_in_flight
from .weights import measured_module_bytes, weight_bytes

__all__ = [
    "Run",
    "MemoryPlan",
    "plan",
    "format_table",
    "suggest",
    "describe",
    "load_config",
    "weight_bytes",
    "measured_module_bytes",
    "tokens_in_flight",
    "STAGES",
    "LAYOUTS",
    "SHIPPED",
]
