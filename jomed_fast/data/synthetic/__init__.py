r"""A deterministic synthetic medical-like task and retrieval index (``jomed_fast.data.synthetic``).

It is what the demo, the end-to-end tests and the benchmarks run on: small RGB "breast
ultrasound" images of five findings, question/answer samples for the ``synthetic`` task
(:func:`jomed_fast.tasks.get_task` ``("synthetic")``), and an index of (image, caption) records
built so that retrieval helps, and a better retriever helps more.

Generative model
================
Classes ``c`` in 0..4 (answers ``"0"``..``"4"``): normal tissue, simple cyst, fibroadenoma,
carcinoma, calcifications. Each class has an *appearance* ("look"):

======  =================  ==================================================================
look    finding            rendering
======  =================  ==================================================================
0       normal tissue      tissue bands only (plus a faint iso-echoic fat lobule)
1       simple cyst        round anechoic (very dark) region, sharp smooth wall, bright
                           posterior acoustic enhancement below it
2       fibroadenoma       oval hypoechoic mass, wider than tall, gently lobulated, smooth
3       carcinoma          irregular spiculated hypoechoic mass, taller than wide, echogenic
                           halo, dark posterior acoustic shadow below it
4       calcifications     a cluster of 5-9 punctate bright echogenic foci, no mass
======  =================  ==================================================================

**Prototypes (cases).** Each class has ``prototypes_per_class`` prototypes ``p``, drawn once from
``rng(seed, "prototype", c, p)``: a lesion geometry (centre, size, aspect, tilt, boundary
harmonics, calcification offsets) and the tissue-band pattern. With probability
``atypical_rate`` a prototype is *atypical*: it is rendered with the look of a confusable class
(``ATYPICAL_LOOK``: cyst->fibroadenoma, fibroadenoma->cyst, carcinoma->fibroadenoma (the
circumscribed carcinoma), normal->calcifications (benign echogenic artefacts),
calcifications->normal (too faint to see)) while its label stays ``c``. With ``atypical_cue``
``w > 0`` every rendering of an atypical case blends in ``w`` of its lesion as its own class would
render it (the faint posterior shadow and halo of a circumscribed carcinoma, the weaker
enhancement of a cyst-like fibroadenoma, ...): a subtle signature of the true class under the
confusable look, as real mimics have. A retriever that weighs it brings records of the right
diagnosis for atypical queries; a retriever that matches the gross look does not.

**Rendering.** ``x = render(prototype, jitter, visibility v, fresh speckle)``: position jitter
(``N(0, 0.025 S)`` px for image size ``S``), size jitter (x``N(1, 0.05)``), tissue-band phase
jitter; the lesion's contrast against tissue, its posterior effect and halo are scaled by
``v ~ U(visibility)``; multiplicative Rayleigh speckle (2x2 grains); depth attenuation; gain
jitter; grey replicated to RGB uint8. Renderings of one prototype are close in pixel space,
renderings of two prototypes of the same look are not.

**Samples.** ``train``/``val``/``test``: labels balanced (a seeded permutation of ``i mod C``),
a uniformly chosen prototype of the label's class, one rendering. Training samples come from the
first ``ceil(train_prototype_fraction * P)`` prototypes of each class, val/test samples from the
others: test cases are new to a reader trained on ``train`` (it cannot memorise them), while the
index covers every case. With probability ``label_noise`` the stored label is replaced by a
uniformly chosen other class (``meta.noisy``; ``meta.true_label`` keeps the truth). So from the
image alone a reader learns each look (far above the 20% chance) but mislabels atypical cases and
faint renderings (far below 100%; a nearest-centroid classifier on intensity quantiles + an 8x8
thumbnail scores about 0.4-0.5), while the top-1 caption of a case-level retriever (pixel L2 at
half resolution) is right about 90% of the time and a look-level one (8x8 thumbnails) about 70%.

**Index** (``index_size`` records; kinds shuffled by a seeded permutation, ids stable):

* *relevant* (``relevant_fraction``): a fresh rendering of prototype ``j mod P`` (round-robin over
  all prototypes, so each has the same number of records) whose caption names its class and
  findings in words ("breast ultrasound showing an irregular spiculated hypoechoic mass with
  posterior acoustic shadowing, consistent with carcinoma."; atypical prototypes: "... an oval
  circumscribed hypoechoic mass (atypical appearance); biopsy-proven carcinoma."). A retriever
  that matches *this case* (fine image similarity) brings the right diagnosis even for atypical
  prototypes; one that matches only the look brings the look's class. With probability
  ``hedged_rate`` a typical record's diagnosis is *hedged* as an impression ("..., possibly
  carcinoma.", "..., cannot exclude fibroadenoma."; ``meta.hedged``).
* *misleading* (``misleading_fraction``): the typical look of a class ``a`` with a fresh geometry
  that belongs to no prototype, captioned with another class ``b != a``'s findings and name, always
  hedged (an impression that biopsy did not confirm). A coarse (look-level) retriever brings them
  as readily as relevant ones; a case-level one does not. Hedged captions are right only part of
  the time, confirmed ones always: the wording tells a reader how far to trust a record, while
  the base retriever has no reason to care (the words say nothing about the image).
* *distractor* (the rest): other modalities (chest radiograph, fundus photograph, dermoscopy,
  histology) with unrelated captions.

Everything is a pure function of ``(config, item index)``: every sample and record is drawn from
its own ``numpy`` generator seeded by ``SeedSequence([seed, stream, index])``, so any slice of a
100k-record index can be rendered alone (``SyntheticGenerator.index_record(i)``), in any order,
in parallel, with identical results. The same seed gives identical bytes on disk; another seed
gives other data.

On disk (:func:`write_synthetic`; every file written atomically, ``manifest.json`` last)::

    out_dir/manifest.json                   config, counts, sha256 of each JSONL file
    out_dir/{train,val,test}.jsonl          {"id", "image_path", "answer", "meta"}
    out_dir/index.jsonl                     {"id", "image_path", "text", "meta"}
    out_dir/images/{train,val,test,index}/<id>.png

:func:`load_synthetic` reads them back through the JSONL loader (identical ids, answers, labels,
captions, metadata and pixels).

Modules: :mod:`.config` (classes, random streams, :class:`SyntheticConfig`, :class:`Prototype`),
:mod:`.render` (lesion geometry, ultrasound and distractor images), :mod:`.captions` (the
wording), :mod:`.generator` (:class:`SyntheticGenerator`: prototypes, splits, index), :mod:`.dataset`
(:class:`SyntheticDataset`: all of it in memory),
:mod:`.disk` (:func:`write_synthetic`, :func:`load_synthetic`).
"""

