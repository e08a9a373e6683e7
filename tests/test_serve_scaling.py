"""Tests of how the chat service behaves under load on a local Ray: with an autoscaling config of
short delays a burst of concurrent streams makes Serve add a ChatModel replica and remove it once
the burst is over; and when a replica is killed mid-answer, the streams it was serving end with an
error event instead of hanging (on /v1 an error chunk and no [DONE]), and the next requests are
answered by its replacement. A newer checkpoint step is saved after the app is built: the replica
added by the burst and the replacement of the killed one still load the step that build_app
resolved."""

import threading
import time

import pytest
import ray
from ray import serve

from serve.app import ChatAppArgs, build_app
from tests.serve_helpers import EventStream, request, save_tiny_chat_checkpoint, serve_port, stream_events, wait_until

APP = "nanochat-scaling"
ROUTE = "/scaling"
MODEL_TAG = "serve-scaling"
CONTEXT = 512
CONVERSATION = [{"role": "user", "content": "Count to a hundred."}]
BURST_CLIENTS = 6
BUILT_STEP = 1


@pytest.fixture(scope="module")
def scaling_app(ray_local, tmp_path_factory):
    """ChatModel autoscaling between 1 and 2 replicas of half a CPU each, reacting within a second
    or two: it wants 2 ongoing requests per replica, measures every 0.5 s over a 1 s window, and
    Serve checks every second that the replicas are alive. The app is built at step 1 of its tag;
    step 2 is saved before it runs."""
    tokenizer_dir = str(tmp_path_factory.mktemp("tokenizer"))
    save_tiny_chat_checkpoint(MODEL_TAG, tokenizer_dir, sequence_len=CONTEXT)
    port = serve_port()
    args = ChatAppArgs(model_tag=MODEL_TAG, replica_cpus=0.5, max_batch_size=4, max_ongoing_requests=4,
                       min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=0.5,
                       downscale_delay_s=2, metrics_interval_s=0.5, look_back_period_s=1, health_check_period_s=1)
    app = build_app(args)
    save_tiny_chat_checkpoint(MODEL_TAG, tokenizer_dir, sequence_len=CONTEXT, step=BUILT_STEP + 1)
    serve.run(app, name=APP, route_prefix=ROUTE)
    yield port
    serve.delete(APP)


def serve_stats(port: int) -> dict:
    status, stats = request(port, "GET", f"{ROUTE}/stats")
    assert status == 200, stats
    return stats


def running_replicas(port: int) -> int:
    return serve_stats(port)["replicas"]


def served_steps(port: int) -> list[tuple[str, int]]:
    """(model_tag, step) of every ChatModel replica that answered /stats."""
    return [(replica["model_tag"], replica["step"]) for replica in serve_stats(port)["per_replica"]]


def long_answer(max_tokens: int) -> dict:
    # Greedy answers of the test model never stop early: every request runs its whole max_tokens.
    return {"messages": CONVERSATION, "temperature": 0, "max_tokens": max_tokens}


def test_a_burst_scales_replicas_up_and_back_down(scaling_app):
    port = scaling_app
    assert running_replicas(port) == 1
    stop_burst = threading.Event()
    finish_reasons, failures = [], []

    def client():
        while not stop_burst.is_set():
            try:
                events = stream_events(port, f"{ROUTE}/chat/completions", long_answer(200))
                finish_reasons.append(events[-1].get("finish_reason"))
            except Exception as error:  # reported by the assertion below, with the others
                failures.append(repr(error))

    clients = [threading.Thread(target=client, daemon=True) for _ in range(BURST_CLIENTS)]
    for thread in clients:
        thread.start()
    try:
        peak = wait_until(lambda: (count := running_replicas(port)) > 1 and count, timeout=90, interval=0.5,
                          what="a second replica")
        # The replica autoscaling added started after step 2 was saved, and loaded step 1 all the same.
        steps_at_peak = wait_until(lambda: len(steps := served_steps(port)) == 2 and steps, timeout=30,
                                   what="/stats from both replicas")
    finally:
        stop_burst.set()
        for thread in clients:
            thread.join(timeout=60)
    assert peak == 2
    assert steps_at_peak == [(MODEL_TAG, BUILT_STEP)] * 2
    assert not failures, failures[:3]
    assert finish_reasons and set(finish_reasons) == {"length"}
    wait_until(lambda: running_replicas(port) == 1, timeout=60, interval=0.5, what="the scale-down to 1 replica")


def chat_model_replica_names() -> list[str]:
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(f"SERVE_REPLICA::{APP}#ChatModel#")]


def test_killing_a_replica_ends_its_streams_with_an_error_and_later_requests_succeed(scaling_app):
    port = scaling_app
    (replica_name,) = wait_until(lambda: len(names := chat_model_replica_names()) == 1 and names, timeout=30,
                                 what="a single ChatModel replica")
    streams = [EventStream(port, f"{ROUTE}/chat/completions", long_answer(CONTEXT - 50), timeout=60)
               for _ in range(2)]
    openai_stream = EventStream(port, f"{ROUTE}/v1/chat/completions",
                                {**long_answer(CONTEXT - 50), "stream": True}, timeout=60)
    try:
        for stream in streams:
            assert stream.status == 200
            assert "token" in stream.next_event()
        assert openai_stream.status == 200
        assert openai_stream.next_event()["choices"][0]["delta"]["role"] == "assistant"
        assert openai_stream.next_event()["choices"][0]["delta"]["content"]
        ray.kill(ray.get_actor(replica_name, namespace="serve"), no_restart=True)
        started = time.monotonic()
        endings = [stream.events()[-1] for stream in streams]
        openai_rest = openai_stream.events()
    finally:
        for stream in [*streams, openai_stream]:
            stream.close()
    assert time.monotonic() - started < 30
    for ending in endings:
        assert "error" in ending and "done" not in ending, ending
    # On /v1 the stream ends with an OpenAI error chunk, and no [DONE]: a client must not take
    # the half answer for a whole one.
    assert "[DONE]" not in openai_rest
    assert openai_rest[-1]["error"]["type"] == "server_error" and openai_rest[-1]["error"]["message"], openai_rest[-1]

    events = stream_events(port, f"{ROUTE}/chat/completions", long_answer(20), timeout=120)
    assert events[-1]["done"] is True and events[-1]["usage"]["completion_tokens"] == 20
    assert replica_name not in chat_model_replica_names()
    assert served_steps(port) == [(MODEL_TAG, BUILT_STEP)]
    status, models = request(port, "GET", f"{ROUTE}/v1/models")
    assert status == 200
    assert (models["data"][0]["model_tag"], models["data"][0]["step"]) == (MODEL_TAG, BUILT_STEP)
