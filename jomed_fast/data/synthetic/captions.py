"""Captions in words: the diagnosis names, the findings of each look, the report / impression
wording of a diagnosis, and the unrelated captions of the distractor modalities.

A caption draws its phrases from the ``rng`` it is given, in a fixed order (modality, verb,
finding, diagnosis wording): the same generator state gives the same caption.
"""

from __future__ import annotations

import numpy as np

from .config import CALCIFICATIONS, CARCINOMA, CYST, FIBROADENOMA, NORMAL

# Diagnosis names as captions use them (they contain the class name of the task's legend).
DIAGNOSIS = {
    NORMAL: "normal breast tissue",
    CYST: "a simple cyst",
    FIBROADENOMA: "fibroadenoma",
    CARCINOMA: "carcinoma",
    CALCIFICATIONS: "calcifications",
}
# Words that name a class in a caption (tests check that relevant captions contain one).
CLASS_KEYWORDS = {
    NORMAL: ("normal breast tissue",),
    CYST: ("simple cyst",),
    FIBROADENOMA: ("fibroadenoma",),
    CARCINOMA: ("carcinoma",),
    CALCIFICATIONS: ("calcifications",),
}
# Findings in words, per look.
FINDINGS = {
    NORMAL: (
        "homogeneous fibroglandular tissue without a focal mass",
        "normal layered breast parenchyma with no focal lesion",
        "regular tissue planes and no discrete mass",
    ),
    CYST: (
        "a round anechoic lesion with a thin smooth wall and posterior acoustic enhancement",
        "a well-circumscribed anechoic round lesion with through-transmission",
        "an anechoic circumscribed round structure with posterior enhancement",
    ),
    FIBROADENOMA: (
        "an oval circumscribed hypoechoic mass, wider than tall, with gentle lobulation",
        "a smooth oval hypoechoic mass with parallel orientation",
        "a well-defined oval hypoechoic solid mass, wider than tall",
    ),
    CARCINOMA: (
        "an irregular spiculated hypoechoic mass, taller than wide, with posterior acoustic shadowing",
        "an irregular hypoechoic mass with angular spiculated margins and an echogenic halo",
        "a spiculated taller-than-wide hypoechoic mass casting a posterior shadow",
    ),
    CALCIFICATIONS: (
        "clustered punctate echogenic foci without a discrete mass",
        "a cluster of bright punctate echogenic foci",
        "grouped microcalcifications seen as punctate echogenic foci",
    ),
}
_MODALITY = ("breast ultrasound", "ultrasound image", "B-mode breast ultrasound", "sonogram of the breast")
_VERB = ("showing", "demonstrating", "revealing", "with")
# A report states its diagnosis firmly; an impression hedges it (``hedged_rate`` of the typical
# relevant records, and every misleading one): hedged statements are right only part of the time.
_DX = ("consistent with {}", "compatible with {}", "suggestive of {}", "in keeping with {}")
_DX_HEDGED = ("possibly {}", "cannot exclude {}", "differential includes {}", "equivocal for {}")

_DISTRACTOR_CAPTIONS = {
    "chest_xray": (
        "frontal chest radiograph with clear lung fields and a normal cardiac silhouette",
        "chest x-ray showing bilateral perihilar opacities",
        "posteroanterior chest film with a right lower lobe consolidation",
        "chest radiograph with a small left pleural effusion",
    ),
    "fundus": (
        "color fundus photograph with a healthy optic disc and macula",
        "fundus photograph showing scattered dot-blot hemorrhages",
        "retinal photograph with hard exudates near the fovea",
        "fundus image with an enlarged optic cup",
    ),
    "dermoscopy": (
        "dermoscopy of a symmetric melanocytic nevus with a regular pigment network",
        "dermoscopic image of a seborrheic keratosis with comedo-like openings",
        "dermoscopy showing a pink vascular lesion with lacunae",
        "dermoscopic view of a brown macule with a reticular pattern",
    ),
    "histology": (
        "H&E section of colonic mucosa with regular crypts",
        "histology of a lymph node with reactive follicles",
        "H&E stained liver section with mild steatosis",
        "photomicrograph of skeletal muscle fibers",
    ),
}


def caption_for(label: int, look: int, rng: np.random.Generator, hedged: bool = False) -> str:
    """A caption naming the findings of ``look`` and the diagnosis ``label`` (``hedged``: as an impression)."""
    mod = _MODALITY[int(rng.integers(len(_MODALITY)))]
    verb = _VERB[int(rng.integers(len(_VERB)))]
    finding = FINDINGS[look][int(rng.integers(len(FINDINGS[look])))]
    if hedged:
        dx = _DX_HEDGED[int(rng.integers(len(_DX_HEDGED)))].format(DIAGNOSIS[label])
        text = f"{mod} {verb} {finding}, {dx}."
    elif look == label:
        dx = _DX[int(rng.integers(len(_DX)))].format(DIAGNOSIS[label])
        text = f"{mod} {verb} {finding}, {dx}."
    else:
        text = f"{mod} {verb} {finding} (atypical appearance); biopsy-proven {DIAGNOSIS[label].removeprefix('a ')}."
    return text[0].upper() + text[1:]


def _misleading_caption(named: int, rng: np.random.Generator) -> str:
    """A misleading record's caption: ``named``'s typical findings and name, always hedged."""
    return caption_for(named, named, rng, hedged=True)


def distractor_caption(modality: str, rng: np.random.Generator) -> str:
    """One of ``modality``'s unrelated captions, as a sentence."""
    caps = _DISTRACTOR_CAPTIONS[modality]
    text = caps[int(rng.integers(len(caps)))]
    return text[0].upper() + text[1:] + "."


def caption_vocabulary() -> list[str]:
    """Every phrase the captions are assembled from (so it covers their whole word vocabulary)."""
    phrases = [
        *_MODALITY,
        *_VERB,
        *(d.format("") for d in (*_DX, *_DX_HEDGED)),
        "atypical appearance biopsy-proven",
    ]
    phrases += [str(v) for v in DIAGNOSIS.values()]
    phrases += [f for fs in FINDINGS.values() for f in fs]
    phrases += [c for cs in _DISTRACTOR_CAPTIONS.values() for c in cs]
    return phrases
