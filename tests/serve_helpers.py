"""What the Serve tests share: a tiny chat checkpoint saved the normal way, one Serve instance on
127.0.0.1 at a free port, and small HTTP clients (JSON and server-sent events) built on the
standard library, so the tests need nothing but the app to talk to it."""

import http.client
import json
import os
import re
import socket
import time
from dataclasses import asdict

import torch

from nanochat.checkpoint import checkpoint_dir, save_checkpoint
from nanochat.engine import Engine
from nanochat.tokenizer import Tokenizer
from tests.tiny import CHAT_TEXT, random_gpt

SERVE_PORT_ENV = "NANOCHAT_TEST_SERVE_PORT"


def save_tiny_chat_checkpoint(model_tag: str, tokenizer_dir: str, sequence_len: int = 256, step: int = 1,
                              source: str = "sft"):
    """tests.tiny's random depth-2 GPT saved as `source` (sft or base) checkpoint `model_tag` (at
    `step`) with its tokenizer, under the session's NANOCHAT_BASE_DIR where the Serve replicas look for it.

    Only tokens of letters, digits and spaces keep their random lm_head rows; every other token,
    the special ones included, gets a zero row. So greedy answers never stop early (tests of long
    streams can count on max_tokens), and answers are printable text."""
    tokenizer = Tokenizer.train_from_iterator(iter(CHAT_TEXT), vocab_size=300)
    model = random_gpt(tokenizer.get_vocab_size(), sequence_len=sequence_len)
    with torch.no_grad():
        for token in range(model.lm_head.weight.size(0)):
            if token >= tokenizer.get_bos_token_id() or not re.fullmatch(r"[A-Za-z0-9 ]+", tokenizer.decode([token])):
                model.lm_head.weight[token] = 0.0
    tokenizer.save(tokenizer_dir)
    save_checkpoint(checkpoint_dir(source, model_tag), step, model.state_dict(), {"model_config": asdict(model.config)},
                    tokenizer_dir=tokenizer_dir)
    return model, tokenizer


# The reply of save_tool_calling_checkpoint's model: it writes a python block, the engine runs the
# calculator and forces "<|output_start|>42<|output_end|>" in, and the model writes "Done".
TOOL_EXPRESSION, TOOL_RESULT, TOOL_AFTER = "6*7", "42", "Done"


def save_tool_calling_checkpoint(model_tag: str, tokenizer_dir: str, sequence_len: int = 256):
    """A tiny sft checkpoint whose greedy reply to any conversation is
    `<|python_start|>6*7<|python_end|>` (then the tool's forced output) `Done<|assistant_end|>`.

    With the blocks' output projections at zero and the smear off (init_weights), the logits depend
    on the current token only, through norm(embedding). So each lm_head row is set to the
    normalised embeddings of the tokens it should follow: a chain from <|assistant_start|>
    through the tool call to <|assistant_end|>, every token in it distinct."""
    tokenizer = Tokenizer.train_from_iterator(iter(CHAT_TEXT), vocab_size=300)
    special = tokenizer.encode_special
    chain = [special("<|assistant_start|>"), special("<|python_start|>"),
             *[tokenizer.encode(character)[0] for character in TOOL_EXPRESSION], special("<|python_end|>"),
             special("<|output_end|>"), *[tokenizer.encode(character)[0] for character in TOOL_AFTER],
             special("<|assistant_end|>")]
    assert len(set(chain)) == len(chain), "the chain's tokens must be distinct"
    model = random_gpt(tokenizer.get_vocab_size(), sequence_len=sequence_len)
    with torch.no_grad():
        model.init_weights()  # zero output projections, smear off: logits = f(current token)
        model.transformer.wte.weight.normal_(0.0, 1.0)
        model.lm_head.weight.zero_()
        for token, follower in zip(chain, chain[1:]):
            if token != special("<|python_end|>"):  # after it the engine forces the tool's output
                model.lm_head.weight[follower] += 4.0 * torch.nn.functional.rms_norm(
                    model.transformer.wte.weight[token], (model.config.n_embd,))
    tokenizer.save(tokenizer_dir)
    save_checkpoint(checkpoint_dir("sft", model_tag), 1, model.state_dict(), {"model_config": asdict(model.config)},
                    tokenizer_dir=tokenizer_dir)
    return model, tokenizer


def engine_reply(model, tokenizer, prompt: list[int], **settings) -> str:
    """The text Engine.generate makes in this process for `prompt`: its tokens up to the first
    stop token, what a replica should stream for the same settings."""
    engine = Engine(model, tokenizer)
    tokens = []
    for column, _ in engine.generate(prompt, num_samples=1, **settings):
        if column[0] in engine.tool_use.stop_tokens:
            break
        tokens.append(column[0])
    return tokenizer.decode(tokens)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_port() -> int:
    """The port of the session's Serve proxy on 127.0.0.1, started on a free port by the first
    Serve test module. Serve then stays up for the next modules (each deletes only its own apps):
    starting it costs several seconds on a busy 2-CPU machine, and the session's end stops Ray."""
    from ray import serve

    if SERVE_PORT_ENV not in os.environ:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        os.environ[SERVE_PORT_ENV] = str(port)
    return int(os.environ[SERVE_PORT_ENV])


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "the condition"):
    """Poll predicate() until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


def request(port: int, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 60):
    """(status, parsed JSON or text) of one HTTP request to 127.0.0.1:port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text
    finally:
        connection.close()


class EventStream:
    """A streaming POST whose server-sent events are read one at a time; close() hangs up."""

    def __init__(self, port: int, path: str, body: dict, timeout: float = 60):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.connection.request("POST", path, body=json.dumps(body).encode(),
                                headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        self.response = self.connection.getresponse()
        self.status = self.response.status

    def next_event(self):
        """The payload of the next `data:` line (parsed JSON, or the raw text such as [DONE]);
        None at the end of the stream."""
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.decode().strip()
            if line.startswith("data:"):
                payload = line[len("data:"):].strip()
                try:
                    return json.loads(payload)
                except json.JSONDecodeError:
                    return payload

    def events(self) -> list:
        collected = []
        while (event := self.next_event()) is not None:
            collected.append(event)
        return collected

    def close(self) -> None:
        """Hang up. shutdown() sends the FIN at once, even while the response still holds the socket."""
        if self.connection.sock is not None:
            try:
                self.connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the server closed it first
        self.response.close()
        self.connection.close()


def stream_events(port: int, path: str, body: dict, timeout: float = 60) -> list:
    stream = EventStream(port, path, body, timeout)
    try:
        assert stream.status == 200, f"{path} answered HTTP {stream.status}: {stream.response.read()[:500]!r}"
        return stream.events()
    finally:
        stream.close()
