"""Tasks: registry, prompts, answer parsing, verbalizers (class token ids, restricted decoding)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jomed_fast.tasks import (
    _REGISTRY,
    KINDS,
    RestrictedDecoding,
    Task,
    build_verbalizer,
    get_task,
    iter_tasks,
    register_task,
    task_names,
)

PAPER_TASKS = {
    "breast": ("binary", 2),
    "derma": ("multiclass", 7),
    "retina": ("multiclass", 5),
    "vindr_pcxr": ("multilabel", 15),
    "brset": ("multilabel", 14),
    "vqa_rad_closed": ("vqa_closed", 2),
    "vqa_rad_open": ("vqa_open", 0),
    "slake_closed": ("vqa_closed", 2),
    "slake_open": ("vqa_open", 0),
    "pathvqa_closed": ("vqa_closed", 2),
    "pathvqa_open": ("vqa_open", 0),
    "synthetic": ("multiclass", 5),
}

# The reference's Derma legend (github.com/Nirmaz/JOMED src/tasks/cr_qa_derma.py), verbatim.
DERMA_INSTRUCTIONS = (
    "Provide answer according to the labels:\n"
    "0 - 'Actinic keratoses and intraepithelial carcinoma'\n"
    "1 - 'Basal cell carcinoma'\n"
    "2 - 'Benign keratosis-like lesions'\n"
    "3 - 'Dermatofibroma'\n"
    "4 - 'Melanoma'\n"
    "5 - 'Melanocytic nevi'\n"
    "6 - 'Vascular lesions'\n\n"
)


# ------------------------------------------------------------------------------------------------
# tokenizers built in code (milliseconds)
# ------------------------------------------------------------------------------------------------
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "Does this breast ultrasound image show signs of cancer? Yes No yes no",
    "Provide answer according to the labels: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14",
    "benign malignant lesion melanoma nevus carcinoma, grade 3, 0, 14, 2",
] * 20


def _bpe_raw():
    """A byte-level BPE ``tokenizers.Tokenizer`` that splits every digit (as Qwen2 / Tekken do)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=1,
        show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def bpe_raw():
    return _bpe_raw()


@pytest.fixture(scope="module")
def hf_tok(bpe_raw):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=bpe_raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )


