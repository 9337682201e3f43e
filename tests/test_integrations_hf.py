"""``jomed_fast.integrations``: the class head patched onto unmodified Hugging Face models.

Every expectation is the *unpatched* model's own computation, ``log_softmax(model(**batch).logits
[range(B), pos][:, ids], -1)`` in float64, on tiny random-weight models built from the config classes
(``Qwen2ForCausalLM``, a tied ``LlamaForCausalLM``, the offline ``Qwen2VLForConditionalGeneration``
loaded through ``AutoModelForImageTextToText``): the log-probabilities (fp32 within 1e-5, both padding
sides, explicit positions, the Triton kernel under the interpreter), the gradients of LoRA adapters
(PEFT before and after the patch; NF4 through bitsandbytes' CPU kernel) and of a tied head, greedy
generation before / during / after the patch, the forward restored exactly, and a real
``transformers.Trainer`` against the same SGD steps taken by hand on the unpatched loss.
"""

import copy

import numpy as np
import pytest
import torch

from jomed_fast.integrations import (
    ClassHeadTrainerMixin,
    as_class_token_ids,
    class_nll_loss,
    find_class_head_patch,
    patch_class_head,
)
from jomed_fast.readers import ReaderProcessor, load_reader, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
PAD = 0
CLASS_IDS = [7, 31, 64, 90]
TEXT_ARCHS = ("qwen2", "llama")
ATOL = 1e-5


# ----------------------------------------------------------------------------------------- models
def _text_model(arch: str, seed: int = 0):
    """A tiny random-weight causal LM; the Llama one ties its head to the input embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    dims = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "qwen2":
            return Qwen2ForCausalLM(Qwen2Config(**dims, tie_word_embeddings=False)).eval()
        return LlamaForCausalLM(LlamaConfig(**dims, tie_word_embeddings=True)).eval()


def _text_batch(side: str, lengths=(9, 5, 7), seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    input_ids = torch.full((len(lengths), L), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), L), dtype=torch.long)
    for r, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(L - n, L)
        input_ids[r, cols] = torch.randint(3, VOCAB, (n,), generator=g)
        attention_mask[r, cols] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return tiny.build("qwen2_vl", tmp_path_factory.mktemp("integrations") / "qwen2_vl")


def _vlm(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vlm_processor(vlm_dir):
    return ReaderProcessor.from_pretrained(vlm_dir, "qwen2_vl")


def _vlm_batch(processor, side: str) -> dict[str, torch.Tensor]:
    from PIL import Image

    def image(h, w, seed):
        return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))

    def question(text):
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    samples = [
        ([image(56, 56, 0)], question("Is the lesion benign?")),
        ([image(28, 56, 1)], question("What does the scan of the left lung show in this patient?")),
    ]
    return processor.encode_batch(samples, padding_side=side)


LABELS = [" yes", " no", " normal", " malignant"]  # one token each in the tiny BPE


def _vlm_class_ids(processor):
    return [ids[0] for ids in processor.tokenizer(LABELS, add_special_tokens=False)["input_ids"]]


# ----------------------------------------------------------------------------------------- reference
def _last_real_token(attention_mask: torch.Tensor) -> list[int]:
    return [max(i for i, m in enumerate(row) if m) for row in attention_mask.tolist()]


def reference_log_probs(model, batch, class_ids, positions) -> torch.Tensor:
    """float64 ``[B, C]`` from the full logits of the model's own forward."""
    logits = model(**batch).logits  # [B, L, V]
    rows = logits[torch.arange(logits.shape[0]), torch.as_tensor(positions)]
    return torch.log_softmax(rows[:, list(class_ids)].double(), dim=-1)


def _assert_close(actual, expected, atol=ATOL, rtol=0.0):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_text_models_match_their_full_logits(arch, side):
    model = _text_model(arch)
    batch = _text_batch(side)
    with torch.no_grad():
        expected = reference_log_probs(model, batch, CLASS_IDS, _last_real_token(batch["attention_mask"]))
        with patch_class_head(model):
            got = model(**batch, class_token_ids=CLASS_IDS)
    assert got.dtype == torch.float32 and got.shape == (3, len(CLASS_IDS))
    _assert_close(got, expected)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_vlm_from_auto_image_text_to_text_matches_its_full_logits(vlm_dir, vlm_processor, side):
    model = _vlm(vlm_dir)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    batch = _vlm_batch(vlm_processor, side)
    ids = _vlm_class_ids(vlm_processor)
    with torch.no_grad():
        expected = reference_log_probs(model, batch, ids, _last_real_token(batch["attention_mask"]))
        with patch_class_head(model):
            got = model(**batch, class_token_ids=ids)
    _assert_close(got, expected)


