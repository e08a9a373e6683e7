"""The HTTP contract of the chat service: request bodies, their limits, and the shapes of what goes back.

Three request styles reach the same model:

- the seed's `POST /chat/completions` ({"messages", "temperature", "top_k", "max_tokens"}, plus
  an optional "seed"), answered with server-sent events `data: {"token": ...}` and a final
  `data: {"done": true, ...}`;
- the OpenAI `POST /v1/chat/completions`, streaming or not, with `model`, `messages`,
  `temperature`, `max_tokens` (or `max_completion_tokens`), `seed`, `stop`, `n`, and `top_k` as an
  extra field;
- the OpenAI `POST /v1/completions` (text in, text out, for base models) with `prompt` and the same
  sampling fields; `OpenAIShape` holds what differs in the two OpenAI answers' JSON.

All are turned into `GenerationSettings`, the plain dict that the ingress sends to a ChatModel
replica. The seed server's abuse limits are checked here, before anything is routed to a replica:
a violation raises `RequestError`, which the app answers with HTTP 400 and a JSON body naming the
field and the limit. Pydantic checks only the types, so a body that is not JSON or has the wrong
shape is a 422. The one limit that needs the tokenizer (the prompt plus max_tokens must fit the
model's context) is checked by the replica before it queues the request.

The API key (optional, off by default): `ApiKeyGate` is the ASGI middleware that answers every
request except `GET /health` and the UI's page with HTTP 401 and an OpenAI-style error unless its
`Authorization: Bearer <key>` header carries the key. The service keeps only the key's SHA-256
digest and compares digests with `hmac.compare_digest`, so the time taken says nothing about how
much of a wrong key was right, and the key itself is in no log, no /stats answer, no app config
and no pickled argument of a deployment.

`TextStream` turns the generated token ids into text pieces: it holds back a piece that ends
inside a multi-byte character, and text that might be the start of a stop sequence, so a client
never sees half a character or any part of a stop sequence.

`ReplyReader` keeps the special tokens out of that text. A tool call, the model's
`<|python_start|> expression <|python_end|>` and the `<|output_start|> result <|output_end|>` that
the engine forces in after it, becomes a `ToolCall` that reads `[calculator: 12*7 = 84]` (or
`[calculator: expression]` when the calculator gave no result) in the reply's text, and that the
seed's SSE API also sends as structured fields (the UI draws it as a block of its own). Stop
sequences are looked for in the model's own text, not inside a rendered call. Any other special
token in a reply (a stray `<|user_start|>`) is dropped from the text; `<|assistant_end|>` never
reaches it, since it ends the request (`finish_reason` "stop").

Nothing here imports Ray or torch, so the contract can be tested on its own.
"""

import hashlib
import hmac
import ipaddress
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass

from pydantic import BaseModel, ConfigDict

# The seed server's limits (scripts/chat_web.py), kept so that a client of the seed works here.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 = no top-k filter: sample from the whole vocabulary
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
# Limits of the OpenAI-style extras. OpenAI allows at most 4 stop sequences; n is bounded because
# every choice is a sequence of its own in a replica's batch.
MAX_CHOICES = 8
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 100
MAX_SEED = 2**63 - 1

ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A request the service refuses: `field` names the offending part of the body (such as
    'temperature' or 'messages[3].content'), `limit` states the bound it broke. `retry_after_s`
    is set when the service is only busy: the answer then carries a Retry-After header."""

    def __init__(self, field: str, message: str, limit: str | None = None, status: int = 400,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.field = field
        self.message = message
        self.limit = limit
        self.status = status
        self.retry_after_s = retry_after_s


def error_body(message: str, field: str | None = None, limit: str | None = None,
               error_type: str = "invalid_request_error", code: str | None = None) -> dict:
    """The JSON of an error answer, shaped as OpenAI's so that its clients show the message;
    `param` is OpenAI's name for the offending field, `code` its machine-readable reason."""
    return {"error": {"message": message, "type": error_type, "param": field, "code": code, "limit": limit}}


# ------------------------------------------------------------------------------------ the API key

