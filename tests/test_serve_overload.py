"""Tests of the chat service under overload on a local Ray. Two ingress replicas share the
requests. More concurrent requests than the queues hold get a fast HTTP 503 with a Retry-After
header, and the admitted ones complete: from the ingress, with an OpenAI-style JSON error, when
the queue of its ChatModel handle is full; from the Serve proxy, with Serve's plain-text message,
when every ingress replica is busy and the proxy's queue for the ingress is full."""

import http.client
import json
import threading
import time

import pytest
from ray import serve

from serve.app import ChatAppArgs, build_app
from tests.serve_helpers import request, save_tiny_chat_checkpoint, serve_port, wait_until

MODEL_TAG = "serve-overload"
CONTEXT = 512
RETRY_AFTER_S = 3
CLIENTS = 10
# Greedy answers of the test model never stop early: an admitted request runs all its max_tokens.
ANSWER = {"messages": [{"role": "user", "content": "Count to a hundred."}], "temperature": 0, "max_tokens": 200}
# Every request ends, admitted or not, well within this (an unbounded queue would not).
BURST_DEADLINE_S = 90


@pytest.fixture(scope="module")
def checkpoint(ray_local, tmp_path_factory):
    save_tiny_chat_checkpoint(MODEL_TAG, str(tmp_path_factory.mktemp("tokenizer")), sequence_len=CONTEXT)
    return serve_port()


def deploy(name: str, **limits) -> str:
    """An app of one ChatModel replica decoding one sequence at a time, at route /name."""
    args = ChatAppArgs(model_tag=MODEL_TAG, replica_cpus=0.5, max_batch_size=1, max_ongoing_requests=1,
                       min_replicas=1, max_replicas=1, retry_after_s=RETRY_AFTER_S, **limits)
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    return f"/{name}"


def post(port: int, path: str, body: dict) -> tuple[int, str | None, str]:
    """(status, Retry-After header, whole body) of one POST; a stream is read to its end."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=BURST_DEADLINE_S)
    try:
        connection.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("Retry-After"), response.read().decode()
    finally:
        connection.close()


def burst(port: int, path: str, clients: int) -> tuple[list, float]:
    """(every client's (status, Retry-After, body), seconds until the last one ended), for
    `clients` requests sent at once."""
    results, start = [], threading.Barrier(clients)

    def client():
        start.wait()
        try:
            results.append(post(port, path, ANSWER))
        except Exception as error:  # reported by the caller's assertions, with the others
            results.append((None, None, repr(error)))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=BURST_DEADLINE_S + 30)
    return results, time.monotonic() - began


def last_event(stream_text: str) -> dict:
    return json.loads([line for line in stream_text.splitlines() if line.startswith("data:")][-1][len("data:"):])


def assert_admitted_ones_completed(results: list) -> None:
    admitted = [body for status, _, body in results if status == 200]
    assert admitted, results
    for body in admitted:
        ending = last_event(body)
        assert ending["done"] is True and ending["usage"]["completion_tokens"] == ANSWER["max_tokens"], ending


def test_two_ingress_replicas_answer_and_a_full_model_queue_gives_503_with_retry_after(checkpoint):
    """Each ingress replica's ChatModel handle holds 1 request waiting for the one busy replica;
    the ingress replicas and the proxy hold all 10 clients, so every refusal comes from a handle."""
    port = checkpoint
    route = deploy("overload-model", max_queued_requests=1, ingress_min_replicas=2, ingress_max_replicas=2,
                   ingress_max_ongoing_requests=8, ingress_max_queued_requests=32)
    try:
        answered_by = set()

        def both_ingress_replicas_answered():
            status, stats = request(port, "GET", f"{route}/stats")
            assert status == 200, stats
            answered_by.add(stats["ingress_replica"])
            return len(answered_by) == 2

        wait_until(both_ingress_replicas_answered, timeout=60, interval=0.05, what="answers from 2 ingress replicas")

        results, seconds = burst(port, f"{route}/chat/completions", CLIENTS)
        assert len(results) == CLIENTS and seconds < BURST_DEADLINE_S
        assert {status for status, _, _ in results} == {200, 503}, results
        assert_admitted_ones_completed(results)
        for status, retry_after, body in results:
            if status == 503:
                assert retry_after == str(RETRY_AFTER_S)
                error = json.loads(body)["error"]
                assert (error["type"], error["param"]) == ("server_error", "model")
                assert "busy" in error["message"]
    finally:
        serve.delete(route.strip("/"))


def test_a_full_ingress_gives_the_proxys_503_with_retry_after(checkpoint):
    """One ingress replica holds 1 stream and the proxy queues 1 more request; the ChatModel
    handle's queue (4) never fills, so every refusal comes from the proxy."""
    port = checkpoint
    route = deploy("overload-ingress", max_queued_requests=4, ingress_min_replicas=1, ingress_max_replicas=1,
                   ingress_max_ongoing_requests=1, ingress_max_queued_requests=1)
    try:
        results, seconds = burst(port, f"{route}/chat/completions", CLIENTS // 2)
        assert len(results) == CLIENTS // 2 and seconds < BURST_DEADLINE_S
        assert {status for status, _, _ in results} == {200, 503}, results
        assert_admitted_ones_completed(results)
        for status, retry_after, body in results:
            if status == 503:
                assert retry_after == str(RETRY_AFTER_S)
                assert body.startswith("Request dropped due to backpressure"), body
    finally:
        serve.delete(route.strip("/"))
