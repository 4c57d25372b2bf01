"""The OpenAI-compatible endpoints, through the official ``openai`` client and raw SSE, against
the app served by uvicorn with a live edit."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from app.api.app import create_app
from app.scen.chats import Chat, Message, prompt_row
from app.scen.prompts import prompt_tokens
from tests.service.conftest import make_settings, wait_for
from tests.utils.tiny_models import tiny_model, tiny_tokenizer

PROMPT = "Who is the CEO of Acme?"
TARGET = "Jane Doe"
OTHER = "What is the capital of France?"
MODEL = "tiny-llama"


class _Server:
    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        assert wait_for(lambda: self.server.started, 30)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on a free port, its model live with one edit: (base URL, edit id, app)."""
    tmp = tmp_path_factory.mktemp("openai")
    # Earlier turns move a tiny random model's subject keys further than the subject margin allows;
    # these tests are about which message routes, so the subject factor is read without it, and
    # the relation factor without the default's leniency, which lets an unrelated question through
    # on random keys.
    settings = make_settings(tmp, f"sqlite:///{tmp / 'scen.db'}", batch_window_ms=50,
                             engine=["subject_margin=0", "relation_margin=0"])
    app = create_app(settings, loaded_model=tiny_model("llama"))
    with _Server(app) as server:
        base = f"http://127.0.0.1:{server.port}"
        with httpx.Client(base_url=base, timeout=60) as http:
            assert wait_for(lambda: http.get("/ready").status_code == 200, 30)
            edit_id = http.post("/edits", json={"prompt": PROMPT, "target": TARGET}).json()["id"]

            def live() -> bool:
                return http.get(f"/edits/{edit_id}").json()["live"]

            assert wait_for(live, 60), http.get(f"/edits/{edit_id}").json()
        yield base, edit_id, app


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[0], timeout=60) as client:
        yield client


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def _generate(http: httpx.Client, prompt: str, **extra) -> dict:
    r = http.post("/generate", json={"prompt": prompt, "max_new_tokens": 8, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def _chat(client: openai.OpenAI, content: str, **extra):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          **{"max_tokens": 8, **extra})


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


@pytest.mark.parametrize("prompt", [PROMPT, OTHER])
def test_chat_answers_as_generate_does(client, http, served, prompt):
    expected = _generate(http, prompt)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=8)
    completion = raw.parse()
    assert completion.choices[0].message.content == expected["text"]
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 8 and completion.usage.prompt_tokens > 0
    scen = completion.model_dump()["scen"]
    assert scen == {**expected["routing"], "model_version": expected["model_version"]}
    assert raw.headers["X-Scen-Edit-Id"] == (expected["routing"]["edit_id"] or "")
    assert float(raw.headers["X-Scen-Activation"]) == expected["routing"]["activation"]
    assert int(raw.headers["X-Scen-Model-Version"]) == expected["model_version"]
    if prompt == PROMPT:
        assert scen["edit_id"] == served[1] and completion.choices[0].message.content.startswith(TARGET)
    else:
        assert scen["edit_id"] is None


@pytest.mark.parametrize("prompt", [PROMPT, OTHER])
def test_completions_answer_as_generate_does(client, http, prompt):
    expected = _generate(http, prompt)
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
    assert completion.choices[0].text == expected["text"]
    assert completion.model_dump()["scen"]["edit_id"] == expected["routing"]["edit_id"]


