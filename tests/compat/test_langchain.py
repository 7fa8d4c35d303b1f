"""LangChain's OpenAI wrappers (``langchain-openai``) against the live server.

``langchain_openai.OpenAI`` is the completion wrapper: it sends its own defaults (``logit_bias``,
``best_of``, ``seed``, ...) and, for ``generate`` over several inputs, a list of prompts in one
request, matched back by ``index``. ``ChatOpenAI`` sends the chat shape with its own extras. Both
must work as they do against OpenAI: no field refused that a default client sends, one answer per
prompt in the order given, streaming included.
"""

from __future__ import annotations

import importlib.util
import os

import httpx
import pytest


def require_langchain() -> None:
    if importlib.util.find_spec("langchain_openai") is None:
        msg = "langchain-openai is not installed: pip install -e '.[dev]' installs it"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(server.url("/v1/models")).json()["data"][0]["id"]


def completion(server, model: str, prompt: str, max_tokens: int) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(server.url("/v1/completions"), json=body, timeout=60).json()["choices"][0]["text"]


def test_completion_wrapper_batches_prompts_in_order(server, model):
    require_langchain()
    from langchain_openai import OpenAI

    llm = OpenAI(
        model=model, base_url=server.url("/v1"), api_key="unused", temperature=0, max_tokens=6, max_retries=0
    )
    prompts = ["ROMEO.\n", "JULIET.\n", "HAMLET.\nTo be"]
    result = llm.generate(prompts)  # one request with a list of prompts
    got = [gens[0].text for gens in result.generations]
    assert got == [completion(server, model, p, 6) for p in prompts]
    assert llm.invoke("ROMEO.\n") == got[0]
    assert "".join(llm.stream("JULIET.\n")) == got[1]


def test_chat_wrapper(server, model):
    require_langchain()
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=model, base_url=server.url("/v1"), api_key="unused", temperature=0, max_tokens=5, max_retries=0
    )
    reply = chat.invoke([("system", "Answer in verse."), ("user", "Who art thou?")])
    assert isinstance(reply.content, str) and reply.response_metadata["finish_reason"] in ("stop", "length")
    streamed = "".join(chunk.content for chunk in chat.stream([("user", "Who art thou?")]))
    assert streamed == chat.invoke([("user", "Who art thou?")]).content
