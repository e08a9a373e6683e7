"""The Ray Serve chat application: `ChatModel` replicas behind a `ChatAPI` ingress.

It replaces the seed's hand-written GPU worker pool (scripts/chat_web.py), where each request
held a whole GPU until it finished. Here:

- `ChatModel` holds one model and one continuous-batching `Scheduler` per replica: every request
  routed to it becomes a row of the replica's decode batch, so one GPU serves many chats at once.
  Each replica's scheduler has a prefix cache, and requests reach the replicas through a
  prefix-aware router (serve.routing) that sends a conversation's turns to the same replica.
  Replicas ask for one GPU each on a GPU cluster (CPUs otherwise), and Serve's autoscaler adds
  and removes them by the number of ongoing requests per replica.
- `ChatAPI` is the FastAPI ingress: the web UI, the seed's SSE endpoint, the OpenAI-compatible
  endpoints, /health and /stats. It checks every request against the limits of serve.api before
  any work is routed, and streams the replica's text pieces through a DeploymentHandle with
  `stream=True`. When a client goes away, the ingress cancels its model call and the replica
  cancels the scheduler request, which frees the batch row at the next step.

Overload is refused fast instead of queued without end. Both deployments have a bounded queue
(`max_queued_requests`): the ChatModel handle of each ingress replica raises BackPressureError when
its queue is full, which the ingress answers with HTTP 503, a Retry-After header and an
OpenAI-style JSON error; when every ingress replica is busy and the Serve proxy's own queue for the
ingress is full, the proxy itself answers 503 with the same Retry-After header (its body is Serve's
plain text "Request dropped due to backpressure ..."). The ingress runs as several replicas
(num_cpus=0, spread over the nodes by Serve), so one failing does not take the service down.

The checkpoint (tag and step) is resolved once, by `build_app` on the machine that builds the
app, and bound to ChatModel: a replica that autoscaling or a restart starts later loads the same
weights as the running ones, even when a newer step has been saved since. /v1/models and /stats
(per replica) say which tag and step is served.

Text is made in the replica (it has the tokenizer): the stream between the two deployments
carries small dict events, `start` (prompt size) or `rejected` (the prompt does not fit the
context), then `text` pieces (each the text of every token ready when the replica looked, so a
busy replica sends fewer, larger pieces; with many requests decoding, each waits for a few tokens
so that the replica makes about STREAM_EVENTS_PER_STEP events per decode step) and `tool` events
(a tool call's readable text and its fields, serve.api.ReplyReader), then `end` (finish reason and token count). Both APIs put a tool
call's readable text into the reply; the seed's SSE event also carries it as `tool_call`.

With an API key (NANOCHAT_API_KEY where the app is built, or the key's SHA-256 digest as
`api_key_sha256` of ChatAppArgs: Serve logs the args of an app built from a config), the ingress
answers every request but GET /health and the UI's page with 401 unless it carries
`Authorization: Bearer <key>` (serve.api.ApiKeyGate); the ingress holds only the key's digest. An
ingress replica logs a warning when Serve listens beyond 127.0.0.1 and no key is set.

Build the app with `build_app(ChatAppArgs(...))`; `serve run serve/config.yaml` does that from the
`args:` of the config, and `python -m serve` from its flags.
"""

import asyncio
import logging
import os
import threading
import time
from typing import Literal

import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.context import _get_global_client
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.util.metrics import Counter, Gauge, Histogram

from ray_jobs.gpus import cluster_can_have_gpus

from serve.api import (API_KEY_ENV, CHAT_SHAPE, TEXT_SHAPE, ApiKeyGate, ChatRequest, GenerationSettings,
                       OpenAIChatRequest, OpenAICompletionRequest, OpenAIShape, ReplyReader, RequestError,
                       ServingDefaults, TextStream, ToolCall, api_key_digest, error_body, exposure_warning,
                       openai_usage, server_sent_event, settings_from_chat_request,
                       settings_from_completion_request, settings_from_openai_request, validation_error_message)
from serve.routing import SERVED_KEYS_KEPT, PrefixAffinityRouter, RecentKeys, conversation_keys

logger = logging.getLogger("ray.serve")

