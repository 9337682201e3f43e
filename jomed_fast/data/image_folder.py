"""An image folder with one subfolder per class (``SRC/<label>/*.png``) as samples of a task.

A subfolder's name is one of the task's labels (``"Yes"``) or label names (``"Signs of cancer"``),
compared after the task's normalisation (case and spacing); any other subfolder, or a task without
a label set, is an error naming it. Images are the files with the endings of :data:`IMAGE_ENDINGS`,
taken in sorted order (the samples' order, and so the seeded splits, do not depend on the file
system's); each sample's id is ``<subfolder>/<file stem>`` and its image path the file itself.
"""

from __future__ import annotations

from pathlib import Path

from ..tasks import Task, normalize
from .records import Sample

__all__ = ["IMAGE_ENDINGS", "image_folder_samples"]

IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _class_of_folder(task: Task) -> dict[str, int]:
    names: dict[str, int] = {}
    for c, label in enumerate(task.labels):
        names[normalize(label)] = c
    for c, name in enumerate(task.label_names):
        names.setdefault(normalize(name), c)
    return names


def image_folder_samples(src, task: Task) -> list[Sample]:
    """The samples of ``src``'s class subfolders (module docstring), each with its class's
    canonical answer (``task.format_answer``); an empty folder is an error."""
    root = Path(src)
    if not root.is_dir():
        raise ValueError(f"--src: expected a folder of class subfolders, got {root} (not a folder)")
    if task.is_multilabel or not task.has_label_set:
        raise ValueError(f"--task: an image folder holds one class per subfolder; task {task.name!r} is {task.kind}")
    classes = _class_of_folder(task)
    samples: list[Sample] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        c = classes.get(normalize(folder.name))
        if c is None:
            known = ", ".join(repr(x) for x in task.labels)
            raise ValueError(
                f"--src: subfolder {folder.name!r} of {root} is not a class of task {task.name!r} (labels {known}"
                + (f"; or their names {', '.join(repr(x) for x in task.label_names)})" if task.label_names else ")")
            )
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_ENDINGS)
        for f in files:
            samples.append(
                Sample(
                    id=f"{folder.name}/{f.stem}", image_path=str(f.absolute()), answer=task.format_answer(c), label=c
                )
            )
    if not samples:
        raise ValueError(f"--src: no images ({', '.join(IMAGE_ENDINGS)}) in the class subfolders of {root}")
    return samples
