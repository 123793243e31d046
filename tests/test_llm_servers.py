"""The `openai_server` fixture serves SmolLM2-135M-Instruct through a real OpenAI-compatible API.

Drives it with the `openai` client exactly as the scripts' `--llm-backend openai` does. Prompts and
max_tokens are small: about 14 tokens/s on one CPU thread.
"""

import openai
import pytest


def make_client(server) -> openai.OpenAI:
    # Bounded: no retries, and a per-request time limit well above the few seconds a short answer takes.
    return openai.OpenAI(
        base_url=server.base_url, api_key=server.api_key, timeout=60, max_retries=0
    )


def test_server_is_on_loopback(openai_server):
    assert openai_server.base_url.startswith(
        "http://127.0.0.1:"
    ) and openai_server.base_url.endswith("/v1")
    assert openai_server.model


def test_chat_completion_answers_sensibly(openai_server):
    client = make_client(openai_server)
    resp = client.chat.completions.create(
        model=openai_server.model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": "What is the capital of France? Answer in one word."},
        ],
        max_tokens=12,
        temperature=0,
    )
    text = resp.choices[0].message.content
    assert resp.choices[0].message.role == "assistant"
    assert "paris" in text.lower(), f"unexpected answer {text!r}"
    assert 1 <= resp.usage.completion_tokens <= 12
    assert resp.usage.prompt_tokens > 10  # the chat template (system + user turns) was applied


def test_max_tokens_bounds_the_answer(openai_server):
    client = make_client(openai_server)
    resp = client.chat.completions.create(
        model=openai_server.model,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=4,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 4
    assert choice.message.content.strip()


def test_greedy_is_deterministic(openai_server):
    client = make_client(openai_server)
    kwargs = dict(
        model=openai_server.model,
        messages=[{"role": "user", "content": "Name one fruit."}],
        max_tokens=6,
        temperature=0,
    )
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first and first == second


def test_unknown_model_is_an_error(openai_server):
    if openai_server.engine == "external":
        pytest.skip("an external server may serve any model name")
    client = make_client(openai_server)
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