UI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui.html")
APP_NAME = "nanochat"
# A request whose replica dies before it produced anything is sent again (nothing was streamed
# yet, so the client cannot tell); after this many tries the client gets a 503.
OPEN_ATTEMPTS = 3
GAUGE_INTERVAL_S = 1.0
# About how many text events a replica streams per decode step, all requests together (see
# ChatModel.tokens_per_event). Measured with bench_serve at 16 clients on 2 CPUs: the Serve path
# streamed 328 tokens/s with an event per token, 465 with 4 events per step, 548 with 2, 527 with 1.
STREAM_EVENTS_PER_STEP = 2
STATS_TIMEOUT_S = 5.0
TTFT_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
# The replica's events that carry reply text: plain pieces, and tool calls in readable form.
REPLY_TEXT_EVENTS = ("text", "tool")
# Failures of a replica (or of reaching one) rather than of the request itself.
REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


def resolve_checkpoint(source: str, model_tag: str | None, step: int | None) -> tuple[str, int]:
    """(model_tag, step) to load: the largest model and its last step unless given. Raises
    CheckpointNotFoundError, whose message names the command that makes a checkpoint."""
    # nanochat is imported here, not at the top, so that the ingress process never loads torch.
    from nanochat.checkpoint import PHASE_DIRS, checkpoint_dir, find_largest_model, find_last_step
    from nanochat.files import get_base_dir

    if source not in PHASE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}: use one of {sorted(PHASE_DIRS)}")
    if model_tag is None:
        model_tag = find_largest_model(os.path.join(get_base_dir(), PHASE_DIRS[source]))
    if step is None:
        step = find_last_step(checkpoint_dir(source, model_tag))
    return model_tag, step


