"""The paper's prompts, word for word: every task's rendered prompt against the listing in PAPER.md.

PAPER.md (``/work/shared/PAPER.md``, section "Prompts") is parsed here, at test time, so the test
does not read the catalog's copy of the text: each bullet's backtick spans, ``\\n`` read as a
newline; a legend's label spans joined one per line between the frame's opening and closing spans
(BRSET's "same frame" is VinDr-PCXR's opening). The rendered prompt is the ``paper`` layout's user
turn with a retrieved (image, text) pair, images written as the listing's placeholders.
"""

import re
from pathlib import Path

import pytest

from jomed_fast import prompts
from jomed_fast.tasks import get_task, legend_instructions

PAPER = Path("/work/shared/PAPER.md")
QUERY, RETRIEVED = object(), object()
TASKS = {
    "Breast": ["breast"],
    "Retina": ["retina"],
    "Derma": ["derma"],
    "VinDr-PCXR": ["vindr_pcxr"],
    "BRSET": ["brset"],
    "VQA": [f"{b}_{k}" for b in ("vqa_rad", "slake", "pathvqa") for k in ("closed", "open")],
}
LABEL = re.compile(r"^(\d+) - '(.*)'$")


@pytest.fixture(scope="module")
def listings() -> dict:
    """``{bullet name: (text, label names or None)}`` from PAPER.md's prompt section."""
    if not PAPER.is_file():
        pytest.skip(f"{PAPER} is absent")
    section = PAPER.read_text().split("\n## Prompts", 1)[1].split("\n## ", 1)[0]
    spans_of = {}
    for bullet in re.split(r"\n- ", section)[1:]:
        name = bullet.split(":", 1)[0].split(" (")[0].strip()
        spans_of[name] = [s.replace("\\n", "\n") for s in re.findall(r"`([^`]*)`", bullet)]
    out = {}
    for name, spans in spans_of.items():
        labels = [s for s in spans if LABEL.match(s)]
        if not labels:
            out[name] = (spans[0] if spans else None, None)
            continue
        frame = [s for s in spans if not LABEL.match(s)]
        opening = frame[0] if len(frame) == 2 else spans_of["VinDr-PCXR"][0]  # BRSET: "same frame"
        for i, s in enumerate(labels):
            assert int(LABEL.match(s).group(1)) == i, (name, s)
        names = [LABEL.match(s).group(2) for s in labels]
        out[name] = (opening + "\n".join(labels) + frame[-1], names)
    return out


def _rendered(task, layout="paper", candidate=True) -> str:
    question = "<query question>" if task.question is None else None
    cand = prompts.Candidate(RETRIEVED, "<retrieved text>") if candidate else None
    parts, _ = prompts.prompt_parts(layout, task, QUERY, question, cand)
    names = {id(QUERY): "<query image>", id(RETRIEVED): "<retrieved image>"}
    return "".join(names[id(v)] if kind == "image" else v for kind, v in parts)


@pytest.mark.parametrize("bullet", TASKS)
def test_every_task_renders_its_listing_word_for_word(listings, bullet):
    text, names = listings[bullet]
    want = text.replace("<image>", "<query image>")  # VinDr-PCXR and BRSET name the query image so
    for name in TASKS[bullet]:
        task = get_task(name)
        assert _rendered(task) == want, name
        if names is not None:
            assert list(task.label_names) == names and task.labels == tuple(str(i) for i in range(len(names)))


def test_the_multilabel_tasks_count_their_listed_labels(listings):
    counts = dict(re.findall(r"- (\S+) \(multi-label, (\d+)\)", PAPER.read_text()))
    assert len(listings["VinDr-PCXR"][1]) == int(counts["VinDr-PCXR"]) == get_task("vindr_pcxr").num_classes
    assert len(listings["BRSET"][1]) == int(counts["BRSET"]) == get_task("brset").num_classes
    assert get_task("brset").label_names[0] == "no findings"


def test_the_reference_variant_is_the_codes_prompt():
    derma = get_task("derma", prompts="reference")
    assert derma.name == "derma_reference" and get_task("derma_reference") is derma
    legend = legend_instructions(derma.label_names)
    assert _rendered(derma) == (
        "<retrieved image>background: <retrieved text>\n\n<query image>" + legend + derma.question
    )
    vqa = get_task("vqa_rad_closed", prompts="reference")
    assert _rendered(vqa) == "<retrieved image>background: <retrieved text>\n\n<query image><query question>"
    for name in ("breast", "retina", "vindr_pcxr", "brset"):
        paper, ref = get_task(name), get_task(name, prompts="reference")
        assert ref.name == f"{name}_reference" and ref.labels == paper.labels
        assert ref.label_names == paper.label_names and ref.question == paper.question
        assert _rendered(ref).startswith("<retrieved image>background: <retrieved text>\n\n<query image>")
        assert _rendered(ref) != _rendered(paper)
    assert get_task("synthetic", prompts="reference") is get_task("synthetic")  # one variant
    with pytest.raises(ValueError, match="prompts: expected one of"):
        get_task("derma", prompts="code")


def test_the_legend_stays_before_the_query_image_in_every_layout_and_variant():
    derma = get_task("derma")
    legend = derma.instructions
    assert legend.startswith("Provide answer according to the labels:\n") and legend.endswith("'\n\n")
    # no retrieval: the legend, the query image, the question
    assert _rendered(derma, candidate=False) == legend + "<query image>" + derma.question
    # shared_query: the query (legend, image, question) first, the candidate after it
    assert _rendered(derma, "shared_query") == (
        legend + "<query image>" + derma.question + "\n\n<retrieved image>background:<retrieved text>"
    )
