"""The paper's tasks (JOMED, arXiv 2508.17394) and the synthetic demo task, as data.

Two prompt variants (``PROMPT_STYLES``), the same labels, answers and label order:

``paper`` (default) — the appendix listings word for word (PAPER.md, "Prompts"): the retrieved
context ``"background:{text}"`` with no space after the colon, followed by the listing's own
separator (``"\n\n"`` Breast and Derma, ``"\n"`` Retina and VQA, ``" "`` VinDr-PCXR and BRSET);
the label legend (Derma, VinDr-PCXR, BRSET) *before* the query image, ``"Provide answer according
to the labels:\n"`` then ``"{i} - '{name}'"`` one per line (joined by ``"\n"``), then ``"\n\n"``;
the question after the query image (VinDr-PCXR's ends with ``" Answer:"``, as printed; BRSET's
has no question mark; VQA writes the sample's question followed by ``"?"``). The label names are
the listings' spellings, ``'Brocho-pneumonia'`` included; BRSET's order is the listing's
(``0 - 'no findings'`` ... ``13 - 'other'``).

``reference`` — the authors' code, github.com/Nirmaz/JOMED (commit b7d186d), where it differs:

* the retrieved context is ``"background: {text}\n\n"`` for every task (``src/jomed.py``, Qwen
  path, ``add_retrieve_text_to_prompt``);
* Derma's legend comes after the query image, right before the question, each line ending in
  ``"\n"`` and one more ``"\n"`` after the last (``src/tasks/cr_qa_derma.py``);
* VQA (``src/tasks/vqa_rad.py``) writes the sample's question as it is, no ``"?"``;
* Breast (``cr_qa_breast.py``) and Retina (``cr_qa_retina.py``: lower-case "what") ask the
  listings' questions; Breast's answers are "Yes"/"No" (its ``cal_acc`` reads "No" as 0), Retina's
  "0".."4" (its ``targets`` list has a typo, "5" for "4"; its ``cal_acc`` uses 0..4);
* VinDr-PCXR and BRSET (``src/tasks/multi_label.py``) read the question from each sample and
  hold no prompt text; their reference variants put the listings' legends where the code puts
  Derma's (after the query image) before the listings' questions.

A reference variant is named ``<task>_reference`` (``get_task(name, prompts="reference")``), so
that every identity and score cache, which name the task, tells the variants apart. A sample's
own question, when present, overrides the fixed one (``Task.prompt(question)``).
"""

from __future__ import annotations

from .spec import Task

REFERENCE = "github.com/Nirmaz/JOMED@b7d186d"
PAPER = "arXiv 2508.17394, appendix listings"
PROMPT_STYLES = ("paper", "reference")

LEGEND_HEADER = "Provide answer according to the labels:\n"


def legend_instructions(names: tuple[str, ...], header: str = LEGEND_HEADER, footer: str = "\n") -> str:
    """``header`` + ``"{i} - '{name}'\\n"`` per class + ``footer`` (the reference's Derma layout)."""
    return header + "".join(f"{i} - '{n}'\n" for i, n in enumerate(names)) + footer


def paper_legend(names: tuple[str, ...]) -> str:
    """The listings' legend: the header, ``"{i} - '{name}'"`` one per line, then a blank line."""
    return LEGEND_HEADER + "\n".join(f"{i} - '{n}'" for i, n in enumerate(names)) + "\n\n"


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

