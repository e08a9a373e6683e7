"""Tests of the chat service's HTTP API (serve/app.py, serve/api.py) on a local Ray: the seed's
SSE endpoint and the OpenAI-compatible one carry exactly the text the in-process Engine makes for
the same seed; the official `openai` client works against it; every limit is a 400 naming its
field and malformed JSON a 422; a client that hangs up frees its batch row; a conversation's
second turn, from the openai client and from the UI in Chromium, is prefilled from the replica's
prefix cache and answers what a prefill from nothing does; plus the config file,
`python -m serve` without a checkpoint, and the text streaming rules (stop sequences, split
characters) on their own."""

import itertools
import json
import os
import subprocess
import sys

import openai
import pytest
import yaml
from pydantic import ValidationError
from ray import serve
from ray.serve.schema import ServeDeploySchema

from serve import conversation_check
from serve.api import MAX_MESSAGE_CHARS, MAX_MESSAGES, TextStream
from serve.app import ChatAppArgs, build_app
from tests.serve_helpers import (EventStream, engine_reply, request, save_tiny_chat_checkpoint, serve_port,
                                 stream_events, wait_until)
from tests.test_serve_ui import message_texts, send_and_wait

APP = "nanochat-api"
MODEL_TAG = "serve-api"
CONTEXT = 1024
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERSATION = [{"role": "user", "content": "What is 12 plus 30?"}]


@pytest.fixture(scope="module")
def chat_app(ray_local, tmp_path_factory):
    """One ChatModel replica of a tiny checkpoint behind the ingress at /; (port, model, tokenizer)."""
    model, tokenizer = save_tiny_chat_checkpoint(MODEL_TAG, str(tmp_path_factory.mktemp("tokenizer")),
                                                 sequence_len=CONTEXT)
    port = serve_port()
    serve.run(build_app(ChatAppArgs(model_tag=MODEL_TAG, replica_cpus=0.5, max_batch_size=4)), name=APP,
              route_prefix="/")
    yield port, model, tokenizer
    serve.delete(APP)


def model_stats() -> dict:
    return serve.get_deployment_handle("ChatModel", APP).stats.remote().result()


def engine_text(model, tokenizer, messages, **settings) -> str:
    """The answer the in-process Engine gives to a conversation."""
    prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    return engine_reply(model, tokenizer, prompt, **settings)


def test_sse_and_openai_streams_carry_the_engine_text_for_a_fixed_seed(chat_app):
    port, model, tokenizer = chat_app
    settings = dict(temperature=0.9, top_k=40, seed=1234, max_tokens=48)
    expected = engine_text(model, tokenizer, CONVERSATION, **settings)
    assert len(expected) > 10

    events = stream_events(port, "/chat/completions", {"messages": CONVERSATION, **settings})
    assert events[-1]["done"] is True
    assert "".join(event["token"] for event in events[:-1]) == expected
    assert events[-1]["usage"]["completion_tokens"] <= settings["max_tokens"]

    chunks = stream_events(port, "/v1/chat/completions", {"messages": CONVERSATION, "stream": True, **settings})
    assert chunks[-1] == "[DONE]"
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks[:-1])
    assert text == expected


def test_openai_client_streaming_and_not(chat_app):
    port, *_ = chat_app
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed", max_retries=0)
    (model,) = client.models.list().data
    assert model.id == f"nanochat-sft-{MODEL_TAG}"

    # Greedy decoding of this model never stops by itself (see save_tiny_chat_checkpoint).
    whole = client.chat.completions.create(model=model.id, messages=CONVERSATION, max_tokens=12, temperature=0)
    (choice,) = whole.choices
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content
    assert (whole.usage.completion_tokens, whole.usage.total_tokens) == (12, whole.usage.prompt_tokens + 12)

    stream = client.chat.completions.create(model=model.id, messages=CONVERSATION, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"top_k": 5})
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) \
        == choice.message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    # n choices, each with its own seed; a stop sequence cuts its choice short with reason "stop".
    several = client.chat.completions.create(model=model.id, messages=CONVERSATION, max_tokens=30, n=3,
                                             temperature=1.0, seed=5)
    assert [choice.index for choice in several.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in several.choices]
    assert len(set(texts)) == 3
    stop = texts[0][5:7]
    stopped = client.chat.completions.create(model=model.id, messages=CONVERSATION, max_tokens=30,
                                             temperature=1.0, seed=5, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == texts[0][:texts[0].index(stop)]

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model.id, messages=CONVERSATION, temperature=2.5)
    assert refused.value.status_code == 400
    assert "temperature" in refused.value.message


