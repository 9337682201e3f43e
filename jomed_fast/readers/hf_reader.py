"""``load_reader``: an unmodified Hugging Face VLM from a local directory, optionally NF4/int8
(bitsandbytes) and LoRA (PEFT), wrapped in a ``Reader`` that knows its family's facts.

Families (``readers.families``, which reads them off the config):

==========  ==========================================  ===========================================
family      model_type in config.json                   class
==========  ==========================================  ===========================================
qwen2_vl    ``qwen2_vl``                                ``Qwen2VLForConditionalGeneration``
qwen2_5_vl  ``qwen2_5_vl``                              ``Qwen2_5_VLForConditionalGeneration``
pixtral     ``llava`` with a ``pixtral`` vision config   ``LlavaForConditionalGeneration``
generic     any other ``AutoModelForImageTextToText``    the class that mapping names (the family is
            model type (e.g. ``llava`` + CLIP)           its model_type; placeholders from its HF
                                                        processor), unless ``families.REFUSED``
==========  ==========================================  ===========================================

A reader without a trainable adapter is frozen: every parameter has ``requires_grad=False``, so
nothing builds an autograd graph through it unless a caller turns parameters on.

Quantization (bitsandbytes, the Hugging Face defaults, as LLaMA-Factory's QLoRA): every linear
layer of the language model, the vision tower and the projector is quantized; ``lm_head`` stays
in the compute dtype (``quantize_vision=False`` keeps the vision tower and projector unquantized
too), and so does any layer whose shape bitsandbytes' kernels cannot take (named in one warning,
in ``Reader.unquantized_layers`` and in the reader's fingerprint; see ``readers.quantization``).
``"nf4"``: 4-bit NormalFloat, double quantization, compute dtype bf16 on CUDA / fp32 on CPU; on the
CPU it runs the portable kernel, or bitsandbytes' packed AVX512-BF16 one on request (``cpu_kernel``).
``"int8"``: LLM.int8() (on CPU, bitsandbytes runs the int8 matmul with fp16 inputs).

LoRA (PEFT): on every linear layer of the language model (q/k/v/o and gate/up/down projections
of every decoder layer; never the projector or ``lm_head``); defaults r=8, alpha=16, dropout 0, no
bias, B initialised to zero (a fresh adapter leaves the outputs unchanged). ``LoraSettings(vision=True)``
(``train-reader --lora-vision``) also puts adapters on the linear layers of the vision tower's
blocks: the paper grid-searched freezing the tower or not; the authors' code trains it
(LLaMA-Factory ``lora_target: all`` with the tower unfrozen). Off by default, as the paper's
frozen-tower arm and the project's earlier readers.
Adapters are saved and loaded as safetensors (``adapter_model.safetensors`` + ``adapter_config.json``);
``jomed_adapter.json`` beside them records the family, the settings and, for a stage-1 adapter, the
prompt layout it was trained on (``Reader.trained_layout``: later stages refuse another layout
unless asked, :func:`check_trained_layout`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from jomed_fast._checks import is_number, positive_int
from jomed_fast._files import replace_dir_atomically
from jomed_fast._manifest import CorruptFile, verify_dir

from . import quantization as _quant
from .families import Family, family_of
from .processor import ReaderProcessor

QUANTIZATIONS = (None, "nf4", "int8")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "jomed_adapter.json"

_LM_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------
# LoRA settings.
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; r, alpha and dropout default to the reference's (LLaMA-Factory)
    defaults. ``vision``: adapters on the vision tower's blocks too (the reference trains the tower;
    the paper grid-searched freezing it), off by default."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    vision: bool = False

    def __post_init__(self):
        positive_int("lora.r", self.r)
        if not is_number(self.alpha) or self.alpha <= 0:
            raise ValueError(f"lora.alpha: expected a positive number, got {self.alpha!r}")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: expected a float in [0, 1), got {self.dropout!r}")
        if not isinstance(self.vision, bool):
            raise ValueError(f"lora.vision: expected true or false, got {self.vision!r}")

    def peft_config(self, target_modules: str):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            bias="none",
            target_modules=target_modules,
            task_type="CAUSAL_LM",
        )


def _linear_leaf_names(model: torch.nn.Module, inside: str) -> list[str]:
    """The last name part of every ``nn.Linear`` whose dotted path contains ``inside``."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if inside in f".{name}" and isinstance(module, torch.nn.Linear)
        }
    )