API_KEY_ENV = "NANOCHAT_API_KEY"
# What answers without the key: liveness for load balancers, and the UI's page, which is static
# HTML holding nothing (it asks for the key when the service answers 401, see ui.html).
OPEN_ROUTES = frozenset({("GET", "/health"), ("GET", "/")})


def api_key_digest(key: str) -> str:
    """What the service keeps of its key: the SHA-256 hex digest."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_key_matches(authorization: str | None, digest: str) -> bool:
    """Whether an Authorization header is `Bearer <key>` with the key whose digest is `digest`.
    The digests are compared in constant time, also when the header is missing or malformed."""
    scheme, _, presented = (authorization or "").strip().partition(" ")
    scheme_ok = scheme.lower() == "bearer"
    return hmac.compare_digest(api_key_digest(presented.strip()), digest) and scheme_ok


def exposure_warning(host: str, has_key: bool) -> str | None:
    """The warning to log when the service listens beyond this machine without an API key."""
    if has_key:
        return None
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        local = False
    if local:
        return None
    return (f"the chat service listens on {host}, beyond this machine, and has no API key: anyone who reaches "
            f"the port can use the model. Set {API_KEY_ENV} (or api_key_sha256 in serve/config.yaml, --api-key "
            "of python -m serve) before binding to a reachable address.")


class ApiKeyGate:
    """ASGI middleware: with a key set, a request outside OPEN_ROUTES gets HTTP 401 and an
    OpenAI-style error unless it carries `Authorization: Bearer <key>`. `digest_of()` returns the
    key's digest, or None when the service runs without a key (then every request passes)."""

    def __init__(self, app, digest_of: Callable[[], str | None]):
        self.app = app
        self.digest_of = digest_of

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        digest = self.digest_of() if scope["type"] == "http" else None
        if digest is None or (scope["method"], route_path(scope)) in OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if bearer_key_matches(authorization, digest):
            await self.app(scope, receive, send)
            return
        if authorization:
            message = "the API key is not valid: send the service's key as `Authorization: Bearer <key>`"
        else:
            message = "this service needs an API key: send it as `Authorization: Bearer <key>`"
        body = json.dumps(error_body(message, code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def route_path(scope: dict) -> str:
    """The request's path inside the app: without the route prefix (`root_path`) it is served under."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


# ------------------------------------------------------------------------------------ request bodies

class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    """The seed's request body. Unknown fields are ignored, as the seed did."""

    messages: list[ChatMessage]
    temperature: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIChatRequest(BaseModel):
    """OpenAI's chat completion body. Fields this model has no use for (penalties, logprobs,
    user, ...) are accepted and ignored, as other OpenAI-compatible servers do, so that stock
    clients work unchanged; `model` may name anything, since one model is served (its id comes
    back in the answer and from GET /v1/models); `top_k` is our extra field
    (`extra_body={"top_k": 50}` in the openai client)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage]
    temperature: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class OpenAICompletionRequest(BaseModel):
    """OpenAI's (legacy) text completion body, for base models: the prompt is continued as plain
    text. The same sampling fields as chat; `echo`, `suffix` and `logprobs`, which would change
    what comes back, are refused rather than ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str]
    temperature: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None


@dataclass(frozen=True)
class ServingDefaults:
    """What a request gets for the settings it leaves out (the seed server's defaults)."""

    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512


@dataclass(frozen=True)
class GenerationSettings:
    """One sequence to generate, as the ChatModel replica takes it. max_tokens=None means
    `default_max_tokens`, cut to the room the model's context leaves after the prompt; an explicit
    max_tokens that does not fit is refused instead."""

    messages: list[dict]  # a conversation to answer, or [] for a text completion of `prompt`
    temperature: float
    top_k: int | None  # None = the whole vocabulary
    seed: int
    max_tokens: int | None
    default_max_tokens: int
    stop: tuple[str, ...] = ()
    prompt: str | None = None  # text to continue (POST /v1/completions), without the chat format

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------ validation

def check_messages(messages: Sequence[ChatMessage]) -> list[dict]:
    """The messages as plain dicts, after the seed's size limits and the tokenizer's role order:
    an optional system message first, then user and assistant in turns, ending with the user."""
    if not messages:
        raise RequestError("messages", "messages is empty: send at least one user message", "at least 1 message")
    if len(messages) > MAX_MESSAGES:
        raise RequestError("messages", f"messages has {len(messages)} entries; at most {MAX_MESSAGES} are allowed",
                           f"at most {MAX_MESSAGES} messages")
    total = 0
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise RequestError(f"messages[{index}].role", f"messages[{index}].role is {message.role!r}; "
                               f"use one of {', '.join(ROLES)}", f"one of {', '.join(ROLES)}")
        length = len(message.content)
        if length == 0:
            raise RequestError(f"messages[{index}].content", f"messages[{index}].content is empty",
                               "at least 1 character")
        if length > MAX_MESSAGE_CHARS:
            raise RequestError(f"messages[{index}].content", f"messages[{index}].content has {length} characters; "
                               f"at most {MAX_MESSAGE_CHARS} are allowed per message",
                               f"at most {MAX_MESSAGE_CHARS} characters")
        total += length
    if total > MAX_TOTAL_CHARS:
        raise RequestError("messages", f"the messages have {total} characters in all; at most {MAX_TOTAL_CHARS} "
                           "are allowed: shorten the conversation or start a new one",
                           f"at most {MAX_TOTAL_CHARS} characters in all")
    first_turn = 1 if messages[0].role == "system" else 0
    for index in range(first_turn, len(messages)):
        expected = "user" if (index - first_turn) % 2 == 0 else "assistant"
        if messages[index].role != expected:
            raise RequestError(f"messages[{index}].role", f"messages[{index}].role is {messages[index].role!r} but "
                               f"{expected!r} is expected there: after an optional system message, roles "
                               "alternate user, assistant, user, ...", f"{expected}")
    if len(messages) == first_turn or messages[-1].role != "user":
        raise RequestError(f"messages[{len(messages) - 1}].role", "the last message must be a user message: "
                           "it is the one the model answers", "user")
    return [{"role": message.role, "content": message.content} for message in messages]


def _check_range(field: str, value, low, high):
    if not low <= value <= high:
        raise RequestError(field, f"{field}={value} is out of range: it must be between {low} and {high}",
                           f"{low} to {high}")
    return value


def _choose_seed(seed: int | None) -> int:
    if seed is None:
        return secrets.randbelow(2**31)
    return _check_range("seed", seed, 0, MAX_SEED)


def settings_from_chat_request(body: ChatRequest, defaults: ServingDefaults) -> GenerationSettings:
    """Validate a seed-style request; raises RequestError naming the first field out of bounds."""
    messages = check_messages(body.messages)
    temperature = defaults.temperature if body.temperature is None else body.temperature
    top_k = defaults.top_k if body.top_k is None else body.top_k
    if body.max_tokens is not None:
        _check_range("max_tokens", body.max_tokens, MIN_MAX_TOKENS, MAX_MAX_TOKENS)
    return GenerationSettings(
        messages=messages,
        temperature=float(_check_range("temperature", temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)),
        top_k=_check_range("top_k", top_k, MIN_TOP_K, MAX_TOP_K) or None,
        seed=_choose_seed(body.seed),
        max_tokens=body.max_tokens,
        default_max_tokens=defaults.max_tokens,
    )


def _stop_sequences(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    sequences = [stop] if isinstance(stop, str) else stop
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise RequestError("stop", f"stop has {len(sequences)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                           f"at most {MAX_STOP_SEQUENCES} sequences")
    for index, sequence in enumerate(sequences):
        if not 1 <= len(sequence) <= MAX_STOP_CHARS:
            raise RequestError(f"stop[{index}]", f"stop[{index}] has {len(sequence)} characters; a stop sequence "
                               f"has 1 to {MAX_STOP_CHARS}", f"1 to {MAX_STOP_CHARS} characters")
    return tuple(sequences)


def settings_from_openai_request(body: OpenAIChatRequest, defaults: ServingDefaults) -> list[GenerationSettings]:
    """Validate an OpenAI-style chat request: one GenerationSettings per choice (n of them; with a
    seed, choice i uses seed + i, so the choices differ and the request as a whole is reproducible)."""
    return _openai_choices(body, defaults, messages=check_messages(body.messages), prompt=None,
                           default_max_tokens=defaults.max_tokens)


# OpenAI's default for text completions; a base model left to run on writes until its context is full.
COMPLETION_DEFAULT_MAX_TOKENS = 16


def settings_from_completion_request(body: OpenAICompletionRequest,
                                     defaults: ServingDefaults) -> list[GenerationSettings]:
    """Validate an OpenAI-style text completion request, one GenerationSettings per choice."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise RequestError("prompt", f"prompt holds {len(prompts)} prompts; send one prompt per request",
                           "one prompt")
    prompt = prompts[0]
    if not prompt:
        raise RequestError("prompt", "prompt is empty", "at least 1 character")
    if len(prompt) > MAX_TOTAL_CHARS:
        raise RequestError("prompt", f"prompt has {len(prompt)} characters; at most {MAX_TOTAL_CHARS} are allowed",
                           f"at most {MAX_TOTAL_CHARS} characters")
    for field, unsupported in (("echo", body.echo), ("suffix", body.suffix is not None),
                               ("logprobs", body.logprobs is not None)):
        if unsupported:
            raise RequestError(field, f"{field} is not supported by this server", "leave it out")
    return _openai_choices(body, defaults, messages=[], prompt=prompt, default_max_tokens=COMPLETION_DEFAULT_MAX_TOKENS)


def _openai_choices(body, defaults: ServingDefaults, messages: list[dict], prompt: str | None,
                    default_max_tokens: int) -> list[GenerationSettings]:
    """The sampling fields both OpenAI request bodies share, checked, as one GenerationSettings per choice."""
    temperature = defaults.temperature if body.temperature is None else body.temperature
    top_k = defaults.top_k if body.top_k is None else body.top_k
    temperature = float(_check_range("temperature", temperature, MIN_TEMPERATURE, MAX_TEMPERATURE))
    top_k = _check_range("top_k", top_k, MIN_TOP_K, MAX_TOP_K) or None
    max_completion_tokens = getattr(body, "max_completion_tokens", None)  # chat only
    max_tokens_field = "max_completion_tokens" if max_completion_tokens is not None else "max_tokens"
    max_tokens = max_completion_tokens if max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None:
        _check_range(max_tokens_field, max_tokens, MIN_MAX_TOKENS, MAX_MAX_TOKENS)
    _check_range("n", body.n, 1, MAX_CHOICES)
    stop = _stop_sequences(body.stop)
    seed = _choose_seed(body.seed)
    if body.seed is not None:
        _check_range("seed", seed + body.n - 1, 0, MAX_SEED)
    return [GenerationSettings(messages=messages, temperature=temperature, top_k=top_k, seed=seed + choice,
                               max_tokens=max_tokens, default_max_tokens=default_max_tokens, stop=stop,
                               prompt=prompt)
            for choice in range(body.n)]


def validation_error_message(errors: Sequence[dict]) -> tuple[str, str | None]:
    """(message, field) for the first of pydantic's errors about a body: what a 422 says."""
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '')}", None
    field = ".".join(location) or None
    where = f"{field}: " if field else ""
    return f"{where}{first.get('msg', 'invalid value')}", field


# ------------------------------------------------------------------------------------ streaming text

TOOL_NAME = "calculator"  # what the python tool is: nanochat.calculator's arithmetic and str.count


@dataclass
class ToolCall:
    """One call of the python tool in a reply: what the model asked, what the tool answered (None
    when it refused the expression, or when the reply ended first), and its tokens."""
    expression: str
    result: str | None
    tokens: int

    def readable(self) -> str:
        if self.result is None:
            return f"[{TOOL_NAME}: {self.expression}]"
        return f"[{TOOL_NAME}: {self.expression} = {self.result}]"

    def fields(self) -> dict:
        return {"name": TOOL_NAME, "expression": self.expression, "result": self.result}


class ReplyReader:
    """Splits a reply's token ids, batch by batch, into runs of text tokens and `ToolCall`s.

    States: in text; inside a python block (collecting the expression); after the block's end,
    waiting to see whether the tool's output follows; inside the output. A call is complete at
    <|output_end|>, or at the first token after <|python_end|> that is not <|output_start|> (the
    calculator refused, and the model carries on). Text runs may hold other special tokens; decode
    them with `decode_text`, which drops them."""

    TEXT, EXPRESSION, AFTER_EXPRESSION, OUTPUT = range(4)

    def __init__(self, decode: Callable[[list[int]], str], special_ids: dict[str, int]):
        self._decode = decode
        self._python_start, self._python_end = special_ids["<|python_start|>"], special_ids["<|python_end|>"]
        self._output_start, self._output_end = special_ids["<|output_start|>"], special_ids["<|output_end|>"]
        self._special = frozenset(special_ids.values())
        self._state = self.TEXT
        self._expression: list[int] = []
        self._output: list[int] = []
        self._call_tokens = 0

    def decode_text(self, ids: list[int]) -> str:
        """The text of a run of tokens, without the special tokens in it."""
        return self._decode([token for token in ids if token not in self._special])

    def feed(self, tokens: Sequence[int]):
        """Yield the parts of the next tokens in order: lists of text token ids and `ToolCall`s."""
        run: list[int] = []
        for token in tokens:
            if self._state == self.AFTER_EXPRESSION and token != self._output_start:
                if run:
                    yield run
                    run = []
                yield self._complete(result=None)
            if self._state == self.TEXT:
                if token == self._python_start:
                    if run:
                        yield run
                        run = []
                    self._state, self._expression, self._output, self._call_tokens = self.EXPRESSION, [], [], 1
                else:
                    run.append(token)
                continue
            self._call_tokens += 1
            if self._state == self.EXPRESSION:
                if token == self._python_end:
                    self._state = self.AFTER_EXPRESSION
                elif token not in self._special:
                    self._expression.append(token)
            elif self._state == self.AFTER_EXPRESSION:  # the token is <|output_start|>
                self._state = self.OUTPUT
            elif token == self._output_end:
                yield self._complete(result=self._decode(self._output))
            elif token not in self._special:
                self._output.append(token)
        if run:
            yield run

    def finish(self) -> ToolCall | None:
        """The call the reply ended inside of, if any, as far as it got."""
        if self._state == self.TEXT:
            return None
        return self._complete(result=self._decode(self._output) if self._state == self.OUTPUT else None)

    def _complete(self, result: str | None) -> ToolCall:
        call = ToolCall(self._decode(self._expression).strip(), None if result is None else result.strip(),
                        self._call_tokens)
        self._state = self.TEXT
        return call


class TextStream:
    """Token ids in, text pieces out, for one generated sequence.

    A piece is held back while it ends inside a UTF-8 character (the byte-level tokenizer can cut
    one in two) or while its end could be the start of a stop sequence. When a stop sequence
    appears, everything before it is released, `stopped` turns True and the rest is dropped.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(stop)
        self._undecoded: list[int] = []  # tokens whose bytes do not end on a character boundary yet
        self.text = ""                   # all decoded text so far
        self._released = 0               # characters of self.text already handed out
        self.tokens = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the text that can be released now (often '')."""
        if self.stopped:
            return ""
        self.tokens += 1
        self._undecoded.append(token)
        decoded = self._decode(self._undecoded)
        if decoded.endswith("\ufffd"):
            return ""
        self.text += decoded
        self._undecoded = []
        return self._release(final=False)

    def push_many(self, tokens: Sequence[int]) -> str:
        """Add several tokens at once; the same text as pushing them one by one. Without stop
        sequences they are decoded in one call; with stop sequences one by one, so that the count
        of tokens stops at the one that completes a stop."""
        if self._stop:
            return "".join(self.push(token) for token in tokens)
        if self.stopped or not tokens:
            return ""
        self.tokens += len(tokens)
        self._undecoded.extend(tokens)
        decoded = self._decode(self._undecoded)
        if decoded.endswith("\ufffd"):
            return ""
        self.text += decoded
        self._undecoded = []
        return self._release(final=False)

    def push_tool_call(self, call: ToolCall) -> str:
        """Add a tool call: the text held back so far is released (the call interrupts whatever stop
        sequence it might have begun), then the call's readable text, which is not searched for
        stop sequences. Returns the text released before the call; the call's text follows it."""
        if self.stopped:
            return ""
        before = self.finish()
        if self.stopped:
            return before
        self.tokens += call.tokens
        self.text += call.readable()
        self._released = len(self.text)
        return before

    def finish(self) -> str:
        """The text still held back once the sequence has ended."""
        if self.stopped:
            return ""
        if self._undecoded:
            self.text += self._decode(self._undecoded)
            self._undecoded = []
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self._stop:
            hits = [position for position in (self.text.find(stop, self._released) for stop in self._stop)
                    if position >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
            elif not final:
                end -= self._partial_stop_length()
        piece = self.text[self._released:end]
        self._released = end
        return piece

    def _partial_stop_length(self) -> int:
        """Length of the longest unreleased tail of the text that some stop sequence starts with."""
        longest = min(max(len(stop) for stop in self._stop) - 1, len(self.text) - self._released)
        for length in range(longest, 0, -1):
            tail = self.text[-length:]
            if any(stop.startswith(tail) for stop in self._stop):
                return length
        return 0


# ------------------------------------------------------------------------------------ response shapes

def server_sent_event(payload) -> str:
    """One SSE event; non-ASCII text is kept as is (the stream is UTF-8)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def openai_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class OpenAIShape:
    """How one of the two OpenAI endpoints shapes its answers. Chat completions carry a `message`
    per choice, stream `delta`s and open every streamed choice with the assistant's role; text
    completions carry and stream `text`."""

    endpoint: str       # the label of the endpoint in the request metrics
    id_prefix: str
    chunk_object: str   # the `object` of a streamed chunk
    whole_object: str   # the `object` of a whole answer
    chat: bool

    def new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex}"

    def opening(self, completion_id: str, created: int, model: str, index: int) -> dict | None:
        """The first chunk of a streamed choice, if this shape has one."""
        if not self.chat:
            return None
        return self.chunk(completion_id, created, model, index, "", None, role=True)

    def chunk(self, completion_id: str, created: int, model: str, index: int, text: str | None,
              finish_reason: str | None = None, role: bool = False) -> dict:
        """A streamed piece of a choice (`text` None: the closing chunk with its finish reason)."""
        if self.chat:
            delta = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", **delta}
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return {"id": completion_id, "object": self.chunk_object, "created": created, "model": model,
                "choices": [choice]}

    def usage_chunk(self, completion_id: str, created: int, model: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
        return {"id": completion_id, "object": self.chunk_object, "created": created, "model": model, "choices": [],
                "usage": openai_usage(prompt_tokens, completion_tokens)}

    def whole(self, model: str, texts: list[str], finish_reasons: list[str], prompt_tokens: int,
              completion_tokens: int) -> dict:
        """A whole (non-streamed) answer with one choice per text."""
        choices = []
        for index, (text, reason) in enumerate(zip(texts, finish_reasons)):
            choice = {"index": index}
            choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
            choice.update(logprobs=None, finish_reason=reason)
            choices.append(choice)
        return {"id": self.new_id(), "object": self.whole_object, "created": int(time.time()), "model": model,
                "choices": choices, "usage": openai_usage(prompt_tokens, completion_tokens)}


CHAT_SHAPE = OpenAIShape("openai", "chatcmpl", "chat.completion.chunk", "chat.completion", chat=True)
TEXT_SHAPE = OpenAIShape("completions", "cmpl", "text_completion", "text_completion", chat=False)