def raw_event_stream(port: int, body: dict) -> list:
    """The payloads of a streamed /v1/chat/completions, read from the raw bytes: every event must be
    one `data: ...` line and a blank line. JSON payloads parsed, others (such as [DONE]) as text."""
    status, text = request(port, "POST", "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and isinstance(text, str), text
    assert text.endswith("\n\n"), text[-200:]
    payloads = []
    for event in text[:-2].split("\n\n"):
        assert event.startswith("data: ") and "\n" not in event, event
        payload = event[len("data: "):]
        payloads.append(payload if payload == "[DONE]" else json.loads(payload))
    return payloads


def test_a_streamed_openai_answer_has_the_chunk_schema_on_the_wire(chat_app):
    port, *_ = chat_app
    body = {"messages": CONVERSATION, "max_tokens": 12, "temperature": 0}
    *chunks, done = raw_event_stream(port, body)
    assert done == "[DONE]"
    status, models = request(port, "GET", "/v1/models")
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk["model"] for chunk in chunks} == {models["data"][0]["id"]}
    (completion_id,) = {chunk["id"] for chunk in chunks}
    assert completion_id.startswith("chatcmpl-")
    assert len({chunk["created"] for chunk in chunks}) == 1
    choices = [chunk["choices"] for chunk in chunks]
    assert all(len(choice) == 1 and choice[0]["index"] == 0 for choice in choices)
    deltas = [choice[0]["delta"] for choice in choices]
    reasons = [choice[0]["finish_reason"] for choice in choices]
    # The role first, then the text, then an empty delta that says why the answer ended.
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert len(deltas) >= 3 and all(set(delta) == {"content"} and delta["content"] for delta in deltas[1:-1])
    assert (deltas[-1], reasons[-1]) == ({}, "length") and set(reasons[:-1]) == {None}
    # Another request is another completion.
    assert raw_event_stream(port, body)[0]["id"] != completion_id


def test_streamed_choices_arrive_interleaved_each_with_its_own_role_text_and_end(chat_app):
    port, *_ = chat_app
    body = {"messages": CONVERSATION, "max_tokens": 40, "temperature": 1.0, "seed": 11, "n": 3}
    *chunks, done = raw_event_stream(port, body)
    assert done == "[DONE]"
    assert len({chunk["id"] for chunk in chunks}) == 1
    positions = {index: [] for index in range(3)}  # where each choice's content chunks are in the stream
    texts, endings = [""] * 3, [None] * 3
    for position, chunk in enumerate(chunks):
        (choice,) = chunk["choices"]
        index, delta = choice["index"], choice["delta"]
        if delta.get("role"):
            assert not positions[index] and endings[index] is None, "the role delta must come first"
        elif delta:
            assert endings[index] is None, "text after the choice's end"
            positions[index].append(position)
            texts[index] += delta["content"]
        else:
            endings[index] = choice["finish_reason"]
    # The three are rows of one batch: each choice's text starts before every other one's ends.
    for first, other in itertools.permutations(range(3), 2):
        assert positions[first][0] < positions[other][-1], positions
    whole = request(port, "POST", "/v1/chat/completions", {**body, "stream": False})[1]
    assert texts == [choice["message"]["content"] for choice in whole["choices"]]
    assert endings == [choice["finish_reason"] for choice in whole["choices"]]


