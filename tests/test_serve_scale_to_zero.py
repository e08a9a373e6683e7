"""Scale to zero: a chat app with min_replicas 0 on a local Ray, through the official openai client
and in Chromium. Once idle for its downscale delay it runs no ChatModel replica; /health then
answers 200 "idle" (the ingress needs no model); a request that arrives then is held while Serve
starts a replica, and streams the same answer as a warm replica gives. The cold start (seconds from
sending to the first token) is printed, for the README; the UI gets its answer the same way.
"""

import time

import openai
import pytest
from ray import serve

from serve.app import ChatAppArgs, build_app
from tests.serve_helpers import engine_reply, request, save_tiny_chat_checkpoint, serve_port, wait_until
from tests.test_serve_ui import message_texts, send_and_wait

APP = "nanochat-scale-to-zero"
ROUTE = "/idle"
MODEL_TAG = "serve-scale-to-zero"
CONVERSATION = [{"role": "user", "content": "What is 12 plus 30?"}]


@pytest.fixture(scope="module")
def idle_app(ray_local, tmp_path_factory):
    """ChatModel between 0 and 1 replicas of half a CPU, scaling down after 1 s without requests."""
    model, tokenizer = save_tiny_chat_checkpoint(MODEL_TAG, str(tmp_path_factory.mktemp("tokenizer")),
                                                 sequence_len=256)
    port = serve_port()
    args = ChatAppArgs(model_tag=MODEL_TAG, replica_cpus=0.5, max_batch_size=2, min_replicas=0, max_replicas=1,
                       upscale_delay_s=0, downscale_delay_s=1, metrics_interval_s=0.5, look_back_period_s=1,
                       health_check_period_s=1)
    serve.run(build_app(args), name=APP, route_prefix=ROUTE)
    yield port, model, tokenizer
    serve.delete(APP)


def wait_for_zero_replicas(port: int) -> None:
    # /health asks the Serve controller; /stats would ask the running replicas, which keeps them busy.
    wait_until(lambda: request(port, "GET", f"{ROUTE}/health")[1]["running_replicas"] == 0, timeout=90,
               interval=0.5, what="no ChatModel replica running")
    wait_until(lambda: not any(request(port, "GET", f"{ROUTE}/stats")[1]["replica_states"].values()), timeout=30,
               interval=0.5, what="the last ChatModel replica stopped")


def test_an_idle_app_runs_no_replica_answers_health_and_holds_then_streams_the_next_request(idle_app):
    port, model, tokenizer = idle_app
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}{ROUTE}/v1", api_key="unused", max_retries=0)
    expected = engine_reply(model, tokenizer, tokenizer.render_for_completion(
        {"messages": CONVERSATION + [{"role": "assistant", "content": ""}]}), temperature=0, max_tokens=8)
    warm = client.chat.completions.create(model="nanochat", messages=CONVERSATION, max_tokens=8, temperature=0)
    assert warm.choices[0].message.content == expected

    wait_for_zero_replicas(port)
    assert request(port, "GET", f"{ROUTE}/health") == (200, {
        "status": "idle", "running_replicas": 0, "message": "scaled to zero: the next request starts a model replica"})

    started = time.perf_counter()
    stream = client.chat.completions.create(model="nanochat", messages=CONVERSATION, max_tokens=8, temperature=0,
                                            stream=True)
    pieces, first_token_s, finish = [], None, None
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.delta.content:
            first_token_s = first_token_s or time.perf_counter() - started
            pieces.append(choice.delta.content)
        finish = choice.finish_reason or finish
    assert "".join(pieces) == expected and finish == "length"
    print(f"\ncold start (scaled to zero -> first token, tiny model, half a CPU): {first_token_s:.1f} s")
    assert request(port, "GET", f"{ROUTE}/health")[1]["status"] == "ok"


def test_the_ui_gets_its_answer_from_an_app_scaled_to_zero(idle_app, browser):
    port, model, tokenizer = idle_app
    wait_for_zero_replicas(port)
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}{ROUTE}/")
        send_and_wait(page, CONVERSATION[0]["content"])
        (_, question), (_, answer) = message_texts(page)
        assert question == CONVERSATION[0]["content"] and answer.strip()
    finally:
        context.close()