@serve.deployment(
    max_ongoing_requests=16,
    autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
    ray_actor_options={"num_cpus": 1},
)
class ChatModel:
    """One model, one continuous-batching scheduler: every ongoing request is a row of its batch."""

    def __init__(self, source: str, model_tag: str, step: int, max_batch_size: int = 8, device: str | None = None,
                 prefix_cache_tokens: int | None = None, transposed_weights: bool = True):
        """`model_tag` and `step` are resolved by build_app, never here: every replica, whenever it
        starts, loads the same checkpoint."""
        # torch and the model are imported here so that the ingress process never loads them.
        from nanochat.checkpoint import build_model, checkpoint_dir
        from nanochat.common import autodetect_device_type
        from nanochat.scheduler import Scheduler
        from nanochat.tokenizer import SPECIAL_TOKENS, get_tokenizer

        self.model_tag, self.step = model_tag, step
        self.device = device or autodetect_device_type()
        model, tokenizer, _ = build_model(checkpoint_dir(source, self.model_tag), self.step, self.device)
        # A checkpoint normally carries its tokenizer; an old one falls back to the project's.
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        self.special_ids = {name: self.tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
        self.scheduler = Scheduler(model, self.tokenizer, max_batch_size=max_batch_size,
                                   prefix_cache_tokens=prefix_cache_tokens, transposed_weights=transposed_weights)
        self.scheduler_thread = self.scheduler.start()
        self.info = {"id": f"nanochat-{source}-{self.model_tag}", "source": source, "model_tag": self.model_tag,
                     "step": self.step, "context_length": self.scheduler.max_seq_len,
                     "max_batch_size": max_batch_size, "device": str(self.device)}
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        tags = {"replica": self.replica_id}
        self.tokens_counter = Counter("nanochat_generated_tokens", "Tokens generated by the model replicas",
                                      tag_keys=("replica",))
        self.tokens_counter.set_default_tags(tags)
        self.active_gauge = Gauge("nanochat_active_sequences", "Sequences decoding in a replica's batch",
                                  tag_keys=("replica",))
        self.active_gauge.set_default_tags(tags)
        self.queued_gauge = Gauge("nanochat_queued_sequences", "Requests waiting for a row of a replica's batch",
                                  tag_keys=("replica",))
        self.queued_gauge.set_default_tags(tags)
        self.prefix_hit_counter = Counter("nanochat_prefix_hit_tokens",
                                          "Prompt tokens whose keys and values came from a replica's prefix cache",
                                          tag_keys=("replica",))
        self.prefix_hit_counter.set_default_tags(tags)
        self.prompt_tokens_counter = Counter("nanochat_prompt_tokens", "Prompt tokens a replica was asked to prefill",
                                             tag_keys=("replica",))
        self.prompt_tokens_counter.set_default_tags(tags)
        self.cached_blocks_gauge = Gauge("nanochat_prefix_cached_blocks", "Blocks held in a replica's prefix cache",
                                         tag_keys=("replica",))
        self.cached_blocks_gauge.set_default_tags(tags)
        self.served_keys = RecentKeys(SERVED_KEYS_KEPT)  # what record_routing_stats reports
        self._stopping = threading.Event()
        threading.Thread(target=self._publish_gauges, name="nanochat-gauges", daemon=True).start()

    def _publish_gauges(self) -> None:
        published = {"prefix_hit_tokens": 0, "prefix_prompt_tokens": 0}  # what the counters have been told
        counters = {"prefix_hit_tokens": self.prefix_hit_counter, "prefix_prompt_tokens": self.prompt_tokens_counter}
        while not self._stopping.wait(GAUGE_INTERVAL_S):
            stats = self.scheduler.stats()
            self.active_gauge.set(stats["active"])
            self.queued_gauge.set(stats["queued"])
            self.cached_blocks_gauge.set(stats["prefix_cached_blocks"])
            for key, counter in counters.items():
                if stats[key] > published[key]:
                    counter.inc(stats[key] - published[key])
                    published[key] = stats[key]

    def describe(self) -> dict:
        return dict(self.info)

    def stats(self) -> dict:
        return {"replica": self.replica_id, "model_tag": self.model_tag, "step": self.step, **self.scheduler.stats()}

    def record_routing_stats(self) -> dict:
        """What the prefix-aware router (serve.routing) reads of this replica: the conversation keys
        of the requests it served lately, whose keys and values its prefix cache may hold."""
        return {"prefix_keys": self.served_keys.keys()}

    def check_health(self) -> None:
        """Serve calls this periodically; a replica whose decode loop died is replaced."""
        if not self.scheduler_thread.is_alive():
            raise RuntimeError("the scheduler's decode loop has stopped")

    def tokens_per_event(self) -> int:
        """How many tokens a request's next event waits for: enough that the whole batch makes
        about STREAM_EVENTS_PER_STEP events per decode step (1 token, no wait, for up to that many
        requests; 8 with 16 decoding). Each event costs a Ray message to the ingress and one from
        the ingress to the proxy, which share the CPUs with the decode loop."""
        return -(-self.scheduler.active_count // STREAM_EVENTS_PER_STEP)

    def _prompt(self, settings: dict) -> tuple[list[int], int]:
        """(prompt tokens, max_tokens) of a request; RequestError when it does not fit the context."""
        if settings["prompt"] is not None:  # a text completion: the document so far, as pretraining saw it
            field, what = "prompt", "prompt"
            prompt = self.tokenizer.encode(settings["prompt"], prepend=self.tokenizer.get_bos_token_id())
        else:
            field, what = "messages", "conversation"
            # The assistant message is a stand-in that render_for_completion replaces by <|assistant_start|>.
            conversation = {"messages": settings["messages"] + [{"role": "assistant", "content": ""}]}
            try:
                prompt = self.tokenizer.render_for_completion(conversation)
            except ValueError as error:
                raise RequestError("messages", str(error), "the tokenizer's chat format") from None
        context = self.scheduler.max_seq_len
        room = context - len(prompt)
        if room < 1:
            raise RequestError(field, f"the {what} is {len(prompt)} tokens long and the model's "
                               f"context holds {context}: shorten it or start a new {what}",
                               f"at most {context - 1} prompt tokens")
        max_tokens = settings["max_tokens"]
        if max_tokens is None:
            return prompt, min(settings["default_max_tokens"], room)
        if max_tokens > room:
            raise RequestError("max_tokens", f"max_tokens={max_tokens} does not fit: the {what} is "
                               f"{len(prompt)} tokens and the model's context holds {context}, so at most "
                               f"{room} tokens can follow", f"at most {room} for this {what}")
        return prompt, max_tokens

    async def generate(self, settings: dict):
        """Stream the answer to one conversation as events (see the module docstring)."""
        try:
            prompt, max_tokens = self._prompt(settings)
        except RequestError as error:
            yield {"type": "rejected", "field": error.field, "message": error.message, "limit": error.limit}
            return
        self.served_keys.put(conversation_keys(settings)[0])
        request = self.scheduler.submit(prompt, max_tokens=max_tokens, temperature=settings["temperature"],
                                        top_k=settings["top_k"], seed=settings["seed"])
        yield {"type": "start", "prompt_tokens": len(prompt), "max_tokens": max_tokens, "replica": self.replica_id,
               "context_length": self.scheduler.max_seq_len}
        reader = ReplyReader(self.tokenizer.decode, self.special_ids)
        text = TextStream(reader.decode_text, settings["stop"])
        finish_reason, error = None, None
        try:
            # All the tokens ready at once go out as one event, and under load each request waits
            # for a few tokens (tokens_per_event): the replica hands the ingress fewer, larger
            # messages instead of falling behind the decode steps.
            async for tokens in request.token_batches(self.tokens_per_event):
                for event in text_events(reader.feed(tokens), text):
                    yield event
                if text.stopped:
                    finish_reason = "stop"
                    break
            else:
                unfinished_call = reader.finish()
                for event in text_events([unfinished_call] if unfinished_call else [], text):
                    yield event
                piece = text.finish()
                if piece:
                    yield {"type": "text", "text": piece}
                finish_reason = request.finish_reason
        except RuntimeError as failure:  # the decode step failed; the scheduler has moved on
            finish_reason, error = "error", str(failure)
        finally:
            # A stop sequence, or the caller went away (Serve cancels this generator): free the row.
            if not request.done:
                self.scheduler.cancel(request)
            if text.tokens:
                self.tokens_counter.inc(text.tokens)
        if finish_reason == "cancelled":
            finish_reason, error = "error", "the model replica is shutting down"
        yield {"type": "end", "finish_reason": finish_reason, "completion_tokens": text.tokens, "error": error}

    def __del__(self):
        # Serve calls this when it stops the replica: requests still running end as cancelled.
        # Python also calls it after a failed __init__ (no checkpoint), which started nothing.
        if hasattr(self, "_stopping"):
            self._stopping.set()
            self.scheduler.shutdown()


def text_events(parts, text: TextStream):
    """A replica's events for the parts of a reply (ReplyReader.feed): `text` events, and a `tool`
    event per tool call carrying its readable text and its fields. Ends at a stop sequence."""
    for part in parts:
        if isinstance(part, ToolCall):
            piece = text.push_tool_call(part)
            if piece:
                yield {"type": "text", "text": piece}
            if text.stopped:
                return
            yield {"type": "tool", "text": part.readable(), "tool_call": part.fields()}
        else:
            piece = text.push_many(part)
            if piece:
                yield {"type": "text", "text": piece}
            if text.stopped:
                return


class ModelStream:
    """One model call that has started: its `start` event, then the rest of its events."""

    def __init__(self, response: DeploymentResponseGenerator, start: dict):
        self.response = response
        self.start = start

    async def events(self):
        async for event in self.response:
            yield event

    def cancel(self) -> None:
        self.response.cancel()


async def merge_streams(streams: list[ModelStream]):
    """(choice index, event) from several model streams as the events arrive."""
    iterators = [stream.events() for stream in streams]
    pending = {asyncio.ensure_future(anext(iterator)): index for index, iterator in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iterators[index]))] = index
                yield index, event
    finally:
        for task in pending:
            task.cancel()


