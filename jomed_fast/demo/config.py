"""Settings of the end-to-end demonstration (``jomed-fast demo``), with three presets.

``full`` is the documented run (7 minutes on a 2-core CPU; CI runs it and asserts the paper's
findings); ``ci`` is the same pipeline with smaller data and fewer steps, a quicker check of the
pipeline but too small for the findings (its gain over fine-tuned RAG ranged from -1.2 to +5.0
points over seeds); ``smoke`` runs every step on a handful of samples (the end-to-end test of the
plumbing). Only a preset whose ``asserts_findings`` is true (``full``) makes ``jomed-fast demo``
exit 1 when a finding fails; on the others the findings are reported as informational, since at
their sizes a failed check says nothing about the pipeline.

Departures from the reference's hyper-parameters, and why: the tiny reader and retriever start
from random (reader) / briefly pre-trained (retriever) weights, not from 7B / CLIP checkpoints,
so stage 1 uses a learning rate of 3e-3 (reference 1e-4) to learn in a few hundred CPU steps;
stage 2 scores K=20 candidates per query (reference 50), trains the last block and the projection
of the tiny image tower (reference: the last 10 of 24 layers) for 6 epochs at lr 3e-3 (reference
1e-4: a few hundred steps here, 50k there), with τ_retriever = 0.1 (the tiny retriever's L2-normalised scores
span a range of ~1, where 7B-era retrievers' raw dot products span tens), no weight decay
(reference 1.0, which at these step counts shrinks the few trainable weights) and no mixing with
the base query embedding (α = None; reference 0.15, which at these step counts leaves the top 2
unchanged). Each head keeps its best epoch on the validation split (``select``), judged by the
fused accuracy of the system it serves in (the text head beside the base image head, the image
head beside the selected text head), as the reference picks its checkpoints by fused validation
accuracy: judged alone, a head could win on validation while its errors broke the other head's
ties (seeds 1 and 2 of the full preset lost 9.2 and 7.2 points that way).

The data: a quarter of the index is misleading records and 30% of the typical relevant records
hedge their diagnosis (``data.synthetic``: ``misleading_fraction``, ``hedged_rate``), so that what
a record's caption is worth to the reader differs from how well it matches the query; atypical
cases carry a faint signature of their true class (``atypical_cue`` 0.6), which the contrastively
pre-trained retriever weighs below the gross look and stage 2 can learn to weigh (without it the
right records for an atypical query are only its own case's, which no query encoder trained on
other cases finds, and stage 2 has nothing to learn that generalises: every measured gain was
noise-sized).

Layout: :class:`DemoConfig` holds the settings shared by every step (``seed``, ``arch``,
``layout``) and one group per step (``data``, ``retriever``, ``stage1``, ``stage2``,
``inference``), and makes each stage's own config (``reader_config``, ``retriever_config``,
``infer_config``). Every setting also has a flat option name, the same for the CLI flag, the YAML
key and the run directory's ``demo_config.json`` (:func:`settings`): the group's prefix and the
field's name (``stage2.lr`` is ``stage2_lr``, ``stage1.lr`` is ``reader_lr``, ``data.n_test`` is
``n_test``), or the name the field declares (``stage1.lora_r`` is ``lora_r``).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

__all__ = [
    "PRESETS",
    "DataSettings",
    "DemoConfig",
    "InferenceSettings",
    "RetrieverSettings",
    "Setting",
    "Stage1Settings",
    "Stage2Settings",
    "settings",
]


def _named(default: Any, option: str) -> Any:
    """A field whose option name is ``option`` rather than the group's prefix + its name."""
    return dataclasses.field(default=default, metadata={"option": option})


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The synthetic task and index: keyword arguments of ``data.synthetic.generate``."""

    n_train: int = 400
    n_val: int = 200
    n_test: int = 250
    index_size: int = 1500
    image_size: int = 32
    misleading_fraction: float = 0.25
    hedged_rate: float = 0.3
    atypical_cue: float = 0.6


@dataclasses.dataclass(frozen=True)
class RetrieverSettings:
    """The tiny CLIP retriever (``retriever.TinyCLIP``) and its contrastive pre-training."""

    width: int = 16
    depth: int = 4
    dim: int = 64
    epochs: int = 8


@dataclasses.dataclass(frozen=True)
class Stage1Settings:
    """Stage 1 of both the reader-only baseline and fine-tuned RAG (``train.ReaderTrainConfig``);
    ``eval_every`` is the checkpoint interval too."""

    lora_r: int = _named(8, "lora_r")
    lr: float = 3e-3
    batch_size: int = 8
    epochs: int = 2
    reader_only_epochs: int = _named(6, "reader_only_epochs")
    eval_every: int = 50


@dataclasses.dataclass(frozen=True)
class Stage2Settings:
    """Stage 2 of both heads (``train.RetrieverTrainConfig``, same field names), on the first
    ``queries`` training queries."""

    queries: int = 400
    k: int = 20
    epochs: int = 6
    lr: float = 3e-3
    batch_size: int = 4
    alpha: float | None = None
    tau_reader: float = 1.0
    tau_retriever: float = 0.1
    n_trainable: int = 1
    weight_decay: float = 0.0
    select: str = "best_val_accuracy"


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """The candidates fused at inference (``infer.InferConfig``); stage 1 trains on the same
    ``k_text + k_image`` and stage 2 selects each head on its own ``k``."""

    k_text: int = 2
    k_image: int = 2
    batch_size: int = 8


# group field of DemoConfig -> the prefix of its settings' option names
_PREFIXES = {"data": "", "retriever": "retriever_", "stage1": "reader_", "stage2": "stage2_", "inference": ""}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its option name (flag, YAML key, key of ``demo_config.json``), where it lives
    in a :class:`DemoConfig` (``group`` is None for the shared ones), its type and whether None
    is a value of it (the field's annotation says ``| None``)."""

    name: str
    group: str | None
    field: str
    type: type
    nullable: bool

    @property
    def path(self) -> str:
        return self.field if self.group is None else f"{self.group}.{self.field}"

    def get(self, config: DemoConfig) -> Any:
        return getattr(config if self.group is None else getattr(config, self.group), self.field)