def lora_target_regex(model: torch.nn.Module, vision_tower: str | None = None) -> str:
    """A regex (PEFT ``target_modules``, full match) naming every linear layer of the language
    model's decoder layers, and nothing in the projector or ``lm_head``. ``vision_tower`` (the
    tower's attribute, ``Family.vision_modules[0]``) adds the linear layers of the tower's numbered
    blocks (its patch embedding and any merger outside the blocks stay frozen)."""
    names = _linear_leaf_names(model, ".language_model.layers.")
    if not names:
        raise ValueError("model: found no linear layer under language_model.layers")
    pattern = rf"(?:.*\.)?language_model\.layers\.\d+\.(?:.*\.)?(?:{'|'.join(names)})"
    if vision_tower is None:
        return pattern
    # a block is a numbered child somewhere below the tower (Qwen2-VL visual.blocks.N, Pixtral
    # vision_tower.transformer.layers.N); the merger's Sequential indices sit outside "blocks"
    tower = re.escape(vision_tower)
    blocks = re.compile(rf"(?:.*\.)?{tower}\.(?:[^.]+\.)*?(?:blocks|layers)\.\d+\..+")
    vision = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and blocks.fullmatch(name)
        }
    )
    if not vision:
        raise ValueError(f"lora.vision: found no linear layer in the blocks of the vision tower {vision_tower!r}")
    return rf"{pattern}|(?:.*\.)?{tower}\.(?:[^.]+\.)*?(?:blocks|layers)\.\d+\.(?:.*\.)?(?:{'|'.join(vision)})"