from .captions import (
    CLASS_KEYWORDS,
    DIAGNOSIS,
    FINDINGS,
    caption_for,
    distractor_caption,
)
from .config import (
    ATYPICAL_LOOK,
    CALCIFICATIONS,
    CARCINOMA,
    CYST,
    DISTRACTOR_MODALITIES,
    FIBROADENOMA,
    GENERATOR_VERSION,
    NORMAL,
    NUM_CLASSES,
    SPLITS,
    Prototype,
    SyntheticConfig,
)
from .dataset import SyntheticDataset
from .disk import MANIFEST, images_array, load_synthetic, write_synthetic
from .generator import SyntheticGenerator, generate
from .render import (
    JITTER_BAND,
    JITTER_POS,
    JITTER_SCALE,
    render_distractor,
    render_ultrasound,
)

__all__ = [
    "ATYPICAL_LOOK",
    "CALCIFICATIONS",
    "CARCINOMA",
    "CLASS_KEYWORDS",
    "CYST",
    "DIAGNOSIS",
    "DISTRACTOR_MODALITIES",
    "FIBROADENOMA",
    "FINDINGS",
    "GENERATOR_VERSION",
    "JITTER_BAND",
    "JITTER_POS",
    "JITTER_SCALE",
    "MANIFEST",
    "NORMAL",
    "NUM_CLASSES",
    "SPLITS",
    "Prototype",
    "SyntheticConfig",
    "SyntheticDataset",
    "SyntheticGenerator",
    "caption_for",
    "distractor_caption",
    "generate",
    "images_array",
    "load_synthetic",
    "render_distractor",
    "render_ultrasound",
    "write_synthetic",
]