def _setting(f: dataclasses.Field, group: str | None, prefix: str) -> Setting:
    name = f.metadata.get("option", prefix + f.name)
    base = str(f.type).replace(" | None", "")
    return Setting(name, group, f.name, _TYPES[base], base != str(f.type))


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything the demo depends on (JSON-serialisable by option name; a rerun with other
    settings is refused)."""

    seed: int = 0
    arch: str = "qwen2_vl"
    layout: str = "paper"
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    retriever: RetrieverSettings = dataclasses.field(default_factory=RetrieverSettings)
    stage1: Stage1Settings = dataclasses.field(default_factory=Stage1Settings)
    stage2: Stage2Settings = dataclasses.field(default_factory=Stage2Settings)
    inference: InferenceSettings = dataclasses.field(default_factory=InferenceSettings)
    # Whether the run is large enough for the paper's findings to be asserted (the demo's exit code).
    # A property of the preset, not a setting of the run: not an option, not in to_dict (a rerun of
    # the same settings resumes whichever preset they came from), not compared.
    asserts_findings: bool = dataclasses.field(default=True, compare=False, metadata={"setting": False})

    # ------------------------------------------------------------------------------ settings by name
    def to_dict(self) -> dict:
        """``{option name: value}`` of every setting (what ``demo_config.json`` holds)."""
        return {s.name: s.get(self) for s in settings()}

    def replace(self, **options: Any) -> DemoConfig:
        """A copy with the settings named by option (``n_test=12``, ``stage2_lr=1e-3``); an unknown
        name is a ValueError listing the known ones."""
        by_name = {s.name: s for s in settings()}
        unknown = sorted(set(options) - set(by_name))
        if unknown:
            raise ValueError(f"DemoConfig: unknown settings {unknown}; expected some of {sorted(by_name)}")
        shared: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            s = by_name[name]
            (shared if s.group is None else groups.setdefault(s.group, {}))[s.field] = value
        for group, changes in groups.items():
            shared[group] = dataclasses.replace(getattr(self, group), **changes)
        return dataclasses.replace(self, **shared)

    @classmethod
    def from_dict(cls, options: dict) -> DemoConfig:
        """The config of ``to_dict``'s form; every setting must be there (a run directory's
        ``demo_config.json`` written with fewer or other settings is not this config)."""
        if not isinstance(options, dict):
            raise TypeError(f"DemoConfig: expected a dict of settings, got {type(options).__name__}")
        missing = sorted({s.name for s in settings()} - set(options))
        if missing:
            raise ValueError(f"DemoConfig: missing settings {missing}")
        return cls().replace(**options)

    # ------------------------------------------------------------------------------ the stages' configs
    def reader_config(self, *, retrieval: bool):
        """Stage 1's ``ReaderTrainConfig``: fine-tuned RAG (``retrieval``) or the reader-only baseline."""
        from ..train.reader import ReaderTrainConfig

        s = self.stage1
        return ReaderTrainConfig(
            lr=s.lr,
            epochs=s.epochs if retrieval else s.reader_only_epochs,
            batch_size=s.batch_size,
            eval_every=s.eval_every,
            save_every=s.eval_every,
            gradient_checkpointing=False,
            seed=self.seed,
            layout=self.layout,
            k_text=self.inference.k_text,
            k_image=self.inference.k_image,
        )

    def retriever_config(self, head: str):
        """Stage 2's ``RetrieverTrainConfig`` of ``head`` (``"text"`` or ``"image"``): the head is
        selected on the fused accuracy of its own inference ``k``."""
        from ..train.retriever import RetrieverTrainConfig

        options = {
            f.name: getattr(self.stage2, f.name) for f in dataclasses.fields(Stage2Settings) if f.name != "queries"
        }
        k = {"text": self.inference.k_text, "image": self.inference.k_image}[head]
        return RetrieverTrainConfig(**options, head=head, select_k=k, layout=self.layout, seed=self.seed)

    def infer_config(self, **changes: Any):
        """The ``InferConfig`` every system is predicted with, plus ``changes`` (``retrieval="none"``, ...)."""
        from ..infer import InferConfig

        i = self.inference
        return InferConfig(
            k_text=i.k_text, k_image=i.k_image, batch_size=i.batch_size, layout=self.layout, seed=self.seed, **changes
        )