def test_the_triton_kernel_under_the_interpreter_matches_the_full_logits(backend, vlm_dir, vlm_processor):
    for model, batch, ids in [
        (_text_model("qwen2"), _text_batch("left"), CLASS_IDS),
        (_vlm(vlm_dir), _vlm_batch(vlm_processor, "right"), _vlm_class_ids(vlm_processor)),
    ]:
        with torch.no_grad():
            expected = reference_log_probs(model, batch, ids, _last_real_token(batch["attention_mask"]))
            with patch_class_head(model):
                got = model(**batch, class_token_ids=ids)
        _assert_close(got, expected)


def test_explicit_answer_positions_and_no_mask():
    model = _text_model("qwen2")
    batch = _text_batch("right")
    positions = [3, -1, 0]  # -1: the last column, here a padding token of row 1
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        expected = reference_log_probs(model, batch, CLASS_IDS, [3, L - 1, 0])
        no_mask = reference_log_probs(model, {"input_ids": batch["input_ids"]}, CLASS_IDS, [L - 1] * 3)
        with patch_class_head(model):
            got = model(**batch, class_token_ids=CLASS_IDS, answer_positions=positions)
            got_np = model(**batch, class_token_ids=CLASS_IDS, answer_positions=np.array(positions, dtype=np.int32))
            got_no_mask = model(batch["input_ids"], class_token_ids=CLASS_IDS)  # positional input_ids too
            with pytest.raises(ValueError, match=r"answer_positions: expected positions in \[-9, 9\)"):
                model(**batch, class_token_ids=CLASS_IDS, answer_positions=[9, 0, 0])
            with pytest.raises(ValueError, match=r"answer_positions: expected shape \[B\] = \(3,\)"):
                model(**batch, class_token_ids=CLASS_IDS, answer_positions=[1, 2])
            with pytest.raises(ValueError, match="answer_positions: expected it together with class_token_ids"):
                model(**batch, answer_positions=positions)
    _assert_close(got, expected)
    _assert_close(got_np, expected)
    _assert_close(got_no_mask, no_mask)


def test_class_ids_in_the_forms_tokenizers_return(vlm_processor):
    model = _text_model("qwen2")
    batch = _text_batch("right")
    tokenizer_lists = [[i] for i in CLASS_IDS]  # tokenizer(labels, add_special_tokens=False)["input_ids"]
    forms = [
        list(CLASS_IDS),
        tuple(CLASS_IDS),
        tokenizer_lists,
        [np.int64(i) for i in CLASS_IDS],
        np.array(CLASS_IDS, dtype=np.int32),
        np.array(tokenizer_lists, dtype=np.int64),
        torch.tensor(CLASS_IDS, dtype=torch.int32),
        torch.tensor(CLASS_IDS, dtype=torch.int16),
        torch.tensor(tokenizer_lists),
    ]
    with torch.no_grad(), patch_class_head(model):
        expected = model(**batch, class_token_ids=torch.tensor(CLASS_IDS))
        for form in forms:
            assert torch.equal(model(**batch, class_token_ids=form), expected), type(form)
        # what a real tokenizer hands back, one list per label
        tok = vlm_processor.tokenizer
        encoded = tok(LABELS, add_special_tokens=False)["input_ids"]
        assert as_class_token_ids(encoded, len(tok), "cpu").tolist() == [e[0] for e in encoded]
        bad = [
            (TypeError, r"class_token_ids: expected integer ids, got dtype torch.float32", torch.tensor([1.0, 2.0])),
            (TypeError, r"class_token_ids: expected integer ids, got a NumPy array of dtype float64", np.ones(2)),
            (TypeError, r"class_token_ids: expected integer ids, got dtype torch.bool", [True, False]),
            (TypeError, r"class_token_ids: expected a list of ints, a NumPy array or a tensor, got str", "yes"),
            (
                ValueError,
                r"class_token_ids: expected one token per class, got class 1 as 2 tokens \[5, 6\]",
                [[4], [5, 6]],
            ),
            (ValueError, r"class_token_ids: expected token ids in \[0, 96\) .* max 96", [3, 96]),
            (ValueError, r"class_token_ids: expected distinct ids, got \[3, 3\]", [3, 3]),
            (
                ValueError,
                r"class_token_ids: expected a non-empty \[C\] \(or \[C, 1\]\) of token ids, got shape \(0,\)",
                [],
            ),
        ]
        for error, message, value in bad:
            with pytest.raises(error, match=message):
                model(**batch, class_token_ids=value)