LONG = "x" * (MAX_MESSAGE_CHARS + 1)
ALMOST_LONG = "y" * (MAX_MESSAGE_CHARS - 1)
LIMIT_CASES = [
    # (body fields, field named in the error)
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * (MAX_MESSAGES // 2)
      + [{"role": "user", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": LONG}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ALMOST_LONG}, {"role": "assistant", "content": ALMOST_LONG}] * 2
      + [{"role": "user", "content": ALMOST_LONG}]}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages[1].role"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 201}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 4097}, "max_tokens"),
    # Within the seed's 4096 but past what this model's context leaves: refused by the replica.
    ({"max_tokens": CONTEXT}, "max_tokens"),
]
OPENAI_ONLY_CASES = [
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop[0]"),
    ({"seed": -1}, "seed"),
    ({"max_completion_tokens": 5000}, "max_completion_tokens"),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_every_limit_is_a_400_naming_its_field_and_no_work_is_done(chat_app, path):
    port, *_ = chat_app
    cases = LIMIT_CASES + (OPENAI_ONLY_CASES if path.startswith("/v1") else [])
    before = model_stats()
    for fields, field in cases:
        status, body = request(port, "POST", path, {"messages": CONVERSATION, **fields})
        assert status == 400, (fields, body)
        assert body["error"]["param"] == field, (fields, body)
        assert body["error"]["limit"] and body["error"]["message"], (fields, body)
    after = model_stats()
    assert (after["requests_finished"], after["tokens_generated"]) == \
        (before["requests_finished"], before["tokens_generated"])


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_malformed_json_is_a_422(chat_app, path):
    port, *_ = chat_app
    status, body = request(port, "POST", path, raw=b'{"messages": [')
    assert status == 422 and "not valid JSON" in body["error"]["message"]
    status, body = request(port, "POST", path, {"messages": "hello"})
    assert status == 422 and body["error"]["param"] == "messages"
    status, body = request(port, "POST", path, {"messages": CONVERSATION, "temperature": "warm"})
    assert status == 422 and body["error"]["param"] == "temperature"


def test_a_client_that_hangs_up_frees_its_batch_row(chat_app):
    port, *_ = chat_app
    max_tokens = CONTEXT - 100
    before = model_stats()
    stream = EventStream(port, "/chat/completions", {"messages": CONVERSATION, "temperature": 0,
                                                     "max_tokens": max_tokens})
    assert stream.status == 200
    for _ in range(3):
        assert "token" in stream.next_event()
    assert model_stats()["active"] == 1
    stream.close()
    stats = wait_until(lambda: (s := model_stats())["active"] == 0 and s, timeout=20, what="the row being freed")
    assert stats["queued"] == 0
    assert stats["requests_finished"] == before["requests_finished"] + 1
    # Cancelled long before its max_tokens: the stream is read-paced, so the replica ran only a little ahead.
    assert stats["tokens_generated"] - before["tokens_generated"] < max_tokens // 2


def test_health_stats_models_and_ui(chat_app):
    port, *_ = chat_app
    assert request(port, "GET", "/health") == (200, {"status": "ok", "running_replicas": 1})
    status, stats = request(port, "GET", "/stats")
    assert status == 200 and stats["replicas"] == 1 and len(stats["per_replica"]) == 1
    assert stats["active_sequences"] == 0 and stats["queue_depth"] == 0
    status, models = request(port, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["context_length"] == CONTEXT
    status, page = request(port, "GET", "/")
    assert status == 200 and "<title>nanochat</title>" in page and "chat/completions" in page


def test_each_turn_resent_with_its_history_is_prefilled_from_the_prefix_cache(chat_app):
    port, model, tokenizer = chat_app
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    _, before = request(port, "GET", "/stats")
    messages = [{"role": "system", "content": "You are a careful assistant who answers in one short sentence."},
                {"role": "user", "content": "What is 12 plus 30?"}]
    for _ in range(2):
        reply = client.chat.completions.create(model="nanochat", messages=messages, max_tokens=8,
                                               temperature=0).choices[0].message.content
        # what the cached keys and values give is what a prefill from nothing gives
        assert reply == engine_text(model, tokenizer, messages, temperature=0, max_tokens=8)
        messages = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And 7 times 6?"}]
    _, after = request(port, "GET", "/stats")
    first_prompt = len(tokenizer.render_for_completion({"messages": messages[:2] + [{"role": "assistant",
                                                                                        "content": ""}]}))
    # the second turn found the first turn's prompt, in whole blocks (at least one: the prompt is longer)
    assert first_prompt > 16 and after["prefix_hit_tokens"] - before["prefix_hit_tokens"] >= first_prompt // 16 * 16
    assert after["prefix_prompt_tokens"] > before["prefix_prompt_tokens"] and after["prefix_cached_blocks"] > 0
    assert after["per_replica"][0]["prefix_cache_blocks"] == 4 * CONTEXT // 16


def test_the_scripted_conversation_check_runs_its_turns_or_stops_at_the_refusal(chat_app, capsys):
    port, *_ = chat_app
    url = f"http://127.0.0.1:{port}/v1"
    assert conversation_check.main(["--base-url", url, "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant (") == len(conversation_check.SCRIPT) and "[turn 10] user: Thanks!" in out
    assert f"of a {CONTEXT}-token context" in out
    assert out.splitlines()[-1] == "RESULT conversation_turns 10.000 target >= 10 PASS"
    # Answers that fill the context: the second turn's max_tokens no longer fits, and the check
    # stops there with the service's reason.
    assert conversation_check.main(["--base-url", url, "--max-tokens", "600", "--turns", "3"]) == 1
    out = capsys.readouterr().out
    assert "turn 2 refused: Error code: 400" in out and "max_tokens=600 does not fit" in out
    assert "1 of 3 turns answered" in out and out.splitlines()[-1].endswith("target >= 3 FAIL")


def test_the_uis_second_turn_is_prefilled_from_the_prefix_cache(chat_app, browser):
    port, *_ = chat_app
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        send_and_wait(page, "Please tell me a short story about a fox and a dog.")
        _, before = request(port, "GET", "/stats")
        send_and_wait(page, "And one about a cat?")
        _, after = request(port, "GET", "/stats")
        assert len(message_texts(page)) == 4
        # the UI resends the first turn with the second: at least its first block comes from the cache
        assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] >= 16
    finally:
        context.close()


def test_config_file_builds_the_app_with_its_numbers(chat_app):
    with open(os.path.join(REPO_ROOT, "serve", "config.yaml")) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    (application,) = config.applications
    assert application.import_path == "serve.app:build_app"
    # What `serve run` does with the args of a builder whose parameter is a pydantic model; the tag
    # is this module's (other test modules save theirs in the same base dir), its step is resolved.
    assert (application.args["model_tag"], application.args["step"]) == (None, None)
    app = build_app(ChatAppArgs.model_validate({**application.args, "model_tag": MODEL_TAG}))
    # Serve has no public accessor for a bound app's parts: ChatAPI.bind(ChatModel.bind(...), defaults, retry).
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert model.init_args[:3] == ("sft", MODEL_TAG, 1)
    assert model.init_args[-1] is application.args["transposed_weights"] is True
    without_copies = build_app(ChatAppArgs(model_tag=MODEL_TAG, step=1, transposed_weights=False))
    assert without_copies._bound_deployment.init_args[0]._bound_deployment.init_args[-1] is False
    autoscaling = model._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 2)
    assert autoscaling.target_ongoing_requests == application.args["max_batch_size"]
    assert model.max_ongoing_requests == application.args["max_ongoing_requests"]
    assert model._deployment_config.max_queued_requests == application.args["max_queued_requests"]
    ingress_autoscaling = ingress._deployment_config.autoscaling_config
    assert (ingress_autoscaling.min_replicas, ingress_autoscaling.max_replicas) == (2, 4)
    assert ingress._deployment_config.max_queued_requests == application.args["ingress_max_queued_requests"]
    for deployment in (model, ingress):
        backpressure = deployment._deployment_config.backpressure_config
        assert (backpressure.status_code, backpressure.retry_after_s) == (503, application.args["retry_after_s"])
    with pytest.raises(ValidationError, match="max_batch_sise"):
        ChatAppArgs.model_validate({"max_batch_sise": 4})


@pytest.mark.parametrize("now, most, replica_gpus, expected", [
    ({"CPU": 8.0}, None, None, 0),                       # no GPU now, no autoscaler config
    ({"CPU": 8.0}, {"CPU": 64, "GPU": 0}, None, 0),      # an autoscaler of CPU nodes only
    ({"CPU": 8.0}, {"CPU": 64, "GPU": 16}, None, 1),     # no GPU node up yet, but the autoscaler has them
    ({"CPU": 8.0, "GPU": 8.0}, None, None, 1),           # GPUs up now
    ({"CPU": 8.0}, {"CPU": 64, "GPU": 16}, 0.5, 0.5),    # an explicit replica_gpus wins
])
def test_replicas_ask_for_a_gpu_when_the_cluster_has_or_can_add_one(monkeypatch, now, most, replica_gpus,
                                                                      expected):
    import ray

    from serve.app import replica_resources
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: now)
    monkeypatch.setattr(ray._private.state.state, "get_max_resources_from_cluster_config", lambda: most)
    resources = replica_resources(ChatAppArgs(replica_gpus=replica_gpus, replica_cpus=2))
    assert resources == {"num_gpus": expected, "num_cpus": 2}


def test_python_m_serve_without_a_checkpoint_names_the_command_that_makes_one(tmp_path):
    environment = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "serve"], cwd=REPO_ROOT, env=environment, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert "python -m ray_jobs.chat_sft" in result.stderr


class TestTextStream:
    """Token ids in, text out: the pieces a client sees."""

    @staticmethod
    def decode(tokens):
        return b"".join(bytes([token]) for token in tokens).decode("utf-8", errors="replace")

    def pieces(self, text: str, stop=()):
        stream = TextStream(self.decode, stop)
        pieces = [stream.push(byte) for byte in text.encode()]
        return [piece for piece in pieces + [stream.finish()] if piece], stream

    def test_a_character_split_across_tokens_is_held_back_until_whole(self):
        pieces, _ = self.pieces("aé€")
        assert pieces == ["a", "é", "€"]

    def test_a_stop_sequence_ends_the_text_before_it_even_across_tokens(self):
        pieces, stream = self.pieces("hello world, bye", stop=["zzz", "ld, b"])
        assert "".join(pieces) == "hello wor"
        assert stream.stopped

    @pytest.mark.parametrize("stop", [(), ("ld, b",)])
    def test_tokens_pushed_in_batches_give_the_text_and_count_of_one_by_one(self, stop):
        text = "aé€ hello world, bye 😀 end"
        one_by_one, single = self.pieces(text, stop)
        for size in (2, 3, 7, 100):
            stream = TextStream(self.decode, stop)
            data = list(text.encode())
            pieces = [stream.push_many(data[i:i + size]) for i in range(0, len(data), size)] + [stream.finish()]
            # the same text, cut at a character boundary wherever a batch ends inside a character
            assert "".join(pieces) == "".join(one_by_one), size
            assert all("\ufffd" not in piece for piece in pieces)
            assert (stream.tokens, stream.stopped) == (single.tokens, single.stopped), size
        assert len(one_by_one) > (len(text) // 2 if not stop else 5)  # (one by one: about a piece per character)

    def test_text_that_only_starts_like_a_stop_sequence_is_released_in_the_end(self):
        pieces, stream = self.pieces("say STO", stop=["STOP"])
        assert pieces[-1].endswith("STO") and "".join(pieces) == "say STO"
        assert not stream.stopped