def _metaspace(prepend_scheme: str, split_punct: bool):
    """A SentencePiece-style word-level tokenizer: the space is glued to the next word (``▁3``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pre = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)]
    if split_punct:
        pre.append(pre_tokenizers.Punctuation())
    words = [str(i) for i in range(15)] + [",", "</s>", "[UNK]", "Yes", "No"]
    vocab = {}
    for w in words:
        for v in (w, "▁" + w, w + ",", "▁" + w + ","):
            vocab.setdefault(v, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    return tok


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
def test_registry_has_the_paper_tasks_and_synthetic():
    assert set(PAPER_TASKS) <= set(task_names())
    for name, (kind, n) in PAPER_TASKS.items():
        t = get_task(name)
        assert t.name == name and t.kind == kind and t.num_classes == n
        assert t.kind in KINDS
    assert [t.name for t in iter_tasks()] == task_names()


@pytest.mark.parametrize(
    "alias, name",
    [
        ("Breast", "breast"),
        ("VinDr-PCXR", "vindr_pcxr"),
        ("vindr pcxr", "vindr_pcxr"),
        ("SLAKE", "slake_closed"),
        ("slake-english", "slake_closed"),
        ("VQA-RAD", "vqa_rad_closed"),
        ("PathVQA", "pathvqa_closed"),
        ("breastmnist", "breast"),
        (" BRSET ", "brset"),
    ],
)
def test_get_task_names_are_forgiving(alias, name):
    assert get_task(alias).name == name


def test_unknown_task_error_lists_the_known_names():
    with pytest.raises(ValueError) as e:
        get_task("chestmnist")
    msg = str(e.value)
    assert "'chestmnist'" in msg
    for name in PAPER_TASKS:
        assert name in msg
    with pytest.raises(TypeError):
        get_task(3)


def test_register_task():
    t = Task(name="test_custom_grade", kind="multiclass", labels=("low", "high"), question="Grade?")
    try:
        assert register_task(t) is t
        assert get_task("Test-Custom-Grade") is t
        with pytest.raises(ValueError, match="already registered"):
            register_task(t)
        register_task(dataclasses.replace(t, question="Which grade?"), overwrite=True)
        assert get_task("test_custom_grade").question == "Which grade?"
    finally:
        _REGISTRY.pop("test_custom_grade", None)
    with pytest.raises(ValueError, match="snake_case"):
        register_task(dataclasses.replace(t, name="Bad Name"))
    with pytest.raises(ValueError, match="alias"):
        register_task(dataclasses.replace(t, name="slake"))


# ------------------------------------------------------------------------------------------------
# prompts (strings of the reference implementation)
# ------------------------------------------------------------------------------------------------
def test_reference_prompts():
    breast = get_task("breast", prompts="reference")
    assert breast.labels == ("No", "Yes")
    assert breast.question == "Does this breast ultrasound image show signs of cancer?"
    assert breast.instructions == ""
    assert breast.prompt() == "Does this breast ultrasound image show signs of cancer?"

    derma = get_task("derma", prompts="reference")
    assert derma.labels == tuple("0123456")
    assert derma.instructions == DERMA_INSTRUCTIONS
    assert derma.question == "What type of skin lesion does the patient have?"
    assert derma.prompt() == DERMA_INSTRUCTIONS + "What type of skin lesion does the patient have?"
    assert derma.preamble() == ""

    retina = get_task("retina", prompts="reference")
    assert retina.labels == tuple("01234")
    assert retina.prompt() == "what is the severity of diabetic retinopathy?"

    for name in ("vqa_rad_closed", "slake_open", "pathvqa_closed"):
        t = get_task(name, prompts="reference")
        assert t.question is None and t.instructions == ""
        assert t.prompt("Is there a fracture?") == "Is there a fracture?"
        with pytest.raises(ValueError, match="no fixed question"):
            t.prompt()
    assert get_task("vqa_rad_closed").labels == ("no", "yes")
    assert breast.context("a round cyst") == "background: a round cyst\n\n"


def test_paper_prompts_split_around_the_query_image():
    derma = get_task("derma")
    assert derma.preamble() == DERMA_INSTRUCTIONS.replace("\n\n", "\n") + "\n"  # lines joined, one blank line
    assert derma.prompt() == "What type of skin lesion does the patient have?"
    assert get_task("breast").context("a round cyst") == "background:a round cyst\n\n"
    assert get_task("retina").context("x") == "background:x\n"
    assert get_task("slake_open").prompt("Is there a fracture") == "Is there a fracture?"
    with pytest.raises(ValueError, match="instructions_position must be one of"):
        Task(name="t", kind="binary", labels=("a", "b"), question="q", instructions_position="above")
    with pytest.raises(ValueError, match="question_template must contain"):
        Task(name="t", kind="binary", labels=("a", "b"), question="q", question_template="Q:")


def test_multilabel_and_synthetic_legends():
    for name, n in (("vindr_pcxr", 15), ("brset", 14)):
        t = get_task(name)
        assert t.labels == tuple(str(i) for i in range(n))
        assert t.instructions.startswith("Provide answer according to the labels:\n0 - '")
        assert t.instructions.endswith(f"{n - 1} - '{t.label_names[-1]}'\n\n")
        assert t.question.startswith("Question: Look at") and t.preamble() == t.instructions
        assert t.prompt("own question?") == "own question?"  # a sample's question wins
    syn = get_task("synthetic")
    assert syn.legend().splitlines()[3] == "3 - 'Carcinoma'"
    assert syn.prompt().startswith("Provide answer according to the labels:\n0 - 'Normal tissue'\n")


def test_breast_source_label_map():
    t = get_task("breast")  # BreastMNIST: 0 = malignant, 1 = normal/benign
    assert t.format_answer(t.from_source_label(0)) == "Yes"
    assert t.format_answer(t.from_source_label(1)) == "No"
    assert get_task("retina").from_source_label(4) == 4
    with pytest.raises(ValueError, match="outside the label set"):
        t.from_source_label(2)
    assert get_task("brset").from_source_label([1] + [0] * 12 + [1]) == frozenset({0, 13})
    with pytest.raises(ValueError, match="entries"):
        get_task("brset").from_source_label([1, 0])


# ------------------------------------------------------------------------------------------------
# answers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, text, want",
    [
        ("breast", "Yes", 1),
        ("breast", "  yes.\n", 1),
        ("breast", "NO", 0),
        ("breast", "'No'", 0),
        ("breast", "No, there are no signs of cancer.", 0),
        ("breast", "Yes, there is an irregular mass", 1),
        ("breast", "maybe", None),
        ("breast", "", None),
        ("derma", "4", 4),
        ("derma", " 4 - Melanoma", 4),
        ("derma", "melanoma", 4),
        ("derma", "Answer: 6", 6),
        ("derma", "7", None),
        ("retina", "Grade 3.", 3),
        ("vqa_rad_closed", "Yes", 1),
        ("slake_closed", "no.", 0),
    ],
)
def test_parse_single_label(name, text, want):
    assert get_task(name).parse(text) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("0, 3, 14", {0, 3, 14}),
        ("14,0 ,3", {0, 3, 14}),
        ("  10 ", {10}),
        ("1, 10, 11", {1, 10, 11}),
        ("labels: 2 and 12.", {2, 12}),
        ("3, 3", {3}),
        ("none", None),
        ("15", None),
    ],
)
def test_parse_multilabel(text, want):
    got = get_task("vindr_pcxr").parse(text)
    assert got == (frozenset(want) if want is not None else None)


def test_strict_answers():
    derma, pcxr = get_task("derma"), get_task("vindr_pcxr")
    assert derma.encode_answer("3") == 3 and derma.encode_answer(3) == 3 and derma.encode_answer(["5"]) == 5
    with pytest.raises(ValueError, match=r"answer '9' is outside the label set of task 'derma'.*'6'"):
        derma.encode_answer("9")
    with pytest.raises(ValueError, match="one answer per sample"):
        derma.encode_answer(["1", "2"])
    with pytest.raises(TypeError):
        derma.encode_answer(None)
    assert pcxr.encode_answer("0, 3,14") == frozenset({0, 3, 14})
    assert pcxr.encode_answer(["3", 0]) == frozenset({0, 3})
    with pytest.raises(ValueError, match="outside the label set"):
        pcxr.encode_answer("0, 15")
    with pytest.raises(ValueError, match="empty"):
        pcxr.encode_answer("")
    with pytest.raises(ValueError, match="empty item"):
        pcxr.encode_answer("1,,2")
    assert pcxr.format_answer({14, 0, 3}) == "0, 3, 14"
    assert derma.format_answer(2) == "2"
    with pytest.raises(ValueError, match="class index 7"):
        derma.format_answer(7)
    assert pcxr.is_correct(frozenset({0, 3}), frozenset({3, 0})) and not pcxr.is_correct(None, frozenset({1}))
    open_task = get_task("vqa_rad_open")
    with pytest.raises(ValueError, match="no label set"):
        open_task.parse("left lung")
    vocab = open_task.with_labels(["left lung", "Right lung", "left lung"])
    assert vocab.labels == ("left lung", "Right lung") and vocab.parse("the RIGHT LUNG") == 1


def test_task_validation():
    with pytest.raises(ValueError, match="kind must be one of"):
        Task(name="x", kind="regression", labels=("a", "b"), question="?")
    with pytest.raises(ValueError, match="exactly 2 labels"):
        Task(name="x", kind="binary", labels=("a", "b", "c"), question="?")
    with pytest.raises(ValueError, match="same answer after normalisation"):
        Task(name="x", kind="multiclass", labels=("Yes", "yes"), question="?")
    with pytest.raises(ValueError, match="label_names"):
        Task(name="x", kind="multiclass", labels=("a", "b"), label_names=("A",), question="?")
    with pytest.raises(ValueError, match="separator"):
        Task(name="x", kind="multilabel", labels=("a,b", "c"), question="?")
    with pytest.raises(ValueError, match=r"\{text\}"):
        Task(name="x", kind="multiclass", labels=("a", "b"), question="?", context_template="background")


_TASKS_WITH_LABELS = [t for t in iter_tasks() if t.labels]
_space = st.sampled_from(["", " ", "  ", "\n", "\t"])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_format_then_parse_round_trips(data):
    """Property: the canonical answer, re-spaced and re-cased, parses (and encodes) back to the label."""
    task = data.draw(st.sampled_from(_TASKS_WITH_LABELS))
    if task.is_multilabel:
        label = frozenset(data.draw(st.sets(st.integers(0, task.num_classes - 1), min_size=1)))
        parts = [task.labels[i] for i in data.draw(st.permutations(sorted(label)))]
        text = "".join(data.draw(_space) + p + data.draw(_space) + "," for p in parts)[:-1]
    else:
        label = data.draw(st.integers(0, task.num_classes - 1))
        text = task.format_answer(label)
        text = data.draw(st.sampled_from([str.upper, str.lower, str.title, str]))(text)
        text = data.draw(_space) + text + data.draw(_space) + data.draw(st.sampled_from(["", ".", "!"]))
    assert task.parse(text) == label
    assert task.parse(task.format_answer(label)) == label
    assert task.encode_answer(task.format_answer(label)) == label


# ------------------------------------------------------------------------------------------------
# verbalizers
# ------------------------------------------------------------------------------------------------
def test_verbalizer_single_label(hf_tok):
    for name in ("breast", "derma", "retina", "synthetic", "vqa_rad_closed"):
        task = get_task(name)
        v = build_verbalizer(task, hf_tok)
        assert v.end_token_id == hf_tok.convert_tokens_to_ids("<|im_end|>")
        assert len(v.sequences) == task.num_classes
        for c, seq in enumerate(v.sequences):
            assert hf_tok.decode(list(seq)) == task.labels[c]
            assert v.target_ids(c) == list(seq) + [v.end_token_id]
        assert v.first_tokens_unique and len(set(v.class_token_ids)) == task.num_classes
        assert set(v.allowed_token_ids) == {t for s in v.sequences for t in s} | {v.end_token_id}
    v = build_verbalizer(get_task("derma"), hf_tok)
    assert v.single_token and v.class_token_ids == tuple(s[0] for s in v.sequences)


def test_verbalizer_multilabel_multi_token_classes(hf_tok):
    task = get_task("vindr_pcxr")
    v = build_verbalizer(task, hf_tok)
    assert len(v.sequences[10]) == 2  # digits are split: "10" = "1", "0"
    assert not v.single_token and not v.first_tokens_unique
    with pytest.raises(ValueError, match="share their first token"):
        _ = v.class_token_ids
    comma = hf_tok.convert_tokens_to_ids(",")
    space = hf_tok.convert_tokens_to_ids("Ġ")
    assert v.separator_ids == (comma, space)
    assert {comma, space, v.end_token_id} <= set(v.allowed_token_ids)
    assert {t for s in v.sequences for t in s} <= set(v.allowed_token_ids)
    assert len(v.allowed_token_ids) == 10 + 3  # ten digits, ",", "Ġ", end
    ids = v.target_ids({14, 0, 3})
    assert hf_tok.decode(ids) == "0, 3, 14<|im_end|>"
    assert ids == hf_tok("0, 3, 14<|im_end|>", add_special_tokens=False)["input_ids"]
    # walk the grammar: every next token of the canonical answer is allowed, and it ends there
    for k in range(len(ids)):
        assert ids[k] in v.allowed_next(ids[:k])
    assert v.allowed_next(ids) == ()
    after_one = v.allowed_next(hf_tok("1", add_special_tokens=False)["input_ids"])
    assert comma in after_one and v.end_token_id in after_one and v.sequences[0][0] in after_one  # "1" -> "10"
    with pytest.raises(ValueError):
        v.allowed_next([comma])  # an answer cannot start with the separator
    with pytest.raises(ValueError):
        v.allowed_next(list(v.sequences[3]) + [v.end_token_id, comma])  # nothing after the end


def test_verbalizer_tensors_and_logits_processor(hf_tok):
    v = build_verbalizer(get_task("vindr_pcxr"), hf_tok)
    ids, mask = v.padded_sequences(pad_id=-1)
    assert ids.shape == (15, 3) and mask.sum(1).tolist() == [2] * 10 + [3] * 5
    assert (ids[~mask] == -1).all()
    allowed = v.allowed_mask()
    assert allowed.shape == (len(hf_tok),) and allowed.sum() == len(v.allowed_token_ids)
    with pytest.raises(ValueError, match="vocab_size"):
        v.allowed_mask(5)

    prompt = hf_tok("Provide answer:", add_special_tokens=False)["input_ids"]
    partial = v.target_ids({1, 2})[:3]  # "1", ",", "Ġ"
    # row 0 has answered "1, "; row 1 (a longer prompt) has answered "1"
    input_ids = torch.tensor([prompt + partial, prompt + prompt[:2] + partial[:1]])
    starts = [len(prompt), len(prompt) + 2]
    scores = torch.randn(2, len(hf_tok))
    out = v.logits_processor(starts)(input_ids, scores)
    for b, answer in enumerate((partial, partial[:1])):
        finite = torch.isfinite(out[b]).nonzero().flatten().tolist()
        assert finite == list(v.allowed_next(answer))
        assert torch.equal(out[b, finite], scores[b, finite])
    done = torch.tensor([prompt + v.target_ids({1})])  # finished answers may only repeat the end token
    out = RestrictedDecoding(v, len(prompt))(done, torch.randn(1, len(hf_tok)))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [v.end_token_id]


def test_verbalizer_raw_tokenizers_object_and_end_token(bpe_raw):
    derma = get_task("derma")
    v = build_verbalizer(derma, bpe_raw)  # no eos on a raw tokenizers.Tokenizer: fine for single digits
    assert v.end_token_id is None and v.single_token
    with pytest.raises(ValueError, match="need an end-of-answer token"):
        build_verbalizer(get_task("brset"), bpe_raw)
    v = build_verbalizer(get_task("brset"), bpe_raw, end_token="<|im_end|>")
    assert v.end_token_id == bpe_raw.token_to_id("<|im_end|>")
    assert build_verbalizer(get_task("brset"), bpe_raw, end_token=v.end_token_id) == v
    with pytest.raises(ValueError, match="not one token"):
        build_verbalizer(derma, bpe_raw, end_token="end of answer")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_verbalizer(derma, bpe_raw, end_token=10**6)
    # "1" is a prefix of "10": without an end token the classes cannot be told apart
    t = Task(name="prefix_case", kind="multiclass", labels=("1", "10"), question="?")
    with pytest.raises(ValueError, match="is a prefix of"):
        build_verbalizer(t, bpe_raw)
    v = build_verbalizer(t, bpe_raw, end_token="<|im_end|>")
    assert v.allowed_next(v.sequences[0]) == tuple(sorted({v.end_token_id, v.sequences[1][1]}))
    with pytest.raises(TypeError, match="tokenizer"):
        build_verbalizer(derma, object())


def test_verbalizer_rejects_indistinguishable_classes():
    tok = _metaspace("always", split_punct=True)
    t = Task(name="unk_case", kind="binary", labels=("benign", "malignant"), question="?")
    with pytest.raises(ValueError, match="cannot represent label 'benign'"):
        build_verbalizer(t, tok)
    # labels merged with the separator into one token ("0,"): answers could not be split
    merged = _metaspace("always", split_punct=False)
    with pytest.raises(ValueError, match="merges label"):
        build_verbalizer(get_task("brset"), merged, end_token="</s>")
    with pytest.raises(ValueError, match="no label set"):
        build_verbalizer(get_task("pathvqa_open"), tok)


def test_verbalizer_sentencepiece_style_continuations():
    tok = _metaspace("never", split_punct=True)  # "3" at the start, "▁3" after ", "
    task = get_task("brset")
    v = build_verbalizer(task, tok, end_token="</s>")
    three, sp_three = tok.token_to_id("3"), tok.token_to_id("▁3")
    assert v.sequences[3] == (three,) and v.continuation_sequences[3] == (sp_three,)
    assert v.separator_ids == (tok.token_to_id(","),)
    assert {three, sp_three} <= set(v.allowed_token_ids)
    ids = v.target_ids({0, 3})
    assert ids == tok.encode("0, 3</s>", add_special_tokens=False).ids[:3] + [v.end_token_id]
    assert tok.decode(ids[:-1]) == "0, 3"
    for k in range(len(ids)):
        assert ids[k] in v.allowed_next(ids[:k])
    # prefix_space: the answer is " " + label
    vb = build_verbalizer(get_task("breast"), tok, end_token="</s>", prefix_space=True)
    assert vb.sequences == ((tok.token_to_id("▁No"),), (tok.token_to_id("▁Yes"),))


def test_build_verbalizer_type_errors(hf_tok):
    with pytest.raises(TypeError, match="Task"):
        build_verbalizer("breast", hf_tok)
    with pytest.raises(TypeError, match="end_token"):
        build_verbalizer(get_task("breast"), hf_tok, end_token=1.5)


def test_task_identity_follows_what_the_reader_is_shown():
    task = get_task("breast")
    assert task.identity.startswith("breast@") and task.identity == get_task("breast").identity
    for field, value in [
        ("question", task.question + " "),
        ("instructions", task.instructions + "x"),
        ("labels", ("No", "Maybe")),
        ("separator", "; "),
        ("context_template", "caption: {text}\n"),
        ("instructions_position", "before_query_image"),
        ("source_label_map", None),
    ]:
        assert dataclasses.replace(task, **{field: value}).identity != task.identity, field
    notes = dataclasses.replace(task, description="another note", prompt_source="elsewhere")
    assert notes.identity == task.identity