# ----------------------------------------------------------------------------------------- unchanged
def test_without_class_ids_the_model_and_generate_are_unchanged(vlm_dir, vlm_processor):
    model = _text_model("qwen2")
    batch = _text_batch("left")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    original_forward = model.forward
    with torch.no_grad():
        before = model(**batch, labels=labels)
        tokens_before = model.generate(**batch, **gen)
        patch = patch_class_head(model)
        during = model(**batch, labels=labels)
        tokens_during = model.generate(**batch, **gen)
        patch.remove()
        after = model(**batch, labels=labels)
        tokens_after = model.generate(**batch, **gen)
    assert torch.equal(before.logits, during.logits) and torch.equal(before.loss, during.loss)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(tokens_before, tokens_during) and torch.equal(tokens_before, tokens_after)
    assert tokens_before.shape[1] == batch["input_ids"].shape[1] + 6
    # restored exactly: no instance attribute left, the same bound method as before
    assert "forward" not in vars(model) and model.forward == original_forward
    assert find_class_head_patch(model) is None and patch.removed
    patch.remove()  # a second remove does nothing

    vlm = _vlm(vlm_dir)
    vbatch = _vlm_batch(vlm_processor, "left")
    with torch.no_grad():
        vlm_before = vlm.generate(**vbatch, **gen)
        with patch_class_head(vlm):
            vlm_during = vlm.generate(**vbatch, **gen)
        vlm_after = vlm.generate(**vbatch, **gen)
    assert torch.equal(vlm_before, vlm_during) and torch.equal(vlm_before, vlm_after)
    assert "forward" not in vars(vlm)


def test_patch_restores_a_forward_that_was_already_an_instance_attribute():
    model = _text_model("qwen2")
    calls = []
    own = model.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return own(*args, **kwargs)

    model.forward = counting_forward
    batch = _text_batch("right")
    with torch.no_grad(), patch_class_head(model):
        model(**batch)
        assert calls == [1]  # the patch runs the forward that was there
    assert vars(model)["forward"] is counting_forward


def test_refusals_name_the_cause():
    from transformers import Gemma2Config, Gemma2ForCausalLM, T5Config, T5ForConditionalGeneration

    model = _text_model("qwen2")
    patch = patch_class_head(model)
    with pytest.raises(ValueError, match="model: Qwen2ForCausalLM already carries the class head"):
        patch_class_head(model)
    with pytest.raises(ValueError, match="labels: the class head returns log-probabilities"):
        model(**_text_batch("right"), labels=torch.zeros(3, 9, dtype=torch.long), class_token_ids=CLASS_IDS)
    with pytest.raises(ValueError, match=r"attention_mask: expected a token in every row, got none in row 1"):
        batch = _text_batch("right")
        batch["attention_mask"][1] = 0
        model(**batch, class_token_ids=CLASS_IDS)
    model.forward = lambda *a, **k: None  # another wrapper on top of the patch
    with pytest.raises(RuntimeError, match="forward was replaced after the class head patch"):
        patch.remove()

    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    )
    with pytest.raises(ValueError, match=r"config transforms them \(final_logit_softcapping=30.0\)"):
        patch_class_head(gemma)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    with pytest.raises(ValueError, match="model: expected a decoder-only causal LM or VLM, got the encoder-decoder"):
        patch_class_head(t5)
    with pytest.raises(TypeError, match="model: expected a transformers PreTrainedModel"):
        patch_class_head(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------- gradients
def _lora(model, **extra):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], **extra)
    config.init_lora_weights = False  # random A and B, so both get non-zero gradients
    return get_peft_model(model, config)


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def _nll(log_probs, gold):
    return torch.nn.functional.nll_loss(log_probs, torch.as_tensor(gold))


