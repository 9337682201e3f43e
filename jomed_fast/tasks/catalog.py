"""The paper's tasks (JOMED, arXiv 2508.17394) and the synthetic demo task, as data.

Prompt strings are taken from the reference implementation, github.com/Nirmaz/JOMED (commit
b7d186d), where it has them; each task's ``prompt_source`` says where its strings come from:

* Breast — ``src/tasks/cr_qa_breast.py``: question "Does this breast ultrasound image show signs of
  cancer?", no instructions; answers "Yes"/"No" (its ``cal_acc`` reads "No" as 0, "Yes" as 1).
* Derma — ``src/tasks/cr_qa_derma.py``: question "What type of skin lesion does the patient
  have?" after the legend "Provide answer according to the labels:\\n0 - 'Actinic keratoses and
  intraepithelial carcinoma'\\n..." (answers "0".."6").
* Retina — ``src/tasks/cr_qa_retina.py``: question "what is the severity of diabetic
  retinopathy?" (lower-case "what", as in the reference), no instructions; answers "0".."4"
  (the reference's ``targets`` list has a typo, "5" for "4"; its ``cal_acc`` uses 0..4).
* VQA-RAD, SLAKE-English, PathVQA — ``src/tasks/vqa_rad.py``: the question is the sample's own,
  instructions are empty; closed answers "yes"/"no".
* VinDr-PCXR, BRSET — ``src/tasks/multi_label.py`` reads the question from each sample and
  sets no instructions, so the repository holds no prompt text for them; the legends here list
  the datasets' own label names (VinDr-PCXR's 15 image-level diagnoses, BRSET's 13 diseases +
  normal) in the reference's Derma legend style, followed by the answer format (comma-separated
  label indices, as the reference's multi-label scorer reads them). A sample's own question, when
  present, overrides the fixed one (``Task.prompt(question)``).
* The retrieved-context text ``"background: {text}\\n\\n"`` is ``src/jomed.py`` (Qwen path,
  ``add_retrieve_text_to_prompt``).
"""

from __future__ import annotations

from .spec import Task

REFERENCE = "github.com/Nirmaz/JOMED@b7d186d"

LEGEND_HEADER = "Provide answer according to the labels:\n"


def legend_instructions(names: tuple[str, ...], header: str = LEGEND_HEADER, footer: str = "\n") -> str:
    """``header`` + ``"{i} - '{name}'\\n"`` per class + ``footer`` (the reference's Derma layout)."""
    return header + "".join(f"{i} - '{n}'\n" for i, n in enumerate(names)) + footer


def _digits(n: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(n))


DERMA_NAMES = (
    "Actinic keratoses and intraepithelial carcinoma",
    "Basal cell carcinoma",
    "Benign keratosis-like lesions",
    "Dermatofibroma",
    "Melanoma",
    "Melanocytic nevi",
    "Vascular lesions",
)

RETINA_NAMES = ("No DR", "Mild NPDR", "Moderate NPDR", "Severe NPDR", "Proliferative DR")

# VinDr-PCXR (PhysioNet vindr-pcxr 1.0.0) image-level diagnoses, in the dataset's column order.
VINDR_PCXR_NAMES = (
    "No finding",
    "Bronchitis",
    "Broncho-pneumonia",
    "Other disease",
    "Bronchiolitis",
    "Situs inversus",
    "Pneumonia",
    "Pleuro-pneumonia",
    "Diaphragmatic hernia",
    "Tuberculosis",
    "Congenital emphysema",
    "CPAM",
    "Hyaline membrane disease",
    "Mediastinal tumor",
    "Lung tumor",
)

# BRSET (PhysioNet brazilian-ophthalmological 1.0.0): the 13 disease columns, then normal.
BRSET_NAMES = (
    "Diabetic retinopathy",
    "Macular edema",
    "Scar",
    "Nevus",
    "Age-related macular degeneration",
    "Vascular occlusion",
    "Hypertensive retinopathy",
    "Drusens",
    "Hemorrhage",
    "Retinal detachment",
    "Myopic fundus",
    "Increased cup disc",
    "Other",
    "Normal",
)

MULTILABEL_FOOTER = "Answer with every label that applies, as label numbers separated by commas.\n\n"