# ------------------------------------------------------------------------------------------
# The Reader.
# ------------------------------------------------------------------------------------------
@dataclass
class Reader:
    """A loaded reader: the HF model (a ``peft.PeftModel`` around it once LoRA is on), its
    processor and the facts the scorer needs.

    ``hidden_states(inputs)`` runs the decoder and returns its final (normed) hidden states
    ``[B, L, H]`` without computing any logits; ``lm_head_weight()`` is the ``[V, H]`` matrix to
    apply to them (e.g. restricted to the class tokens).
    """

    model: Any  # the HF model, or the peft.PeftModel around it
    processor: ReaderProcessor
    family: str
    path: Path
    quantization: str | None
    device: torch.device
    compute_dtype: torch.dtype
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    image_token_id: int
    image_token_ids: tuple[int, ...]
    lora: LoraSettings | None = None
    trained_layout: str | None = None  # the prompt layout stage 1 trained the adapter on
    trained_layout_from: str | None = None  # where that was recorded (the adapter's jomed_adapter.json)
    config: Any = field(default=None, repr=False)
    unquantized_layers: tuple[str, ...] = ()
    cpu_kernel: str | None = None
    facts: Family | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ parts
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def hf_model(self) -> Any:
        """The HF ``...ForConditionalGeneration`` (with LoRA layers injected, when on)."""
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    @property
    def decoder(self) -> torch.nn.Module:
        """The language model (decoder layers + final norm)."""
        return self.hf_model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.hf_model.get_output_embeddings()

    def lm_head_weight(self) -> torch.Tensor:
        """The LM-head matrix ``[V, H]`` (the parameter itself; ``load_reader`` never quantizes
        ``lm_head``, so it is in the compute dtype whatever the quantization)."""
        weight = cast(torch.Tensor, self.lm_head.weight)
        if getattr(weight, "quant_state", None) is not None or getattr(weight, "SCB", None) is not None:
            raise ValueError("reader: lm_head is quantized; load the reader with load_reader (it keeps lm_head)")
        return weight

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n}

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def vision_parameters(self):
        """The parameters of the vision tower and the projector (LoRA leaves them out unless
        ``LoraSettings.vision``, which adapts the tower's blocks)."""
        model = self.hf_model.model
        for name in self.family_facts.vision_modules:
            module = getattr(model, name, None)
            if module is not None:
                yield from module.parameters()

    @property
    def family_facts(self) -> Family:
        """The family's facts (``families.family_of`` of the config, read once at load)."""
        if self.facts is None:
            self.facts = family_of(self.config)
        return self.facts

    @property
    def vision_dims(self) -> tuple[int, int, int]:
        """The vision tower's width, MLP width and heads (what the scorer's memory budget reads)."""
        return self.family_facts.vision_dims

    # ------------------------------------------------------------------ inputs
    def encode(self, images=None, messages=None, **kwargs) -> dict[str, torch.Tensor]:
        """``processor.encode`` moved to the reader's device (pixel values in the compute dtype)."""
        return self.to_device(self.processor.encode(images, messages, **kwargs))

    def encode_batch(self, samples, **kwargs) -> dict[str, torch.Tensor]:
        return self.to_device(self.processor.encode_batch(samples, **kwargs))

    def to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, dtype=self.compute_dtype if v.is_floating_point() else None)
            out[k] = v
        return out

    # ------------------------------------------------------------------ compute
    def __call__(self, **inputs):
        """The full HF forward (logits over the whole vocabulary; ``labels`` give the loss)."""
        return self.model(**inputs)

    def hidden_states(self, inputs: dict[str, torch.Tensor], positions: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's last hidden states (after the final norm), no logits computed.

        ``inputs``: what ``encode`` returns (``labels`` are ignored). Returns ``[B, L, H]``, or with
        ``positions`` (``[B]`` or ``[B, P]`` long) the states at those positions, ``[B, H]`` / ``[B, P, H]``.
        """
        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = self.hf_model.model(**kwargs, use_cache=False).last_hidden_state
        if positions is None:
            return hidden
        positions = torch.as_tensor(positions, device=hidden.device).long()
        if positions.dim() not in (1, 2) or positions.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"positions: expected a long tensor [B] or [B, P] with B={hidden.shape[0]}, got {tuple(positions.shape)}"
            )
        index = positions if positions.dim() == 2 else positions[:, None]
        picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        return picked if positions.dim() == 2 else picked[:, 0]

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits

    def train(self, mode: bool = True) -> "Reader":
        self.model.train(mode)
        return self

    def eval(self) -> "Reader":
        return self.train(False)

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, settings: LoraSettings | dict | bool = True) -> "Reader":
        """Put a fresh LoRA adapter (trainable, base frozen) on the language model."""
        from peft import get_peft_model

        if self.has_lora:
            raise ValueError("lora: this reader already has a LoRA adapter")
        settings = _lora_settings(settings)
        self.use_trainable_kernel()
        tower = self.family_facts.vision_modules[0] if settings.vision else None
        with warnings.catch_warnings():  # PEFT calls a deprecated transformers property
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(self.model, settings.peft_config(lora_target_regex(self.model, tower)))
        self.model = model
        self.lora = settings
        return self

    def use_trainable_kernel(self) -> "Reader":
        """Run NF4 layers on the CPU kernel that has a backward (``dequantize``), before training.

        Refused once the packed kernel has run (its repacking cannot be undone exactly)."""
        if self.cpu_kernel == "packed":
            _quant.set_cpu_kernel(self.model, "dequantize")
            self.cpu_kernel = "dequantize"
        return self

    def save_adapter(self, out_dir: str | os.PathLike, layout: str | None = None) -> Path:
        return save_adapter(self, out_dir, layout)

    def load_adapter(self, adapter_dir: str | os.PathLike, trainable: bool = False) -> "Reader":
        return load_adapter(self, adapter_dir, trainable=trainable)


# ------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------
def check_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Raise a ``ValueError`` that says what is wrong unless ``path`` is a local checkpoint directory."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a local directory (str or PathLike), got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"path: no such directory {str(p)!r} (readers load from local directories only)")
    if not p.is_dir():
        raise ValueError(f"path: expected a checkpoint directory, got the file {str(p)!r}")
    if not (p / "config.json").is_file():
        raise ValueError(f"path: {str(p)!r} is not a checkpoint directory (no config.json)")
    has_weights = (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
    if not has_weights:
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise ValueError(f"path: {str(p)!r} holds pickled weights only; readers load safetensors only")
        raise ValueError(f"path: {str(p)!r} has no model weights (model.safetensors or model.safetensors.index.json)")
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise ValueError(f"path: {str(p)!r} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    return p


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected a cpu or cuda device, got {device!r}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "bfloat16", "float16") else None
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    return dtype


def _lora_settings(lora) -> LoraSettings:
    if lora is True:
        return LoraSettings()
    if isinstance(lora, LoraSettings):
        return lora
    if isinstance(lora, dict):
        unknown = set(lora) - {f.name for f in dataclasses.fields(LoraSettings)}
        if unknown:
            raise ValueError(f"lora: unknown settings {sorted(unknown)}; expected r, alpha, dropout, vision")
        return LoraSettings(**lora)
    raise TypeError(
        f"lora: expected None, True, a LoraSettings, a dict (r, alpha, dropout, vision) or an adapter directory, "
        f"got {type(lora).__name__}"
    )


def _from_pretrained(cls, path: Path, kwargs: dict):
    """``cls.from_pretrained``, a damaged weights file reported as one line naming the checkpoint."""
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(path, **kwargs)
    except SafetensorError as exc:
        raise CorruptFile(f"path: a weights file of {str(path)!r} is unreadable ({exc}): truncated or damaged") from exc


def load_reader(
    path: str | os.PathLike,
    quantization: str | None = None,
    lora: bool | dict | LoraSettings | str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    lora_trainable: bool | None = None,
    quantize_vision: bool = True,
    cpu_kernel: str = "dequantize",
) -> Reader:
    """Load a reader from a local checkpoint directory (never the hub: ``local_files_only=True``).

    Args:
        path: checkpoint directory (``config.json``, safetensors weights, tokenizer, image processor).
        quantization: ``None`` (weights in ``dtype``), ``"nf4"`` or ``"int8"`` (bitsandbytes).
        lora: ``None``/``False`` (no adapter), ``True`` / a ``LoraSettings`` / a dict of its fields
            (a fresh adapter), or an adapter directory written by ``save_adapter``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; default CUDA when available.
        dtype: the compute dtype (and the dtype of unquantized weights); default bf16 on CUDA, fp32 on CPU.
        lora_trainable: whether the adapter's weights train; default True for a fresh adapter,
            False for one loaded from a directory. The base weights are always frozen under LoRA.
        quantize_vision: quantize the vision tower and projector too (the HF / LLaMA-Factory default).
        cpu_kernel: the kernel of NF4 layers on the CPU: ``"dequantize"`` (every CPU; has a
            backward) or ``"packed"`` (AVX512-BF16 CPUs, bf16, inference only: the reader's
            parameters are frozen). See ``jomed_fast.readers.quantization``.
    """
    from transformers import AutoConfig

    p = check_checkpoint_dir(path)
    verify_dir(p)  # checkpoints written by jomed_fast (tiny.build) carry a manifest; hub ones do not
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: expected one of {QUANTIZATIONS}, got {quantization!r}")
    dev = _resolve_device(device)
    compute_dtype = _resolve_dtype(dtype, dev)
    adapter_dir = None
    if isinstance(lora, (str, os.PathLike)):
        adapter_dir = check_adapter_dir(lora)
    elif lora is not None and lora is not False:
        lora = _lora_settings(lora)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - one clear error for any unreadable config
        raise ValueError(f"path: cannot read the config of {str(p)!r}: {exc}") from exc
    facts = family_of(config)
    family, cls = facts.name, facts.model_class
    trainable = (
        adapter_dir is not None
        and bool(lora_trainable)
        or (isinstance(lora, LoraSettings) and lora_trainable is not False)
    )
    kernel = _quant.resolve_cpu_kernel(cpu_kernel, quantization, dev, trainable)
    processor = ReaderProcessor.from_pretrained(p, facts)

    kwargs: dict[str, Any] = dict(local_files_only=True, dtype=compute_dtype)
    misfits: list[str] = []
    if quantization is not None:
        keep = () if quantize_vision else facts.vision_modules
        kept, misfits = _quant.unquantizable_layers(cls, config, quantization, keep)
        if misfits:
            warnings.warn(
                f"quantization={quantization!r}: {len(misfits)} linear layers of {str(p)!r} stay in {compute_dtype} "
                f"({_quant.LAYOUT_RULES[quantization].why}): {', '.join(misfits)}",
                stacklevel=2,
            )
        kwargs["quantization_config"] = _quant.quantization_config(quantization, compute_dtype, kept)
    kwargs["device_map"] = {"": dev.index if dev.type == "cuda" else "cpu"}
    model = _from_pretrained(cls, p, kwargs)
    model.eval()
    model.requires_grad_(False)  # frozen until an adapter trains (PEFT turns its own weights on)
    if kernel is not None:
        _quant.set_cpu_kernel(model, kernel)

    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    reader = Reader(
        model=model,
        processor=processor,
        family=family,
        path=p,
        quantization=quantization,
        device=dev,
        compute_dtype=compute_dtype,
        hidden_size=int(text.hidden_size),
        vocab_size=int(text.vocab_size),
        num_layers=int(text.num_hidden_layers),
        num_heads=int(text.num_attention_heads),
        num_kv_heads=int(text.num_key_value_heads or text.num_attention_heads),
        head_dim=int(head_dim),
        image_token_id=int(processor.image_token_id),
        image_token_ids=tuple(int(i) for i in processor.image_token_ids),
        config=config,
        unquantized_layers=tuple(misfits),
        cpu_kernel=kernel,
        facts=facts,
    )
    config_image_id = getattr(config, "image_token_id", None)
    if config_image_id is not None and int(config_image_id) != reader.image_token_id:
        raise ValueError(
            f"path: config image_token_id {config_image_id} differs from the tokenizer's "
            f"{processor.image_token!r} id {reader.image_token_id}"
        )
    if adapter_dir is not None:
        load_adapter(reader, adapter_dir, trainable=bool(lora_trainable))
    elif isinstance(lora, LoraSettings):
        reader.add_lora(lora)
        if lora_trainable is False:
            for prm in reader.lora_parameters().values():
                prm.requires_grad_(False)
    return reader


# ------------------------------------------------------------------------------------------
# Adapters.
# ------------------------------------------------------------------------------------------
def check_adapter_dir(path: str | os.PathLike) -> Path:
    """Raise unless ``path`` is a LoRA adapter directory whose files match their manifest (when it has one)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"lora: no such adapter directory {str(p)!r}")
    if not (p / ADAPTER_CONFIG).is_file() or not (p / ADAPTER_WEIGHTS).is_file():
        raise ValueError(
            f"lora: {str(p)!r} is not a LoRA adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    verify_dir(p)
    return p


def save_adapter(reader: Reader, out_dir: str | os.PathLike, layout: str | None = None) -> Path:
    """Write the reader's LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
    to ``out_dir`` atomically (a temporary directory renamed into place), with ``jomed_adapter.json``:
    family, base, settings and ``layout``, the prompt layout the adapter was trained on (stage 1
    gives it; None records none)."""
    if not reader.has_lora:
        raise ValueError("reader: has no LoRA adapter to save (load it with lora=True or call add_lora)")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        reader.model.save_pretrained(tmp, safe_serialization=True)
        meta = {
            "family": reader.family,
            "base": str(reader.path),
            "lora": dataclasses.asdict(reader.lora) if reader.lora else None,
            "layout": layout,
        }
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")

    return replace_dir_atomically(out, fill)


def _adapter_meta(p: Path) -> dict:
    """``jomed_adapter.json`` of an adapter directory ({} for one written elsewhere, e.g. by PEFT)."""
    f = p / ADAPTER_META
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"lora: {str(f)!r} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"lora: {str(f)!r}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _adapts_vision(p: Path, tower: str) -> bool:
    """Whether the saved adapter holds weights inside the vision tower (read off the tensor names)."""
    from safetensors import safe_open

    with safe_open(str(p / ADAPTER_WEIGHTS), framework="pt") as f:
        return any(f".{tower}." in f".{k}" for k in f.keys())


def check_trained_layout(reader, layout: str, where: str, allow_mismatch: bool = False) -> None:
    """Refuse to score with ``layout`` a reader whose adapter stage 1 trained on another layout
    (a prompt the reader never saw), unless ``allow_mismatch``. ``where`` names the option that
    asked for ``layout``. A reader with no recorded layout (no adapter, or one trained elsewhere)
    passes."""
    trained = getattr(reader, "trained_layout", None)
    if trained is None or trained == layout or allow_mismatch:
        return
    source = getattr(reader, "trained_layout_from", None) or "its adapter"
    raise ValueError(
        f"layout: the reader's adapter was trained (stage 1) on the {trained!r} layout (recorded in "
        f"{source}), but {where} is {layout!r}; use one layout for every stage, or pass "
        "allow_layout_mismatch=True (--allow-layout-mismatch) to score another prompt on purpose"
    )


def load_adapter(reader: Reader, adapter_dir: str | os.PathLike, trainable: bool = False) -> Reader:
    """Load a saved adapter into ``reader`` (in place; also returned).

    A reader without LoRA gets the adapter (``PeftModel.from_pretrained``); a reader with LoRA of
    the same settings has its adapter weights replaced by the saved ones."""
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    p = check_adapter_dir(adapter_dir)
    if trainable:
        reader.use_trainable_kernel()
    saved = LoraConfig.from_pretrained(str(p))
    meta = _adapter_meta(p)
    settings = LoraSettings(
        r=int(saved.r),
        alpha=saved.lora_alpha,
        dropout=float(saved.lora_dropout),
        vision=_adapts_vision(p, reader.family_facts.vision_modules[0]),
    )
    if not reader.has_lora:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            reader.model = PeftModel.from_pretrained(reader.model, str(p), is_trainable=trainable)
        reader.lora = settings
    else:
        if reader.lora is not None and settings != reader.lora:
            raise ValueError(f"lora: the adapter in {str(p)!r} has settings {settings}, the reader has {reader.lora}")
        state = load_file(str(p / ADAPTER_WEIGHTS), device=str(reader.device))
        result = set_peft_model_state_dict(reader.model, state)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise ValueError(f"lora: the adapter in {str(p)!r} does not fit this reader (unexpected {missing[:3]})")
        for prm in reader.lora_parameters().values():
            prm.requires_grad_(trainable)
    reader.trained_layout = meta.get("layout")
    reader.trained_layout_from = str(p / ADAPTER_META) if reader.trained_layout is not None else None
    reader.model.eval()
    return reader


__all__ = [
    "Reader",
    "LoraSettings",
    "QUANTIZATIONS",
    "load_reader",
    "save_adapter",
    "load_adapter",
    "check_checkpoint_dir",
    "check_trained_layout",
    "lora_target_regex",
]