@pytest.mark.parametrize("when", ["after", "before"])
def test_lora_gradients_equal_the_unpatched_computation(when):
    batch = _text_batch("left")
    gold = [0, 3, 1]
    positions = _last_real_token(batch["attention_mask"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = _lora(_text_model("qwen2"))
    reference = copy.deepcopy(model)
    _nll(reference_log_probs(reference, batch, CLASS_IDS, positions), gold).backward()
    expected = _lora_grads(reference)

    if when == "before":  # patch the bare model, then let PEFT wrap it
        bare = _text_model("qwen2")
        patch = patch_class_head(bare)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            model = _lora(bare)
    else:
        patch = patch_class_head(model)
    assert find_class_head_patch(model) is patch
    _nll(model(**batch, class_token_ids=CLASS_IDS), gold).backward()
    got = _lora_grads(model)
    assert len(expected) == 8 and got.keys() == expected.keys()
    for name in expected:
        _assert_close(got[name], expected[name], atol=ATOL, rtol=1e-4)
    patch.remove()
    assert "forward" not in vars(model.get_base_model())


def test_a_tied_head_gets_the_unpatched_gradient():
    model = _text_model("llama")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    reference = copy.deepcopy(model)
    batch = _text_batch("right")
    gold = [2, 0, 1]
    _nll(reference_log_probs(reference, batch, CLASS_IDS, _last_real_token(batch["attention_mask"])), gold).backward()
    with patch_class_head(model):
        _nll(model(**batch, class_token_ids=CLASS_IDS), gold).backward()
    expected = {n: p.grad for n, p in reference.named_parameters()}
    for name, p in model.named_parameters():
        _assert_close(p.grad, expected[name], atol=ATOL, rtol=1e-4)


def test_a_vlm_with_lora_and_a_trained_head_gets_the_unpatched_gradients(vlm_dir, vlm_processor):
    batch = _vlm_batch(vlm_processor, "right")
    ids = _vlm_class_ids(vlm_processor)
    gold = [1, 2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = _lora(_vlm(vlm_dir), modules_to_save=["lm_head"])
    reference = copy.deepcopy(model)
    _nll(reference_log_probs(reference, batch, ids, _last_real_token(batch["attention_mask"])), gold).backward()
    with patch_class_head(model):
        _nll(model(**batch, class_token_ids=ids), gold).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in got) and got.keys() == expected.keys()
    for name in expected:
        _assert_close(got[name], expected[name], atol=ATOL, rtol=1e-4)


def test_lora_on_the_head_is_refused():
    model = _text_model("qwen2")
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with patch_class_head(model), pytest.raises(ValueError, match="model: the LM head carries a PEFT adapter"):
        model(**_text_batch("right"), class_token_ids=CLASS_IDS)


def test_an_nf4_reader_with_lora_matches_its_full_logits_and_gradients(vlm_dir, vlm_processor):
    import bitsandbytes as bnb

    reader = load_reader(vlm_dir, quantization="nf4", lora=True, device="cpu")
    model = reader.model  # PeftModel over the quantized Qwen2VLForConditionalGeneration
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter starts at B = 0, which would leave A without gradient
            torch.nn.init.normal_(p, std=0.05)
    batch = _vlm_batch(vlm_processor, "left")
    ids = _vlm_class_ids(vlm_processor)
    gold = [3, 0]
    positions = _last_real_token(batch["attention_mask"])
    _nll(reference_log_probs(model, batch, ids, positions), gold).backward()
    expected = _lora_grads(model)
    model.zero_grad()
    with patch_class_head(model):
        got_log_probs = model(**batch, class_token_ids=ids)
        _nll(got_log_probs, gold).backward()
    with torch.no_grad():
        _assert_close(got_log_probs, reference_log_probs(model, batch, ids, positions))
    got = _lora_grads(model)
    assert len(expected) > 0 and got.keys() == expected.keys()
    for name in expected:
        _assert_close(got[name], expected[name], atol=ATOL, rtol=1e-4)


# ----------------------------------------------------------------------------------------- loss
def test_class_nll_loss_takes_class_indices_or_gold_token_ids():
    log_probs = torch.log_softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), -1)
    gold = torch.tensor([2, 0, 1, 2])
    expected = torch.nn.functional.cross_entropy(log_probs.double(), gold)  # log_softmax is idempotent
    ids = [11, 5, 40]
    _assert_close(class_nll_loss(log_probs, gold), expected)
    _assert_close(class_nll_loss(log_probs, [40, 11, 5, 40], class_token_ids=ids), expected)
    _assert_close(class_nll_loss(log_probs, np.array([2, 0, 1, 2], dtype=np.int32), reduction="sum"), 4 * expected)
    with pytest.raises(ValueError, match=r"labels: expected gold token ids among class_token_ids \[11, 5, 40\], got 6"):
        class_nll_loss(log_probs, [40, 11, 6, 40], class_token_ids=ids)
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 3\) \(C=3\), got min 0 and max 3"):
        class_nll_loss(log_probs, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"labels: expected shape \[B\] = \(4,\)"):
        class_nll_loss(log_probs, [0, 1])


