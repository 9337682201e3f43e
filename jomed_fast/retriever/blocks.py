"""A tower's transformer blocks and the modules after them, found in its module tree.

Families name the block stack differently: HF CLIP / SigLIP ``encoder.layers``, BERT-style text
towers ``encoder.layer``, EVA and timm ViTs ``blocks``, open_clip's own towers
``transformer.resblocks``. ``find_blocks`` looks for ``nn.ModuleList`` s (timm: ``nn.Sequential``) under those names and takes
the one holding the most parameters: the stack itself, never a list nested inside one block
(which holds a fraction of one block's parameters), nor an empty or parameter-free list.

``modules_after`` returns what follows the stack to the tower's output, in registration order,
which is forward order in every family above (``post_layernorm`` then ``head`` in SigLIP; ``norm``,
``fc_norm``, ``head`` in EVA): the modules registered after the stack in its parent, then after
that parent in its own parent, up to the tower.
"""

from __future__ import annotations

from torch import nn

__all__ = ["BLOCK_LIST_NAMES", "find_blocks", "modules_after"]

BLOCK_LIST_NAMES = ("blocks", "layers", "layer", "resblocks")


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(tower: nn.Module, name: str) -> tuple[str, nn.ModuleList | nn.Sequential]:
    """``(dotted path under tower, the block list)``; ``name`` names the tower in the error."""
    found = [
        (path, module)
        for path, module in tower.named_modules()
        if isinstance(module, (nn.ModuleList, nn.Sequential))
        and path.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES
        and _size(module) > 0
    ]
    if not found:
        raise ValueError(
            f"{name}: expected a ModuleList (or Sequential) of transformer blocks named one of {', '.join(BLOCK_LIST_NAMES)} "
            f"in {type(tower).__name__}, found none"
        )
    # most parameters first; among equals the deepest path (a wrapper list around the real one)
    return max(found, key=lambda item: (_size(item[1]), item[0].count(".")))


def modules_after(tower: nn.Module, path: str) -> list[nn.Module]:
    """The modules registered after ``tower.<path>`` on its way up to ``tower`` (see module docstring)."""
    parts = path.split(".")
    after: list[nn.Module] = []
    for depth in range(len(parts), 0, -1):
        parent = tower.get_submodule(".".join(parts[: depth - 1])) if depth > 1 else tower
        names = list(parent._modules)
        after.extend(m for m in list(parent._modules.values())[names.index(parts[depth - 1]) + 1 :] if m is not None)
    return after