def settings() -> tuple[Setting, ...]:
    """Every setting of :class:`DemoConfig`, shared ones first, then by group in field order."""
    out = []
    group_types = typing.get_type_hints(DemoConfig)
    for f in dataclasses.fields(DemoConfig):
        if f.name in _PREFIXES:
            out += [_setting(g, f.name, _PREFIXES[f.name]) for g in dataclasses.fields(group_types[f.name])]
        elif f.metadata.get("setting", True):
            out.append(_setting(f, None, ""))
    return tuple(out)


_SMOKE = DemoConfig(
    data=DataSettings(n_train=24, n_val=8, n_test=12, index_size=120),
    retriever=RetrieverSettings(width=8, depth=1, dim=32, epochs=1),
    stage1=Stage1Settings(epochs=1, reader_only_epochs=1, eval_every=1000),
    stage2=Stage2Settings(queries=8, k=4, epochs=1),
    inference=InferenceSettings(batch_size=6),
    asserts_findings=False,
)
PRESETS = {
    # the plumbing in a minute or two (the end-to-end test); too small for the paper's findings
    "smoke": _SMOKE,
    "full": DemoConfig(),
    # a quicker check of the pipeline; its gain over fine-tuned RAG is noise-sized (module docstring)
    "ci": DemoConfig(
        data=DataSettings(n_train=240, n_val=40, n_test=160, index_size=800),
        retriever=RetrieverSettings(epochs=6),
        stage2=Stage2Settings(queries=240),
        asserts_findings=False,
    ),
}