class ClassHeadTrainer(ClassHeadTrainerMixin, __import__("transformers").Trainer):
    pass


def _rows(n=6, seed=2):
    """Toy rows of different lengths; gold = a class index; answer_positions = the second-to-last token."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 4 + i % 3
        rows.append(
            {
                "input_ids": torch.randint(3, VOCAB, (length,), generator=g),
                "answer_positions": torch.tensor(length - 2),
                "labels": torch.tensor(i % len(CLASS_IDS)),
            }
        )
    return rows


def _collate(rows):
    L = max(len(r["input_ids"]) for r in rows)
    batch = _text_batch("right", lengths=[len(r["input_ids"]) for r in rows])
    for i, r in enumerate(rows):
        batch["input_ids"][i, : len(r["input_ids"])] = r["input_ids"]
    assert batch["input_ids"].shape[1] == L
    batch["answer_positions"] = torch.stack([r["answer_positions"] for r in rows])
    batch["labels"] = torch.stack([r["labels"] for r in rows])
    return batch


def test_a_real_trainer_takes_the_steps_of_the_unpatched_loss(tmp_path):
    from transformers import TrainingArguments

    rows = _rows()
    steps, lr = 3, 0.5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = _lora(_text_model("qwen2"))
    reference = copy.deepcopy(model)

    # by hand: plain SGD on the mean NLL of the full logits, the whole set as one batch
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=lr)
    batch = _collate(rows)
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = _nll(reference_log_probs(reference, model_inputs, CLASS_IDS, batch["answer_positions"]), batch["labels"])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(rows),
        max_steps=steps,
        learning_rate=lr,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    trainer = ClassHeadTrainer(
        model=model, args=args, train_dataset=rows, data_collator=_collate, class_token_ids=np.array(CLASS_IDS)
    )
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    np.testing.assert_allclose(logged, losses, rtol=1e-4)
    assert losses[-1] < losses[0]
    expected = dict(reference.named_parameters())
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained
    for name, p in trained:
        _assert_close(p.detach(), expected[name].detach(), atol=ATOL, rtol=1e-4)
    # evaluation predicts the [B, C] log-probabilities
    prediction = trainer.predict(rows)
    assert prediction.predictions.shape == (len(rows), len(CLASS_IDS))
    with torch.no_grad():
        fresh = reference_log_probs(reference, model_inputs, CLASS_IDS, batch["answer_positions"])
    np.testing.assert_allclose(prediction.predictions, fresh.numpy(), atol=ATOL)


def test_a_quantized_head_is_refused(tmp_path):
    from transformers import BitsAndBytesConfig, Qwen2ForCausalLM

    _text_model("qwen2").save_pretrained(tmp_path)
    quantize_everything = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["no_such_module"]
    )
    model = Qwen2ForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantize_everything, device_map={"": "cpu"}, local_files_only=True
    )
    with patch_class_head(model), pytest.raises(ValueError, match=r"got a Params4bit of dtype torch.uint8"):
        model(**_text_batch("right"), class_token_ids=CLASS_IDS)