# The synthetic demo task (jomed_fast.data.synthetic renders its images and captions).
SYNTHETIC_NAMES = ("Normal tissue", "Simple cyst", "Fibroadenoma", "Carcinoma", "Calcifications")

_VQA_NOTE = f"{REFERENCE} src/tasks/vqa_rad.py (question from the sample, empty instructions)"
_MULTI_NOTE = (
    f"{REFERENCE} src/tasks/multi_label.py reads the question from the sample and has no instructions; "
    "question and legend here are jomed_fast's (dataset label names, reference Derma legend style)"
)


def builtin_tasks() -> list[Task]:
    return [
        Task(
            name="breast",
            kind="binary",
            labels=("No", "Yes"),
            label_names=("No signs of cancer", "Signs of cancer"),
            question="Does this breast ultrasound image show signs of cancer?",
            instructions="",
            source_label_map=(1, 0),  # BreastMNIST: 0 = malignant -> "Yes", 1 = normal/benign -> "No"
            description="BreastMNIST ultrasound, malignant vs normal/benign",
            prompt_source=f"{REFERENCE} src/tasks/cr_qa_breast.py",
        ),
        Task(
            name="derma",
            kind="multiclass",
            labels=_digits(7),
            label_names=DERMA_NAMES,
            question="What type of skin lesion does the patient have?",
            instructions=legend_instructions(DERMA_NAMES),
            description="DermaMNIST (HAM10000) dermatoscopy, 7 classes",
            prompt_source=f"{REFERENCE} src/tasks/cr_qa_derma.py",
        ),
        Task(
            name="retina",
            kind="multiclass",
            labels=_digits(5),
            label_names=RETINA_NAMES,
            question="what is the severity of diabetic retinopathy?",
            instructions="",
            description="RetinaMNIST fundus, diabetic-retinopathy grade 0-4",
            prompt_source=f"{REFERENCE} src/tasks/cr_qa_retina.py",
        ),
        Task(
            name="vindr_pcxr",
            kind="multilabel",
            labels=_digits(15),
            label_names=VINDR_PCXR_NAMES,
            question="Which diagnoses does this pediatric chest X-ray show?",
            instructions=legend_instructions(VINDR_PCXR_NAMES, footer=MULTILABEL_FOOTER),
            description="VinDr-PCXR pediatric chest X-ray, 15 image-level labels, multi-label",
            prompt_source=_MULTI_NOTE,
        ),
        Task(
            name="brset",
            kind="multilabel",
            labels=_digits(14),
            label_names=BRSET_NAMES,
            question="Which conditions does this retinal fundus photograph show?",
            instructions=legend_instructions(BRSET_NAMES, footer=MULTILABEL_FOOTER),
            description="BRSET retinal fundus photographs, 14 labels, multi-label",
            prompt_source=_MULTI_NOTE,
        ),
        *[
            Task(
                name=f"{base}_{kind.split('_')[1]}",
                kind=kind,
                labels=("no", "yes") if kind == "vqa_closed" else (),
                question=None,
                instructions="",
                description=f"{title}, {'closed (yes/no)' if kind == 'vqa_closed' else 'open'} questions",
                prompt_source=_VQA_NOTE,
            )
            for base, title in (
                ("vqa_rad", "VQA-RAD"),
                ("slake", "SLAKE (English)"),
                ("pathvqa", "PathVQA"),
            )
            for kind in ("vqa_closed", "vqa_open")
        ],
        Task(
            name="synthetic",
            kind="multiclass",
            labels=_digits(len(SYNTHETIC_NAMES)),
            label_names=SYNTHETIC_NAMES,
            question="What type of lesion does this breast ultrasound image show?",
            instructions=legend_instructions(SYNTHETIC_NAMES),
            description="jomed_fast.data.synthetic: seeded ultrasound-like lesions with an index built for retrieval",
            prompt_source="jomed_fast (Derma legend style)",
        ),
    ]


ALIASES = {
    "breastmnist": "breast",
    "dermamnist": "derma",
    "retinamnist": "retina",
    "pcxr": "vindr_pcxr",
    "vindr": "vindr_pcxr",
    "vqa_rad": "vqa_rad_closed",
    "vqarad": "vqa_rad_closed",
    "slake": "slake_closed",
    "slake_english": "slake_closed",
    "slake_en": "slake_closed",
    "pathvqa": "pathvqa_closed",
    "path_vqa": "pathvqa_closed",
}
