"""The one LLM client (`LLMClient`, identical in all five scripts: tests/test_siblings.py) driven for real.

Because the class source is the same in every script, it is tested once here: its source is taken from
keystate_gciql.py with `ast` (so no JAX/torch import of a whole script is needed) and run on
  * ``openai``: the scripted OpenAI-compatible server on 127.0.0.1 (tests/support/scripted_llm.py): answers, HTTP errors,
    cut connections, hangs past the timeout, oversized answers, and a URL where nothing listens;
  * ``openai`` against a real engine: `transformers serve` with SmolLM2-135M-Instruct (conftest `openai_server`);
  * ``transformers``: SmolLM2-135M-Instruct in process (greedy, batched with left padding).
Each script's own smoke tests then drive the same client through the script's relabeling code.
"""

import ast
import concurrent.futures
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_client_class():
    src = (REPO / "keystate_gciql.py").read_text()
    node = next(
        n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "LLMClient"
    )
    namespace = {"os": os, "concurrent": concurrent, "Optional": Optional}
    exec(
        compile(ast.get_source_segment(src, node), "keystate_gciql.py:LLMClient", "exec"), namespace
    )
    return namespace["LLMClient"]


def make_args(**kw):
    base = dict(
        llm_backend="openai",
        llm_model="scripted",
        llm_base_url="",
        llm_timeout=5.0,
        llm_max_new_tokens=32,
        llm_temperature=0.0,
        llm_concurrency=4,
        seed=0,
    )
    return SimpleNamespace(**{**base, **kw})


def test_openai_answers_in_order_and_counts_failures(scripted_llm):
    def respond(messages):
        q = messages[-1]["content"]
        return {"fail": 500, "cut": "<cut>"}.get(q, f"echo: {q}")

    scripted_llm.respond = respond
    client = load_client_class()(make_args(llm_base_url=scripted_llm.base_url))
    outs = client.chat([[{"role": "user", "content": q}] for q in ["a", "fail", "b", "cut", "c"]])
    assert outs == ["echo: a", None, "echo: b", None, "echo: c"]
    assert client.failures == 2
    # the two failing requests were retried twice each (max_retries=2), the others sent once
    asked = [m[-1]["content"] for m in scripted_llm.requests]
    assert asked.count("fail") == 3 and asked.count("a") == 1


def test_openai_hang_is_a_bounded_counted_failure(scripted_llm):
    scripted_llm.respond = lambda messages: "<hang>"
    client = load_client_class()(make_args(llm_base_url=scripted_llm.base_url, llm_timeout=0.5))
    assert client.chat([[{"role": "user", "content": "q"}]]) == [None]
    # bounded: the request and its max_retries=2 retries, each cut at the client's timeout, then a counted failure
    assert len(scripted_llm.requests) == 3 and client.failures == 1


def test_openai_answer_size_is_bounded(scripted_llm):
    scripted_llm.respond = lambda messages: "x" * 1_000_000
    client = load_client_class()(
        make_args(llm_base_url=scripted_llm.base_url, llm_max_new_tokens=8)
    )
    (out,) = client.chat([[{"role": "user", "content": "q"}]])
    assert out == "x" * (16 * 8)


def test_openai_nothing_listening_is_one_error_line():
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as e:
        load_client_class()(make_args(llm_base_url=f"http://127.0.0.1:{port}/v1", llm_timeout=2.0))
    msg = str(e.value)
    assert msg.startswith("error: --llm-base-url") and "\n" not in msg


def test_transformers_missing_model_is_one_error_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        load_client_class()(
            make_args(llm_backend="transformers", llm_model=str(tmp_path / "nothing"))
        )
    assert str(e.value).startswith("error: --llm-model")


QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_transformers_backend_greedy_batched(smollm2_dir):
    import torch

    torch.set_num_threads(1)
    client = load_client_class()(
        make_args(
            llm_backend="transformers",
            llm_model=str(smollm2_dir),
            llm_max_new_tokens=12,
            llm_concurrency=2,
        )
    )
    other = [{"role": "user", "content": "Say hello."}]
    batched = client.chat([QUESTION, other, QUESTION])
    assert "Paris" in batched[0] and batched[0] == batched[2]
    alone = client.chat([QUESTION])
    assert alone[0] == batched[0]  # left padding does not change the greedy answer
    assert client.failures == 0


def test_openai_backend_against_a_real_engine(openai_server):
    client = load_client_class()(
        make_args(
            llm_base_url=openai_server.base_url,
            llm_model=openai_server.model,
            llm_timeout=120.0,
            llm_max_new_tokens=12,
        )
    )
    (answer,) = client.chat([QUESTION])
    assert answer and "Paris" in answer, answer
