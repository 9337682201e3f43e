"""Prompt layouts: the rendered text of each layout, and the split of a
query's K prompts into a shared prefix and K segments that tokenize exactly like the prompts."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from jomed_fast import prompts
from jomed_fast.data import IndexRecord
from jomed_fast.prompts import (
    Candidate,
    as_candidate,
    as_image,
    build_messages,
    render_prompt,
    split_query,
)
from jomed_fast.readers import ReaderProcessor, tiny
from jomed_fast.tasks import Task, get_task

TASK = get_task("synthetic")


def _image(h=28, w=28, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def procs():
    out = {}
    for arch in tiny.ARCHS:
        out[arch] = ReaderProcessor(arch, tiny.build_tokenizer(arch), tiny.make_image_processor(arch))
    return out


# ---------------------------------------------------------------------------------- layouts
def test_layout_parts_follow_the_paper_and_the_shared_query_order():
    q, c = _image(seed=1), Candidate(_image(seed=2), "a cyst")
    parts, n_shared = prompts.prompt_parts("paper", TASK, q, None, c)
    assert [k for k, _ in parts] == ["image", "text", "image", "text"]
    assert parts[0][1] is c.image and parts[2][1] is q
    assert parts[1][1] == "background: a cyst\n\n" and parts[3][1] == TASK.prompt()
    assert n_shared == 0
    parts, n_shared = prompts.prompt_parts("shared_query", TASK, q, None, c)
    assert [k for k, _ in parts] == ["image", "text", "image", "text"]
    assert parts[0][1] is q and parts[2][1] is c.image
    assert parts[1][1] == TASK.prompt() + "\n\n" and parts[3][1] == "background: a cyst"
    assert n_shared == 2


def test_rendered_text_qwen2_vl(procs):
    q, c = _image(seed=1), Candidate(_image(seed=2), "a cyst")
    legend_question = TASK.prompt()
    sys_user = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    img = "<|vision_start|><|image_pad|><|vision_end|>"
    cue = "<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(procs["qwen2_vl"], "paper", TASK, q, None, c) == (
        f"{sys_user}{img}background: a cyst\n\n{img}{legend_question}{cue}"
    )
    assert render_prompt(procs["qwen2_vl"], "shared_query", TASK, q, None, c) == (
        f"{sys_user}{img}{legend_question}\n\n{img}background: a cyst{cue}"
    )


def test_rendered_text_pixtral(procs):
    q, c = _image(seed=1), Candidate(_image(seed=2), "a cyst")
    legend_question = TASK.prompt()
    assert render_prompt(procs["pixtral"], "paper", TASK, q, None, c) == (
        f"<s>[INST][IMG]background: a cyst\n\n[IMG]{legend_question}[/INST]"
    )
    assert render_prompt(procs["pixtral"], "shared_query", TASK, q, None, c) == (
        f"<s>[INST][IMG]{legend_question}\n\n[IMG]background: a cyst[/INST]"
    )


def test_variants_without_query_image_candidate_image_or_candidate(procs):
    p = procs["pixtral"]
    q = _image(seed=1)
    assert render_prompt(p, "paper", TASK, None, None, Candidate(None, "x")) == (
        f"<s>[INST]background: x\n\n{TASK.prompt()}[/INST]"
    )
    assert render_prompt(p, "shared_query", TASK, q, None, None) == f"<s>[INST][IMG]{TASK.prompt()}[/INST]"
    assert render_prompt(p, "paper", TASK, q, "Is it benign?", None) == (
        f"<s>[INST][IMG]{TASK.instructions}Is it benign?[/INST]"
    )
    messages, images = build_messages("shared_query", TASK, None, None, Candidate(_image(seed=3), "y"))
    assert len(images) == 1 and [part["type"] for part in messages[0]["content"]] == ["text", "image", "text"]


def test_layout_is_checked(procs):
    with pytest.raises(ValueError, match="layout"):
        prompts.prompt_parts("reversed", TASK, None, None, None)
    with pytest.raises(ValueError, match="layout"):
        split_query(procs["qwen2_vl"], "reversed", TASK, None, None, [None])


# ---------------------------------------------------------------------------------- splitting
CAPTIONS = [
    "a small round cyst",
    "",
    "irregular spiculated mass, posterior shadowing; 10 mm!",
    "normal tissue\n\nbands",
    "calcifications",
]


@pytest.mark.parametrize("arch", tiny.ARCHS)
@pytest.mark.parametrize("layout", prompts.LAYOUTS)
@pytest.mark.parametrize("K", [1, 3, 5])
def test_prefix_plus_segment_is_the_tokenized_prompt(procs, arch, layout, K):
    proc = procs[arch]
    q = _image(seed=1)
    cands = [Candidate(_image(seed=10 + k), CAPTIONS[k]) for k in range(K)]
    split = split_query(proc, layout, TASK, q, None, cands)
    image_id = proc.image_token_id
    for k, cand in enumerate(cands):
        full = proc.tokenize(render_prompt(proc, layout, TASK, q, None, cand))
        assert split.prefix_ids + split.segments[k] == full
        assert split.prefix_images + split.segment_images[k] == build_messages(layout, TASK, q, None, cand)[1]
    # the prefix never reaches into a candidate
    if layout == "paper":
        assert image_id not in split.prefix_ids and split.prefix_images == []
        assert all(imgs[-1] is q for imgs in split.segment_images)
    else:
        assert split.prefix_ids.count(image_id) == 1 and split.prefix_images == [q]
        question_ids = proc.tokenize(TASK.prompt())
        assert len(split.prefix_ids) >= len(question_ids)
        assert all(seg.count(image_id) == 1 for seg in split.segments)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_paper_prefix_is_the_same_for_every_query(procs, arch):
    proc = procs[arch]
    a = split_query(proc, "paper", TASK, _image(seed=1), None, [Candidate(_image(seed=2), "x")] * 2)
    b = split_query(proc, "paper", TASK, _image(40, 56, seed=3), "Is it a cyst?", [Candidate(_image(seed=4), "yy")] * 2)
    assert a.prefix_ids == b.prefix_ids and len(a.prefix_ids) > 0


@pytest.mark.parametrize("layout", prompts.LAYOUTS)
def test_split_handles_mixed_candidates(procs, layout):
    proc = procs["qwen2_vl"]
    q = _image(seed=1)
    cands = [Candidate(_image(seed=2), "with image"), Candidate(None, "caption only"), None]
    split = split_query(proc, layout, TASK, q, "Which class?", cands)
    for k, cand in enumerate(cands):
        full = proc.tokenize(render_prompt(proc, layout, TASK, q, "Which class?", cand))
        assert split.prefix_ids + split.segments[k] == full
    assert [len(imgs) for imgs in split.segment_images] == ([2, 1, 1] if layout == "paper" else [1, 0, 0])


def test_a_template_that_rewrites_text_falls_back_to_direct_rendering(procs):
    base = procs["qwen2_vl"]

    class Upper:
        tokenizer, image_token_id, image_token = base.tokenizer, base.image_token_id, base.image_token

        def apply_chat_template(self, messages, add_generation_prompt=True):
            return base.apply_chat_template(messages, add_generation_prompt).replace("background", "Background")

    q = _image(seed=1)
    cands = [Candidate(_image(seed=2), "one"), Candidate(_image(seed=3), "two words")]
    split = split_query(Upper(), "shared_query", TASK, q, None, cands)
    for k, cand in enumerate(cands):
        assert split.prefix_ids + split.segments[k] == base.tokenize(
            Upper().apply_chat_template(build_messages("shared_query", TASK, q, None, cand)[0])
        )


def test_image_token_in_a_caption_or_question_is_refused(procs):
    proc = procs["qwen2_vl"]
    q = _image(seed=1)
    bad = [Candidate(_image(seed=2), "ok"), Candidate(_image(seed=3), "see <|image_pad|> here")]
    with pytest.raises(ValueError, match=r"candidates\[1\]\.text"):
        split_query(proc, "paper", TASK, q, None, bad)
    with pytest.raises(ValueError, match="question"):
        split_query(proc, "shared_query", TASK, q, "what is [IMG]<|image_pad|>?", [Candidate(None, "x")])


# ---------------------------------------------------------------------------------- candidates, images
def test_as_candidate_accepts_the_usual_shapes():
    img = _image()
    assert as_candidate(Candidate(img, "t")).text == "t"
    assert as_candidate({"image": img, "text": "t", "id": 7}) == Candidate(img, "t", "7")
    assert as_candidate((img, "t")).image is img
    arr = np.zeros((8, 8, 3), np.uint8)
    rec = IndexRecord(id="r1", image_path=None, text="caption", image=arr)
    c = as_candidate(rec)
    assert c.image is arr and c.text == "caption" and c.id == "r1"

    @dataclasses.dataclass
    class Lazy:
        id: str = "r2"
        text: str = "lazy"
        image: object = None
        image_path: str = "/nowhere.png"

        def load_image(self):
            return arr

    assert as_candidate(Lazy()).image is arr
    with pytest.raises(TypeError, match="cand"):
        as_candidate("just text", "cand")
    with pytest.raises(ValueError, match=r"cand: expected a dict with 'image' and 'text'"):
        as_candidate({"image": img}, "cand")
    with pytest.raises(TypeError, match=r"cand\.text"):
        as_candidate((img, 3), "cand")
    with pytest.raises(TypeError, match="Candidate.text"):
        Candidate(img, None)


def test_as_image_converts_arrays():
    rgb = (np.random.RandomState(0).rand(6, 5, 3) * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(as_image(rgb)), rgb)
    gray = rgb[..., 0]
    assert as_image(gray).mode == "RGB" and np.array_equal(np.asarray(as_image(gray))[..., 1], gray)
    assert np.array_equal(np.asarray(as_image(rgb / 255.0)), rgb)
    assert as_image(Image.fromarray(gray)).mode == "RGB"
    with pytest.raises(ValueError, match="img: expected an"):
        as_image(np.zeros((2, 3, 3, 3)), "img")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        as_image(np.full((4, 4, 3), 2.0), "img")
    with pytest.raises(TypeError, match="img"):
        as_image("photo.png", "img")


def test_task_without_fixed_question_needs_one(procs):
    vqa = get_task("vqa_rad_closed")
    with pytest.raises(ValueError, match="no fixed question"):
        prompts.prompt_parts("paper", vqa, None, None, None)
    custom = Task(name="t", kind="binary", labels=("no", "yes"), question="Q?", instructions="Answer yes or no. ")
    parts, _ = prompts.prompt_parts("shared_query", custom, None, None, Candidate(None, "c"))
    assert parts[0] == ("text", "Answer yes or no. Q?\n\n")
