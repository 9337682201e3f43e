"""Where the LVLM reranker's prompt goes: a local Hugging Face VLM, or an OpenAI-compatible
chat-completions endpoint. Both take the prompt's parts (:func:`.lvlm_prompt.rerank_prompt`) and
return the model's reply text.

``ReaderChat``: a :class:`jomed_fast.readers.Reader` (the project's reader by default, or any VLM
``load_reader`` opens), the parts as one user turn through its chat template (an
``{"type": "image"}`` part per image, the images in order: ``ReaderProcessor.encode_batch``),
decoded greedily by the unmodified ``generate`` until the end-of-turn token or ``max_new_tokens``.

``ChatCompletions``: ``POST {url}`` (``…/chat/completions``; a base URL such as
``http://host:8000/v1`` gets ``/chat/completions`` appended) with the standard library only::

    {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": ...},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}, ...]}]}

and ``Authorization: Bearer $KEY`` when an environment variable is named for the key. The reply is
``choices[0].message.content`` (a string, or a list of text parts joined). Failures are named:
an HTTP status other than 408 / 429 / 5xx fails at once (:class:`ChatRequestError`, with the
start of the body); 408 / 429 / 5xx, a connection failure and a timeout are retried ``retries``
times (``backoff * 2**attempt`` seconds apart) and then fail; a body that is not the format above
is a :class:`ChatResponseError`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

from .lvlm_prompt import Part

__all__ = ["ChatCompletions", "ChatRequestError", "ChatResponseError", "ReaderChat", "png_data_url"]

RETRIED_STATUS = (408, 429, 500, 502, 503, 504)


class ChatRequestError(OSError):
    """The endpoint could not be reached or answered with an error status (after the retries)."""


class ChatResponseError(ValueError):
    """The endpoint answered, but not with a chat completion."""


def png_data_url(image) -> str:
    """``data:image/png;base64,…`` of an image (a PIL image or an array ``prompts.as_image`` takes)."""
    from ..prompts import as_image

    buf = io.BytesIO()
    as_image(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ReaderChat:
    """A local VLM (``jomed_fast.readers.Reader``) answering the prompt greedily."""

    def __init__(self, reader, max_new_tokens: int = 32):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        self.reader, self.max_new_tokens = reader, max_new_tokens

    def messages(self, parts: Sequence[Part]) -> tuple[list, list[dict]]:
        """``(images, messages)`` of one user turn, as ``ReaderProcessor.encode_batch`` takes them."""
        from ..prompts import as_image

        content: list[dict] = []
        images = []
        for kind, value in parts:
            if kind == "image":
                content.append({"type": "image"})
                images.append(as_image(value))
            else:
                content.append({"type": "text", "text": value})
        return images, [{"role": "user", "content": content}]

    def __call__(self, parts: Sequence[Part]) -> str:
        import torch

        images, messages = self.messages(parts)
        inputs = self.reader.encode_batch([(images, messages)])
        proc = self.reader.processor
        with torch.no_grad():
            out = self.reader.hf_model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=proc.end_of_turn_token_id,
                pad_token_id=proc.pad_token_id,
            )
        generated = out[0, inputs["input_ids"].shape[1] :].tolist()
        return proc.decode(generated, skip_special_tokens=True).strip()


def endpoint(url: str) -> str:
    """The chat-completions URL of ``url`` (see the module docstring); ``ValueError`` if not http(s)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"url: expected an http(s) URL of a chat-completions endpoint, got {url!r}")
    path = parsed.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions"
    return urllib.parse.urlunparse(parsed._replace(path=path))


class ChatCompletions:
    """An OpenAI-compatible chat-completions endpoint (see the module docstring).

    Args:
        url: the endpoint, or its base (``…/v1``).
        model: the model name sent with each request.
        api_key_env: the environment variable holding the API key; None sends no key. Named but
            unset is a ``ValueError`` (the key itself is never written anywhere).
        timeout: seconds per request. retries: further attempts after a retryable failure.
        backoff: seconds before the first retry, doubled for each further one.
    """

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 1.0,
    ):
        if not model:
            raise ValueError("model: expected the endpoint's model name, got none")
        if not timeout > 0 or retries < 0 or backoff < 0:
            raise ValueError(
                f"timeout, retries, backoff: expected > 0, >= 0, >= 0; got {timeout}, {retries}, {backoff}"
            )
        self.url, self.model = endpoint(url), model
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._key = None
        if api_key_env is not None:
            self._key = os.environ.get(api_key_env)
            if not self._key:
                raise ValueError(f"api_key_env: the environment variable {api_key_env} is not set (or empty)")

    def body(self, parts: Sequence[Part]) -> dict:
        content = [
            {"type": "text", "text": v}
            if kind == "text"
            else {"type": "image_url", "image_url": {"url": png_data_url(v)}}
            for kind, v in parts
        ]
        return {"model": self.model, "messages": [{"role": "user", "content": content}]}

    def _request(self, data: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return resp.read()

    def __call__(self, parts: Sequence[Part]) -> str:
        data = json.dumps(self.body(parts)).encode("utf-8")
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._reply(self._request(data))
            except urllib.error.HTTPError as exc:
                text = exc.read()[:200].decode("utf-8", "replace")
                failure = f"HTTP {exc.code} {exc.reason}: {text}"
                if exc.code not in RETRIED_STATUS:
                    raise ChatRequestError(f"{self.url}: {failure}") from None
            except TimeoutError:
                failure = f"no answer within {self.timeout:g} s"
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, TimeoutError):
                    failure = f"no answer within {self.timeout:g} s"
                else:
                    failure = f"cannot connect ({exc.reason})"
        raise ChatRequestError(f"{self.url}: {failure} ({self.retries + 1} attempts)")

    def _reply(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ChatResponseError(
                f"{self.url}: expected a chat completion (choices[0].message.content), got {raw[:200]!r}"
            ) from None
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ChatResponseError(f"{self.url}: choices[0].message.content is {type(content).__name__}, not text")
        return content