# VinDr-PCXR's 15 labels as the listing prints them ("Brocho-pneumonia" as printed).
VINDR_PCXR_NAMES = (
    "No finding",
    "Bronchitis",
    "Brocho-pneumonia",
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

# BRSET's 14 labels in the listing's order (index 0 is 'no findings').
BRSET_NAMES = (
    "no findings",
    "diabetic_retinopathy",
    "macular_edema",
    "scar",
    "nevus",
    "amd",
    "vascular_occlusion",
    "hypertensive_retinopathy",
    "drusens",
    "hemorrhage",
    "retinal_detachment",
    "myopic_fundus",
    "increased_cup_disc",
    "other",
)

VINDR_PCXR_QUESTION = (
    "Question: Look at this X-ray scan and select all abnormalities you see from the given labels Answer:"
)
BRSET_QUESTION = "Question: Look at retinal fundus image and select all abnormalities you see from the given labels"

# The synthetic demo task (jomed_fast.data.synthetic renders its images and captions).
SYNTHETIC_NAMES = ("Normal tissue", "Simple cyst", "Fibroadenoma", "Carcinoma", "Calcifications")

REFERENCE_CONTEXT = "background: {text}\n\n"


def _style(prompts: str, paper: dict, reference: dict, source: str) -> dict:
    """The prompt fields of one task in the variant ``prompts``."""
    if prompts == "paper":
        return {**paper, "prompt_source": f"{PAPER} ({source})"}
    return {"context_template": REFERENCE_CONTEXT, **reference}


def _legend_paper(names: tuple[str, ...], context: str) -> dict:
    return {
        "instructions": paper_legend(names),
        "instructions_position": "before_query_image",
        "context_template": context,
    }


def builtin_tasks(prompts: str = "paper") -> list[Task]:
    """The registered tasks with the prompts of ``prompts`` (one of :data:`PROMPT_STYLES`); the
    reference variants are named ``<task>_reference`` (the synthetic task has one variant only)."""
    if prompts not in PROMPT_STYLES:
        raise ValueError(f"prompts: expected one of {PROMPT_STYLES}, got {prompts!r}")
    suffix = "" if prompts == "paper" else "_reference"
    multi_ref = (
        f"{REFERENCE} src/tasks/multi_label.py reads the question from the sample and has no instructions; "
        "the listing's legend and question here, the legend where the code puts Derma's"
    )
    tasks = [
        Task(
            name="breast" + suffix,
            kind="binary",
            labels=("No", "Yes"),
            label_names=("No signs of cancer", "Signs of cancer"),
            question="Does this breast ultrasound image show signs of cancer?",
            source_label_map=(1, 0),  # BreastMNIST: 0 = malignant -> "Yes", 1 = normal/benign -> "No"
            description="BreastMNIST ultrasound, malignant vs normal/benign",
            **_style(
                prompts,
                {"context_template": "background:{text}\n\n"},
                {"prompt_source": f"{REFERENCE} src/tasks/cr_qa_breast.py"},
                "Breast",
            ),
        ),
        Task(
            name="derma" + suffix,
            kind="multiclass",
            labels=_digits(7),
            label_names=DERMA_NAMES,
            question="What type of skin lesion does the patient have?",
            description="DermaMNIST (HAM10000) dermatoscopy, 7 classes",
            **_style(
                prompts,
                _legend_paper(DERMA_NAMES, "background:{text}\n\n"),
                {
                    "instructions": legend_instructions(DERMA_NAMES),
                    "prompt_source": f"{REFERENCE} src/tasks/cr_qa_derma.py",
                },
                "Derma",
            ),
        ),
        Task(
            name="retina" + suffix,
            kind="multiclass",
            labels=_digits(5),
            label_names=RETINA_NAMES,
            question="what is the severity of diabetic retinopathy?",
            description="RetinaMNIST fundus, diabetic-retinopathy grade 0-4",
            **_style(
                prompts,
                {"context_template": "background:{text}\n"},
                {"prompt_source": f"{REFERENCE} src/tasks/cr_qa_retina.py"},
                "Retina",
            ),
        ),
        Task(
            name="vindr_pcxr" + suffix,
            kind="multilabel",
            labels=_digits(15),
            label_names=VINDR_PCXR_NAMES,
            question=VINDR_PCXR_QUESTION,
            description="VinDr-PCXR pediatric chest X-ray, 15 image-level labels, multi-label",
            **_style(
                prompts,
                _legend_paper(VINDR_PCXR_NAMES, "background:{text} "),
                {"instructions": legend_instructions(VINDR_PCXR_NAMES), "prompt_source": multi_ref},
                "VinDr-PCXR",
            ),
        ),
        Task(
            name="brset" + suffix,
            kind="multilabel",
            labels=_digits(14),
            label_names=BRSET_NAMES,
            question=BRSET_QUESTION,
            description="BRSET retinal fundus photographs, 14 labels, multi-label",
            **_style(
                prompts,
                _legend_paper(BRSET_NAMES, "background:{text} "),
                {"instructions": legend_instructions(BRSET_NAMES), "prompt_source": multi_ref},
                "BRSET",
            ),
        ),
        *[
            Task(
                name=f"{base}_{kind.split('_')[1]}" + suffix,
                kind=kind,
                labels=("no", "yes") if kind == "vqa_closed" else (),
                question=None,
                description=f"{title}, {'closed (yes/no)' if kind == 'vqa_closed' else 'open'} questions",
                **_style(
                    prompts,
                    {"context_template": "background:{text}\n", "question_template": "{question}?"},
                    {
                        "prompt_source": f"{REFERENCE} src/tasks/vqa_rad.py (question from the sample, empty instructions)"
                    },
                    "VQA",
                ),
            )
            for base, title in (
                ("vqa_rad", "VQA-RAD"),
                ("slake", "SLAKE (English)"),
                ("pathvqa", "PathVQA"),
            )
            for kind in ("vqa_closed", "vqa_open")
        ],
    ]
    if prompts == "paper":
        tasks.append(
            Task(
                name="synthetic",
                kind="multiclass",
                labels=_digits(len(SYNTHETIC_NAMES)),
                label_names=SYNTHETIC_NAMES,
                question="What type of lesion does this breast ultrasound image show?",
                instructions=legend_instructions(SYNTHETIC_NAMES),
                description="jomed_fast.data.synthetic: seeded ultrasound-like lesions with an index built for retrieval",
                prompt_source="jomed_fast (Derma legend style)",
            )
        )
    return tasks


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
