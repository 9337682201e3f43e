"""The LVLM reranker: the prompt's parts, the reply parser on variants, the chat-completions client
against a local HTTP server that checks each request's shape (and fails, stalls or answers
nonsense on cue), the picks through Table 8 against brute force, and the local backend against
the unmodified Hugging Face model on its own processor's inputs."""

import base64
import io
import json
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from jomed_fast.analysis import Candidate, PredictionRecord, rerank_table
from jomed_fast.analysis.lvlm_chat import ChatCompletions, ChatRequestError, ChatResponseError, ReaderChat, endpoint
from jomed_fast.analysis.lvlm_prompt import OUTPUT, SELECT, parse_choice, rerank_prompt
from jomed_fast.analysis.lvlm_rerank import lvlm_picks, write_replies
from jomed_fast.tasks import get_task

K = 4


def image(seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


CANDIDATES = {f"c{i}": (image(100 + i), f"caption of c{i}") for i in range(8)}


def records():
    """Two inconsistent queries (q0, q1) and one consistent (q2), four candidates each, over the
    seven Derma classes."""
    preds = {"q0": [0, 1, 2, 1], "q1": [3, 3, 0, 3], "q2": [4, 4, 4, 4]}
    gold = {"q0": 2, "q1": 0, "q2": 4}

    def probs(c):
        return [0.4 if i == c else 0.1 for i in range(7)]

    out = []
    for q, ps in preds.items():
        ids = [f"c{(int(q[1]) * 3 + k) % 8}" for k in range(K)]
        cands = [
            Candidate(i, "text" if k < 2 else "image", 1.0 - 0.1 * k, probs(p), p)
            for k, (i, p) in enumerate(zip(ids, ps))
        ]
        out.append(PredictionRecord(q, gold[q], "multiclass", cands, ps[0], probs(ps[0])))
    return out


QUERY_IMAGES = {f"q{i}": image(i) for i in range(3)}


# ---------------------------------------------------------------------------------------- prompt
def test_prompt_parts_follow_the_listing():
    task = get_task("derma")
    pairs = [CANDIDATES[f"c{i}"] for i in range(K)]
    parts = rerank_prompt(task, QUERY_IMAGES["q0"], pairs)
    text = "".join(v for kind, v in parts if kind == "text")
    assert [v is QUERY_IMAGES["q0"] for kind, v in parts if kind == "image"] == [True] + [False] * K
    assert [v for kind, v in parts if kind == "image"][1:] == [p[0] for p in pairs]
    assert f"and {K} candidates retrieved for it, each a caption with its image." in text
    assert "Labels:\n" + task.legend() + "Image to classify:" in text
    for n, (_img, caption) in enumerate(pairs, start=1):
        assert f"\nCaption {n}: {caption}" in text
    assert text.endswith(f"{SELECT}\n{OUTPUT}") and OUTPUT == "Output: Caption Number: <n>"
    assert SELECT == "Select the single candidate most informative for classifying the image."
    # captions only: the query image alone
    only = rerank_prompt(task, QUERY_IMAGES["q0"], pairs, with_images=False)
    assert [kind for kind, _ in only].count("image") == 1
    assert "each a caption." in "".join(v for kind, v in only if kind == "text")
    with pytest.raises(ValueError, match="label list"):
        rerank_prompt(get_task("vqa_rad_open"), QUERY_IMAGES["q0"], pairs)


@pytest.mark.parametrize(
    "reply, want",
    [
        ("Caption Number: 2", 1),
        ("**Caption Number:** 3", 2),
        ("Caption Number: **4**", 3),
        ("caption number 1", 0),
        ("Caption No. 2", 1),
        ("Caption #3", 2),
        ("Caption Number: <2>", 1),
        ("Caption Number: two", 1),
        ("caption_number: 4", 3),
        ("Caption 1 shows a nevus; caption 3 a melanoma.\nCaption Number: 3", 2),
        ("Caption Number: 1\n...on reflection,\nCaption Number: 4", 3),
        ("3", 2),
        (" 3. ", 2),
        ("**2**", 1),
        ("I would pick caption 2.", 1),
        ("Caption 2 and caption 2 again", 1),
        ("Caption Number: 5", None),
        ("Caption Number: 0", None),
        ("7", None),
        ("Caption 1 or caption 3", None),
        ("The answer is 3.", None),
        ("Caption Number: <n>", None),
        ("", None),
    ],
)
def test_parse_choice_variants(reply, want):
    choice = parse_choice(reply, K)
    assert choice.index == want, choice
    if want is None:
        assert choice.reason.startswith("names")


# ------------------------------------------------------------------------------- local HTTP server
class Endpoint:
    """A chat-completions server on 127.0.0.1: ``script`` lists what to do with each request
    (``(status, body_bytes, delay_s)``; the last is repeated); ``seen`` the requests it got."""

    def __init__(self, script):
        self.script, self.seen = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.seen.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                status, payload, delay = outer.script[min(len(outer.seen), len(outer.script)) - 1]
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def completion(text):
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()


def decoded(data_url):
    head, b64 = data_url.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_chat_completions_request_shape_and_picks_through_table8(monkeypatch, tmp_path):
    monkeypatch.setenv("RERANK_TEST_KEY", "sk-test-123")
    replies = {"q0": "Caption Number: 3", "q1": "Neither; I cannot tell."}
    order = []

    def script_for(n):
        return [(200, completion(replies[q]), 0.0) for q in n]

    recs = records()
    with Endpoint(script_for(["q0", "q1"])) as server:
        chat = ChatCompletions(server.url, "o3", "RERANK_TEST_KEY", timeout=5, retries=0)
        task = get_task("derma")
        picks, log = lvlm_picks(recs, chat, task, QUERY_IMAGES, CANDIDATES)
        order = [r["query_id"] for r in log]
    assert order == ["q0", "q1"]  # the consistent q2 is not asked
    assert picks == {"q0": 2, "q1": None}
    assert [r["reason"] for r in log] == ["stated Caption Number", "names no caption number"]
    for req, rec in zip(server.seen, recs[:2]):
        assert req["path"] == "/v1/chat/completions"
        assert req["headers"]["Authorization"] == "Bearer sk-test-123"
        assert req["headers"]["Content-Type"] == "application/json"
        body = req["body"]
        assert body["model"] == "o3" and len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
        content = body["messages"][0]["content"]
        want = rerank_prompt(task, QUERY_IMAGES[rec.query_id], [CANDIDATES[c.id] for c in rec.candidates])
        assert [p["type"] for p in content] == ["text" if kind == "text" else "image_url" for kind, _ in want]
        for part, (kind, value) in zip(content, want):
            if kind == "text":
                assert part["text"] == value
            else:
                assert np.array_equal(decoded(part["image_url"]["url"]), value)
    # Table 8: the LVLM row on the inconsistent queries, by brute force
    table = rerank_table(recs, {}, {"lvlm_images": picks})
    cell = table["lvlm_images"]["inconsistent"]
    hits = int(recs[0].candidates[2].prediction == recs[0].gold)
    assert (cell["hits"], cell["n"], cell["no_choice"]) == (hits, 2, 1) and hits == 1
    assert table["lvlm_images"]["consistent"] is None
    write_replies(str(tmp_path / "r.jsonl"), log)
    assert [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()] == log


def test_retries_are_bounded_and_failures_named():
    parts = rerank_prompt(get_task("breast"), image(0), [CANDIDATES["c0"], CANDIDATES["c1"]])
    busy = (503, b'{"error": "busy"}', 0.0)
    with Endpoint([busy, busy, (200, completion("Caption Number: 2"), 0.0)]) as server:
        assert ChatCompletions(server.url, "m", timeout=5, retries=2, backoff=0)(parts) == "Caption Number: 2"
        assert len(server.seen) == 3
    with Endpoint([busy]) as server:
        with pytest.raises(ChatRequestError, match=r"chat/completions: HTTP 503 .*busy.* \(2 attempts\)"):
            ChatCompletions(server.url, "m", timeout=5, retries=1, backoff=0)(parts)
        assert len(server.seen) == 2
    with Endpoint([(401, b'{"error": "bad key"}', 0.0)]) as server:  # not retried
        with pytest.raises(ChatRequestError, match="HTTP 401 .*bad key"):
            ChatCompletions(server.url, "m", timeout=5, retries=3, backoff=0)(parts)
        assert len(server.seen) == 1
    with Endpoint([(200, completion("late"), 1.0)]) as server:
        with pytest.raises(ChatRequestError, match=r"no answer within 0.2 s \(2 attempts\)"):
            ChatCompletions(server.url, "m", timeout=0.2, retries=1, backoff=0)(parts)
    with Endpoint([(200, b'{"id": "x", "object": "error"}', 0.0)]) as server:
        with pytest.raises(ChatResponseError, match=r"expected a chat completion \(choices\[0\]\.message\.content\)"):
            ChatCompletions(server.url, "m", timeout=5)(parts)
    free = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = free.server_address[1]
    free.server_close()  # nothing listens there
    with pytest.raises(ChatRequestError, match=r"cannot connect .* \(1 attempts\)"):
        ChatCompletions(f"http://127.0.0.1:{port}/v1", "m", timeout=5, retries=0)(parts)


def test_client_arguments(monkeypatch):
    monkeypatch.delenv("RERANK_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="RERANK_UNSET_KEY is not set"):
        ChatCompletions("http://127.0.0.1:1/v1", "m", "RERANK_UNSET_KEY")
    with pytest.raises(ValueError, match="url: expected an http"):
        ChatCompletions("ftp://host/v1", "m")
    assert endpoint("https://api.example.com/v1/") == "https://api.example.com/v1/chat/completions"
    assert endpoint("http://h:8000/v1/chat/completions") == "http://h:8000/v1/chat/completions"


def test_missing_inputs_are_named_before_any_call():
    calls = []
    with pytest.raises(ValueError, match="no image for query 'q0'"):
        lvlm_picks(records(), calls.append, get_task("derma"), {}, CANDIDATES)
    with pytest.raises(ValueError, match=r"no index record for ids \['c0'"):
        lvlm_picks(records(), calls.append, get_task("derma"), QUERY_IMAGES, {})
    assert calls == []


# ---------------------------------------------------------------------------------- local backend
@pytest.mark.usefixtures("one_thread")
def test_reader_chat_matches_the_unmodified_hf_model(tmp_path):
    """The local backend's reply is the HF model's greedy continuation of its own processor's
    encoding of the same chat (tiny LLaVA, built offline)."""
    from transformers import AutoProcessor

    from jomed_fast.readers import load_reader, tiny

    path = tiny.build("llava", tmp_path / "llava")
    reader = load_reader(path, device="cpu")
    chat = ReaderChat(reader, max_new_tokens=6)
    parts = rerank_prompt(get_task("synthetic"), image(0, 16), [CANDIDATES[f"c{i}"] for i in range(K)])
    reply = chat(parts)
    images, messages = chat.messages(parts)
    assert len(images) == K + 1
    hf_proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny.model_class("llava").from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    text = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = hf_proc(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
    eot = reader.processor.end_of_turn_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, num_beams=1, eos_token_id=eot, pad_token_id=eot)
    want = hf_proc.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert reply == want and len(reply) > 0
    assert parse_choice(reply, K).index in (None, 0, 1, 2, 3)


# ------------------------------------------------------------------------------------------ analyze
def _workspace(tmp_path):
    """Predictions of two systems, their samples and index records (images as PNG files)."""
    from jomed_fast.analysis import write_jsonl

    recs = records()
    for name, img in QUERY_IMAGES.items():
        Image.fromarray(img).save(tmp_path / f"{name}.png")
    for cid, (img, _caption) in CANDIDATES.items():
        Image.fromarray(img).save(tmp_path / f"{cid}.png")
    labels = get_task("derma").labels
    (tmp_path / "samples.jsonl").write_text(
        "".join(
            json.dumps({"id": r.query_id, "image_path": f"{r.query_id}.png", "answer": labels[r.gold]}) + "\n"
            for r in recs
        )
    )
    (tmp_path / "index.jsonl").write_text(
        "".join(json.dumps({"id": c, "image_path": f"{c}.png", "text": t}) + "\n" for c, (_i, t) in CANDIDATES.items())
    )
    write_jsonl(str(tmp_path / "rag.jsonl"), recs)
    write_jsonl(str(tmp_path / "jomed.jsonl"), recs)
    return recs


def test_analyze_runs_the_lvlm_reranker_against_an_endpoint(tmp_path, capsys, monkeypatch):
    from jomed_fast.cli import main

    recs = _workspace(tmp_path)
    monkeypatch.setenv("RERANK_TEST_KEY", "sk-cli")
    argv = ["analyze", "--system", f"rag={tmp_path / 'rag.jsonl'}", f"jomed={tmp_path / 'jomed.jsonl'}"]
    argv += ["--out", str(tmp_path / "report"), "--task", "derma", "--samples", str(tmp_path / "samples.jsonl")]
    argv += ["--index-records", str(tmp_path / "index.jsonl"), "--lvlm-variant", "both"]
    # incomplete: refused in one line before anything is written
    assert main([*argv, "--lvlm-rerank", "http://127.0.0.1:1/v1"]) == 2
    err = capsys.readouterr().err
    assert "--lvlm-model: required with --lvlm-rerank URL" in err and err.count("\n") == 1
    assert not (tmp_path / "report").exists()
    # q0 then q1, images variant first, then captions only
    script = [(200, completion(t), 0.0) for t in ("Caption Number: 3", "Caption 9", "Caption Number: 2", "4")]
    with Endpoint(script) as server:
        argv += ["--lvlm-rerank", server.url, "--lvlm-model", "o3", "--lvlm-api-key-env", "RERANK_TEST_KEY"]
        assert main(argv) == 0, capsys.readouterr().err
    assert [len(r["body"]["messages"][0]["content"]) for r in server.seen] == [2 + 2 * K + 1] * 2 + [2 + K + 1] * 2
    report = json.loads((tmp_path / "report" / "rerank.json").read_text())["table"]
    assert set(report) == {"rag", "jomed"} and "lvlm_images" not in report["rag"]
    picks = {"lvlm_images": {"q0": 2, "q1": None}, "lvlm_captions": {"q0": 1, "q1": 3}}
    for row, by_query in picks.items():
        hits = sum(
            by_query[r.query_id] is not None and r.candidates[by_query[r.query_id]].prediction == r.gold
            for r in recs[:2]
        )
        cell = report["jomed"][row]["inconsistent"]
        assert (cell["hits"], cell["n"], cell["no_choice"]) == (hits, 2, sum(p is None for p in by_query.values()))
    replies = [json.loads(line) for line in (tmp_path / "report" / "lvlm_rerank.jsonl").read_text().splitlines()]
    assert [(r["query_id"], r["variant"], r["pick"]) for r in replies] == [
        ("q0", "images", 2),
        ("q1", "images", None),
        ("q0", "captions", 1),
        ("q1", "captions", 3),
    ]
    md = (tmp_path / "report" / "rerank.md").read_text()
    assert "| lvlm images |" in md and "o3 at http://127.0.0.1" in md