fastapi_app = FastAPI(title="nanochat", description="Chat with a nanochat model served by Ray Serve.")
# Every route, FastAPI's /docs and /openapi.json included, sits behind the key of the ChatAPI
# replica that serves the request (None: no key).
fastapi_app.add_middleware(ApiKeyGate, digest_of=lambda: serve.get_replica_context().servable_object.api_key_digest)


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(fastapi_app)
class ChatAPI:
    """The HTTP face of the service; it holds no model, only a handle to the ChatModel replicas."""

    def __init__(self, model: DeploymentHandle, defaults: dict | None = None, retry_after_s: int = 2,
                 api_key_digest: str | None = None, min_replicas: int = 1):
        """`api_key_digest`: serve.api.api_key_digest of the service's API key, None for no key.
        `min_replicas`: the ChatModel deployment's; at 0 it scales to zero when idle, and /health
        then answers that it is idle rather than unavailable."""
        self.model = model
        self.min_replicas = min_replicas
        self.api_key_digest = api_key_digest
        warning = exposure_warning(_get_global_client().http_config.host, api_key_digest is not None)
        if warning:
            logger.warning(warning)
        self.defaults = ServingDefaults(**(defaults or {}))
        self.retry_after_s = retry_after_s
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        with open(UI_PATH, encoding="utf-8") as f:
            self.ui_html = f.read()
        self._model_info: dict | None = None
        self.requests_counter = Counter("nanochat_requests", "Chat requests by endpoint and outcome",
                                        tag_keys=("endpoint", "status"))
        self.ttft_histogram = Histogram("nanochat_time_to_first_token_seconds",
                                        "From a request's arrival to its first text piece",
                                        boundaries=TTFT_BUCKETS_S, tag_keys=("endpoint",))

    # ---------------------------------------------------------------- helpers

    async def model_info(self) -> dict:
        if self._model_info is None:
            self._model_info = await self.model.describe.remote()
        return self._model_info

    def _count(self, endpoint: str, status: str) -> None:
        self.requests_counter.inc(tags={"endpoint": endpoint, "status": status})

    async def _read_body(self, request: Request, model_class):
        """The body as `model_class`; a body that is not JSON or not of that shape is a 422."""
        raw = await request.body()
        try:
            return model_class.model_validate_json(raw)
        except ValidationError as error:
            message, field = validation_error_message(error.errors(include_url=False))
            raise RequestError(field or "body", message, status=422) from None

    def _refuse(self, endpoint: str, error: RequestError) -> JSONResponse:
        if error.retry_after_s is not None:
            status = "overloaded"
        else:
            status = {400: "rejected", 422: "malformed"}.get(error.status, "unavailable")
        self._count(endpoint, status)
        error_type = "invalid_request_error" if error.status < 500 else "server_error"
        headers = None if error.retry_after_s is None else {"Retry-After": str(error.retry_after_s)}
        return JSONResponse(error_body(error.message, error.field, error.limit, error_type), status_code=error.status,
                            headers=headers)

    async def _open(self, settings: GenerationSettings) -> ModelStream:
        """Start generating; returns once the replica has accepted the request. A refusal by the
        replica becomes a RequestError (400); a full queue of this handle (every replica busy and
        max_queued_requests waiting) a 503 with Retry-After; a replica that died first is retried."""
        for attempt in range(1, OPEN_ATTEMPTS + 1):
            response = self.model.generate.options(stream=True).remote(settings.to_dict())
            try:
                first = await anext(response)
            except BackPressureError:
                raise RequestError("model", "every model replica is busy and the queue is full; try again in "
                                   f"{self.retry_after_s} s", status=503, retry_after_s=self.retry_after_s) from None
            except REPLICA_FAILURES as failure:
                logger.warning(f"a ChatModel replica failed before answering (try {attempt}): {failure!r}")
                continue
            except asyncio.CancelledError:  # the client left while its request waited for a replica
                response.cancel()
                raise
            if first["type"] == "rejected":
                raise RequestError(first["field"], first["message"], first["limit"])
            return ModelStream(response, first)
        raise RequestError("model", "no model replica could take the request; try again in a moment",
                           status=503)

    async def _open_all(self, all_settings: list[GenerationSettings]) -> list[ModelStream]:
        opened = await asyncio.gather(*(self._open(settings) for settings in all_settings), return_exceptions=True)
        failures = [result for result in opened if isinstance(result, BaseException)]
        if failures:
            for result in opened:
                if isinstance(result, ModelStream):
                    result.cancel()
            raise failures[0]
        return opened

    # ---------------------------------------------------------------- the seed's API and the UI

    @fastapi_app.get("/", response_class=HTMLResponse)
    async def ui(self) -> HTMLResponse:
        return HTMLResponse(self.ui_html)

    @fastapi_app.post("/chat/completions")
    async def chat_completions(self, request: Request):
        """The seed's streaming endpoint: `data: {"token": text}` events, then
        `data: {"done": true, "finish_reason": ..., "usage": ..., "context_length": ...}`, or
        `data: {"error": message}`."""
        arrived = time.perf_counter()
        try:
            body = await self._read_body(request, ChatRequest)
            stream = await self._open(settings_from_chat_request(body, self.defaults))
        except RequestError as error:
            return self._refuse("chat", error)
        return StreamingResponse(self._seed_events(stream, arrived), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _seed_events(self, stream: ModelStream, arrived: float):
        status, first_piece = "failed", True
        try:
            async for event in stream.events():
                if event["type"] in REPLY_TEXT_EVENTS:
                    if first_piece:
                        self.ttft_histogram.observe(time.perf_counter() - arrived, tags={"endpoint": "chat"})
                        first_piece = False
                    payload = {"token": event["text"]}
                    if event["type"] == "tool":
                        payload["tool_call"] = event["tool_call"]
                    yield server_sent_event(payload)
                elif event["type"] == "end":
                    if event["finish_reason"] == "error":
                        yield server_sent_event({"error": f"generation failed: {event['error']}"})
                    else:
                        usage = openai_usage(stream.start["prompt_tokens"], event["completion_tokens"])
                        yield server_sent_event({"done": True, "finish_reason": event["finish_reason"],
                                                 "usage": usage, "context_length": stream.start["context_length"]})
                        status = "ok"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as failure:  # the replica died mid-stream: say so instead of hanging up silently
            logger.warning(f"a chat stream failed: {failure!r}")
            yield server_sent_event({"error": f"the model replica failed mid-answer ({type(failure).__name__}); "
                                              "send the message again"})
        finally:
            stream.cancel()
            self._count("chat", status)

    # ---------------------------------------------------------------- OpenAI-compatible API

    @fastapi_app.post("/v1/chat/completions")
    async def openai_chat_completions(self, request: Request):
        return await self._openai_request(request, OpenAIChatRequest, settings_from_openai_request, CHAT_SHAPE)

    @fastapi_app.post("/v1/completions")
    async def openai_completions(self, request: Request):
        """Text completion: the prompt continued as plain text (for base models; see the README)."""
        return await self._openai_request(request, OpenAICompletionRequest, settings_from_completion_request,
                                          TEXT_SHAPE)

    async def _openai_request(self, request: Request, model_class, to_settings, shape: OpenAIShape):
        arrived = time.perf_counter()
        try:
            body = await self._read_body(request, model_class)
            streams = await self._open_all(to_settings(body, self.defaults))
        except RequestError as error:
            return self._refuse(shape.endpoint, error)
        model_id = (await self.model_info())["id"]
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        if body.stream:
            return StreamingResponse(self._openai_events(streams, model_id, include_usage, arrived, shape),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._openai_whole(streams, model_id, arrived, shape)

    async def _openai_events(self, streams: list[ModelStream], model_id: str, include_usage: bool, arrived: float,
                             shape: OpenAIShape):
        completion_id, created = shape.new_id(), int(time.time())
        status, first_piece, completion_tokens = "failed", True, 0
        try:
            for index in range(len(streams)):
                opening = shape.opening(completion_id, created, model_id, index)
                if opening:
                    yield server_sent_event(opening)
            async for index, event in merge_streams(streams):
                if event["type"] in REPLY_TEXT_EVENTS:
                    if first_piece:
                        self.ttft_histogram.observe(time.perf_counter() - arrived, tags={"endpoint": shape.endpoint})
                        first_piece = False
                    yield server_sent_event(shape.chunk(completion_id, created, model_id, index, event["text"]))
                elif event["type"] == "end":
                    if event["finish_reason"] == "error":
                        yield server_sent_event(error_body(f"generation failed: {event['error']}",
                                                           error_type="server_error"))
                        return
                    completion_tokens += event["completion_tokens"]
                    yield server_sent_event(shape.chunk(completion_id, created, model_id, index, None,
                                                        event["finish_reason"]))
            if include_usage:
                yield server_sent_event(shape.usage_chunk(completion_id, created, model_id,
                                                          streams[0].start["prompt_tokens"], completion_tokens))
            yield server_sent_event("[DONE]")
            status = "ok"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as failure:
            logger.warning(f"an OpenAI {shape.endpoint} stream failed: {failure!r}")
            yield server_sent_event(error_body(f"the model replica failed mid-answer ({type(failure).__name__}); "
                                               "send the request again", error_type="server_error"))
        finally:
            for stream in streams:
                stream.cancel()
            self._count(shape.endpoint, status)

    async def _openai_whole(self, streams: list[ModelStream], model_id: str, arrived: float,
                            shape: OpenAIShape) -> JSONResponse:
        texts = [[] for _ in streams]
        finish_reasons = [None] * len(streams)
        completion_tokens, status = 0, "failed"
        try:
            async for index, event in merge_streams(streams):
                if event["type"] in REPLY_TEXT_EVENTS:
                    if not any(texts):
                        self.ttft_histogram.observe(time.perf_counter() - arrived, tags={"endpoint": shape.endpoint})
                    texts[index].append(event["text"])
                elif event["type"] == "end":
                    if event["finish_reason"] == "error":
                        return JSONResponse(error_body(f"generation failed: {event['error']}",
                                                       error_type="server_error"), status_code=500)
                    finish_reasons[index] = event["finish_reason"]
                    completion_tokens += event["completion_tokens"]
            status = "ok"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as failure:
            logger.warning(f"an OpenAI {shape.endpoint} request failed: {failure!r}")
            return JSONResponse(error_body(f"the model replica failed mid-answer ({type(failure).__name__}); "
                                           "send the request again", error_type="server_error"), status_code=503)
        finally:
            for stream in streams:
                stream.cancel()
            self._count(shape.endpoint, status)
        return JSONResponse(shape.whole(model_id, ["".join(parts) for parts in texts], finish_reasons,
                                        streams[0].start["prompt_tokens"], completion_tokens))

    @fastapi_app.get("/v1/models")
    async def list_models(self) -> dict:
        info = await self.model_info()
        return {"object": "list", "data": [{"id": info["id"], "object": "model", "created": 0,
                                            "owned_by": "nanochat", **info}]}

    # ---------------------------------------------------------------- operations

    async def _deployment_status(self) -> tuple[str | None, dict]:
        """(the ChatModel deployment's status, its replica counts by state), as the Serve controller
        sees them; (None, {}) before the controller knows the deployment."""
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(serve.get_replica_context().app_name)
        deployment = app.deployments.get(self.model.deployment_name) if app else None
        if deployment is None:
            return None, {}
        # The states are str enums (or plain str): "RUNNING" finds either.
        return getattr(deployment.status, "value", deployment.status), dict(deployment.replica_states)

    @fastapi_app.get("/health")
    async def health(self) -> JSONResponse:
        """200 while a replica runs, or while none needs to (scaled to zero: the next request
        starts one); 503 otherwise (replicas starting, failing, or none yet)."""
        status, replicas = await self._deployment_status()
        running = replicas.get("RUNNING", 0)
        if running > 0:
            return JSONResponse({"status": "ok", "running_replicas": running})
        if self.min_replicas == 0 and status == "HEALTHY":
            return JSONResponse({"status": "idle", "running_replicas": 0,
                                 "message": "scaled to zero: the next request starts a model replica"})
        return JSONResponse({"status": "unavailable", "running_replicas": 0, "deployment_status": status},
                            status_code=503)

    @fastapi_app.get("/stats")
    async def stats(self) -> dict:
        """Replicas, and summed over them: requests decoding, requests queued, tokens/s, the
        prefix caches' hits (prompt tokens served from a cache, of all prompt tokens) and cached
        blocks; per replica also the checkpoint it serves; and which ingress replica answered."""
        _, replicas = await self._deployment_status()
        per_replica = []
        if replicas.get("RUNNING", 0):  # scaled to zero, there is no replica to ask
            per_replica = await self.model.broadcast("stats").results_async(timeout_s=STATS_TIMEOUT_S,
                                                                            return_exceptions=True)
        per_replica = [stats for stats in per_replica if isinstance(stats, dict)]
        return {
            "replicas": replicas.get("RUNNING", 0),
            "replica_states": replicas,
            "active_sequences": sum(stats["active"] for stats in per_replica),
            "queue_depth": sum(stats["queued"] for stats in per_replica),
            "tokens_per_second": sum(stats["tokens_per_second"] for stats in per_replica),
            "prefix_hit_tokens": sum(stats["prefix_hit_tokens"] for stats in per_replica),
            "prefix_prompt_tokens": sum(stats["prefix_prompt_tokens"] for stats in per_replica),
            "prefix_cached_blocks": sum(stats["prefix_cached_blocks"] for stats in per_replica),
            "per_replica": per_replica,
            "ingress_replica": self.replica_id,
        }


class ChatAppArgs(BaseModel):
    """The knobs of the app (the `args:` of serve/config.yaml, the flags of `python -m serve`)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["sft", "rl", "base"] = "sft"
    model_tag: str | None = None
    step: int | None = Field(default=None, ge=0)
    device: str | None = None  # None: the best the replica's node has (cuda, mps, cpu)
    max_batch_size: int = Field(default=8, ge=1)
    # Positions of keys and values a replica's prefix cache keeps (nanochat.prefix_cache); None: as
    # many as its decode rows hold (max_batch_size x the model's context); 0: no prefix cache.
    prefix_cache_tokens: int | None = Field(default=None, ge=0)
    # On a CPU, decode steps of up to 8 rows multiply by transposed copies of the matmul weights
    # (nanochat.scheduler): faster, for one more copy of those weights per replica; False saves it.
    transposed_weights: bool = True
    # How requests pick a ChatModel replica: "prefix" sends a conversation to the replica whose
    # prefix cache holds its history (serve.routing), unless that replica's queue is longer than
    # the shortest by more than routing_imbalance (None: half a batch, max_batch_size // 2, which
    # continuous batching absorbs); "default" is Serve's power of two choices.
    routing: Literal["prefix", "default"] = "prefix"
    routing_imbalance: int | None = Field(default=None, ge=0)
    # How often each replica tells the routers which conversations it served.
    routing_stats_period_s: float = Field(default=2.0, gt=0)
    # Above max_batch_size, so that a finished row is refilled from the replica's own queue at once.
    max_ongoing_requests: int = Field(default=16, ge=1)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float | None = Field(default=None, gt=0)  # None: max_batch_size
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=120.0, ge=0)
    # How often replica load is measured; Serve's defaults when None (tests shorten them).
    metrics_interval_s: float | None = Field(default=None, gt=0)
    look_back_period_s: float | None = Field(default=None, gt=0)
    # How often Serve checks that each replica is alive and its decode loop runs; a dead one is replaced.
    health_check_period_s: float = Field(default=10.0, gt=0)
    # None: 1 if the cluster has GPUs now or its autoscaler can add GPU nodes (then Serve waits for
    # one), else 0. Set it on a cluster whose config the autoscaler does not publish.
    replica_gpus: float | None = Field(default=None, ge=0)
    replica_cpus: float = Field(default=1.0, ge=0)
    # Requests that wait for a ChatModel replica, per ingress replica (each has its own handle);
    # one more gets HTTP 503 with Retry-After at once.
    max_queued_requests: int = Field(default=64, ge=1)
    # The ingress (num_cpus=0) autoscales on open streams; 2 or more keep the service up when one
    # fails. Serve spreads the replicas over the nodes: for one per proxy node, set
    # ingress_min_replicas to the number of nodes behind the load balancer.
    ingress_min_replicas: int = Field(default=2, ge=1)
    ingress_max_replicas: int = Field(default=4, ge=1)
    ingress_max_ongoing_requests: int = Field(default=256, ge=1)  # open streams per ingress replica
    # Requests that wait for an ingress replica, per Serve proxy; the proxy answers one more with 503.
    ingress_max_queued_requests: int = Field(default=128, ge=1)
    retry_after_s: int = Field(default=2, ge=0)  # the Retry-After of an overload's 503s
    temperature: float = Field(default=0.8, ge=0, le=2)
    top_k: int = Field(default=50, ge=0, le=200)
    max_tokens: int = Field(default=512, ge=1, le=4096)
    # The API key's SHA-256 hex digest, never the key itself: Serve logs these args when it builds
    # the app from a config. None: $NANOCHAT_API_KEY where the app is built, or no key.
    api_key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


def replica_resources(args: ChatAppArgs) -> dict:
    """ray_actor_options of a ChatModel replica: one GPU on a cluster that has or can have GPUs,
    CPUs otherwise."""
    gpus = args.replica_gpus
    if gpus is None:
        gpus = 1 if cluster_can_have_gpus() else 0
    return {"num_gpus": gpus, "num_cpus": args.replica_cpus}


def build_app(args: ChatAppArgs) -> serve.Application:
    """The application builder (import path `serve.app:build_app`). It resolves the checkpoint
    here, once (CheckpointNotFoundError when there is none), and binds its tag and step."""
    model_tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    autoscaling = {
        "min_replicas": args.min_replicas,
        "initial_replicas": args.min_replicas or 1,
        "max_replicas": max(args.max_replicas, args.min_replicas),
        "target_ongoing_requests": args.target_ongoing_requests or args.max_batch_size,
        "upscale_delay_s": args.upscale_delay_s,
        "downscale_delay_s": args.downscale_delay_s,
    }
    if args.metrics_interval_s is not None:
        autoscaling["metrics_interval_s"] = args.metrics_interval_s
    if args.look_back_period_s is not None:
        autoscaling["look_back_period_s"] = args.look_back_period_s
    backpressure = {"status_code": 503, "retry_after_s": args.retry_after_s}
    imbalance = args.routing_imbalance if args.routing_imbalance is not None else max(1, args.max_batch_size // 2)
    routing = {"request_router_config": RequestRouterConfig(
        request_router_class=PrefixAffinityRouter, request_router_kwargs={"imbalance": imbalance},
        request_routing_stats_period_s=args.routing_stats_period_s)} if args.routing == "prefix" else {}
    model = ChatModel.options(**routing,max_ongoing_requests=max(args.max_ongoing_requests, args.max_batch_size),
                              max_queued_requests=args.max_queued_requests, backpressure_config=backpressure,
                              autoscaling_config=autoscaling, ray_actor_options=replica_resources(args),
                              health_check_period_s=args.health_check_period_s)
    defaults = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
    ingress_autoscaling = {
        "min_replicas": args.ingress_min_replicas,
        "initial_replicas": args.ingress_min_replicas,
        "max_replicas": max(args.ingress_max_replicas, args.ingress_min_replicas),
        # Streams are long: scale out when the replicas are half full on average.
        "target_ongoing_requests": max(1, args.ingress_max_ongoing_requests // 2),
    }
    digest = args.api_key_sha256
    if digest is None and os.environ.get(API_KEY_ENV):
        digest = api_key_digest(os.environ[API_KEY_ENV])
    ingress = ChatAPI.options(max_ongoing_requests=args.ingress_max_ongoing_requests,
                              max_queued_requests=args.ingress_max_queued_requests, backpressure_config=backpressure,
                              autoscaling_config=ingress_autoscaling)
    return ingress.bind(model.bind(args.source, model_tag, step, args.max_batch_size, args.device,
                                   args.prefix_cache_tokens, args.transposed_weights),
                        defaults, args.retry_after_s, digest, args.min_replicas)