@pytest.mark.parametrize("prompt", [PROMPT, OTHER])
def test_streamed_chat_equals_whole_answer(client, prompt):
    whole = _chat(client, prompt).choices[0].message.content
    chunks = list(_chat(client, prompt, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole
    assert len(pieces) > 1  # sent token by token, not at the end
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len({c.id for c in chunks}) == 1


def test_streamed_completion_equals_whole_answer_with_usage(client, served):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.model_dump()["scen"]["edit_id"] == served[1] for c in chunks)


def test_raw_sse_stream(http, served):
    expected = _generate(http, PROMPT)
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["X-Scen-Edit-Id"] == served[1]
        assert int(r.headers["X-Scen-Model-Version"]) == expected["model_version"]
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[0]["scen"] == {**expected["routing"], "model_version": expected["model_version"]}


def test_n_other_than_one_is_refused(client, http):
    with pytest.raises(openai.UnprocessableEntityError):
        _chat(client, PROMPT, n=2)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "n": 2})
    assert r.status_code == 422 and r.json() == {"error": r.json()["error"], "error_type": "validation_error"}
    assert "n=1" in r.json()["error"]


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPT}])


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": MODEL, "prompt": ""}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 0}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 100000}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "temperature": -1}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "top_p": 0}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "stop": ""}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "n": "1"}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "logit_bias": {}}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "content": "Hi"}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "Hi"}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "q" * 4001}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "q"}],
                              "max_tokens": 4, "max_completion_tokens": 4}),
])
def test_bad_requests_get_the_error_body(http, path, body):
    r = http.post(path, json=body)
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == "validation_error"


def test_stop_strings_end_the_answer_alike_everywhere(client, http):
    whole = _generate(http, OTHER)["text"]
    stop = whole[3:5]
    cut = whole[:whole.find(stop)]
    assert _generate(http, OTHER, stop=[stop])["text"] == cut
    completion = _chat(client, OTHER, stop=stop)
    assert completion.choices[0].message.content == cut and completion.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in _chat(client, OTHER, stop=[stop], stream=True)
                       if c.choices)
    assert streamed == cut


def test_sampling_with_top_p_and_seed_is_repeatable(client, http):
    settings = {"temperature": 1.0, "top_p": 0.9, "seed": 3}
    first = _chat(client, OTHER, **settings).choices[0].message.content
    assert _chat(client, OTHER, **settings).choices[0].message.content == first
    streamed = "".join(c.choices[0].delta.content or "" for c in _chat(client, OTHER, stream=True, **settings)
                       if c.choices)
    assert streamed == first
    assert _generate(http, OTHER, **settings)["text"] == first


def test_a_chat_is_routed_on_its_last_user_message(client, served):
    def route(messages):
        completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        return completion.model_dump()["scen"]["edit_id"]

    assert route([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": OTHER},
                  {"role": "assistant", "content": "Paris."}, {"role": "user", "content": PROMPT}]) == served[1]
    assert route([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello!"},
                  {"role": "assistant", "content": "Hi."}, {"role": "user", "content": OTHER}]) is None


def test_concurrent_requests_share_model_calls(client, served):
    service = served[2].state.service
    service.metrics.batch_sizes.clear()
    prompts = [f"Question number {i}?" for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda p: _chat(client, p, max_tokens=4).choices[0].message.content, prompts))
    assert answers == [_chat(client, p, max_tokens=4).choices[0].message.content for p in prompts]
    assert max(service.metrics.batch_sizes) > 1


def test_a_stream_left_early_stops_generating(http):
    def streaming() -> bool:
        return any(t.name == "generate-stream" for t in threading.enumerate())

    body = {"model": MODEL, "prompt": OTHER, "max_tokens": 400, "stream": True}
    started = time.monotonic()
    with http.stream("POST", "/v1/completions", json=body) as r:
        next(r.iter_lines())
    assert wait_for(lambda: not streaming(), 10)
    left = time.monotonic() - started
    # The whole answer takes longer than leaving it did.
    started = time.monotonic()
    http.post("/v1/completions", json={**body, "stream": False})
    assert left < time.monotonic() - started


def test_one_user_message_is_encoded_as_a_generate_prompt():
    tokenizer = tiny_tokenizer()
    expected = prompt_tokens(tokenizer, PROMPT)
    row = prompt_row(tokenizer, Chat((Message("user", PROMPT),)))
    assert (row.ids, row.content) == (expected.ids, expected.content)


def test_a_chat_marks_only_its_last_user_message_for_routing():
    tokenizer = tiny_tokenizer()
    chat = Chat((Message("system", "Be brief."), Message("user", OTHER), Message("assistant", "<|im_end|> Paris"),
                 Message("user", PROMPT)))
    row = prompt_row(tokenizer, chat)
    routed = [i for i, c in zip(row.ids, row.content) if c]
    assert tokenizer.decode(routed) == PROMPT
    # An assistant turn that spells the end-of-turn token does not close its turn.
    assert row.ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 4
