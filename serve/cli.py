"""Chat with nanochat in the terminal: `python -m serve.cli`.

Two ways to reach a model, one conversation loop:

- local (the default): load a checkpoint (--source sft|rl|base, --model-tag, --step) onto
  --device and generate with nanochat.engine, tokens printed as they come. The conversation is
  kept as tokens, so a tool call and its forced output stay in the history exactly as the model
  saw them. A base model is not a chat model: with --source base every prompt is a plain text
  completion without history.
- remote (--url http://host:port): send the conversation to a running nanochat Serve app
  (POST {url}/chat/completions) and print the server-sent events `data: {"token": ...}` until
  `data: {"done": true}`. Nothing is loaded locally, so this works from any laptop. A service
  with an API key gets it from NANOCHAT_API_KEY, as `Authorization: Bearer <key>`.

`-p "prompt"` answers once and exits; without it the chat is interactive ('clear' starts a new
conversation, 'quit' or Ctrl-D leaves). When there is no checkpoint to load, the error says which
command makes one and the exit status is 1.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

from serve.api import API_KEY_ENV

SOURCES = ("sft", "rl", "base")
QUIT_COMMANDS = ("quit", "exit")
CLEAR_COMMAND = "clear"


class ChatError(Exception):
    """A turn could not be answered; the message says why and what to do."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; use 0 or more")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve.cli", description=__doc__.split("\n")[0])
    parser.add_argument("-p", "--prompt", help="answer this one prompt and exit (default: interactive chat)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.6, help="0 = greedy")
    parser.add_argument("--top-k", type=non_negative_int, default=50,
                        help="sample among the k likeliest tokens; 0 = all")
    parser.add_argument("--max-tokens", type=positive_int, default=512, help="longest answer, in tokens")
    parser.add_argument("--source", choices=SOURCES, default="sft", help="which training phase's checkpoint to load")
    parser.add_argument("--model-tag", help="checkpoint folder such as d20 (default: the largest model)")
    parser.add_argument("--step", type=non_negative_int, help="checkpoint step (default: the last one)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--url", help="talk to a running nanochat Serve app at this address instead of loading a model")
    return parser.parse_args(argv)


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back a piece that ends inside a
    multi-byte character until the rest of the character arrives."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed_chars = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        piece, self.printed_chars = text[self.printed_chars:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        piece, self.printed_chars = text[self.printed_chars:], len(text)
        return piece


class LocalChat:
    """A conversation with a model in this process, kept as the token ids the model has seen."""

    def __init__(self, model, tokenizer, completion_only: bool, max_tokens: int, temperature: float,
                 top_k: int | None):
        from nanochat.engine import Engine

        self.engine = Engine(model, tokenizer)
        self.tokenizer = tokenizer
        self.context_len = model.config.sequence_len
        self.completion_only = completion_only
        self.settings = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k)
        self.history: list[int] = []
        self.clear()

    def clear(self) -> None:
        self.history = [self.tokenizer.get_bos_token_id()]

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the answer to one user message, then add both to the history."""
        special = self.tokenizer.encode_special
        if self.completion_only:
            self.clear()
            prompt = self.history + self.tokenizer.encode(user_text)
        else:
            prompt = (self.history + [special("<|user_start|>")] + self.tokenizer.encode(user_text)
                      + [special("<|user_end|>"), special("<|assistant_start|>")])
        room = self.context_len - len(prompt)
        if room < 1:
            raise ChatError(f"the conversation has {len(prompt)} tokens, the model's whole context is "
                            f"{self.context_len}; type '{CLEAR_COMMAND}' to start a new conversation")
        settings = dict(self.settings, max_tokens=min(self.settings["max_tokens"], room))
        stop_tokens = self.engine.tool_use.stop_tokens
        decoder = StreamDecoder(self.tokenizer)
        for token_column, _ in self.engine.generate(prompt, num_samples=1, **settings):
            token = token_column[0]
            if token in stop_tokens:
                break
            piece = decoder.push(token)
            if piece:
                yield piece
        yield decoder.flush()
        if not self.completion_only:
            # The turn is closed even when max_tokens cut the answer short.
            self.history = prompt + decoder.tokens + [special("<|assistant_end|>")]


class RemoteChat:
    """A conversation with a nanochat Serve app, kept as chat messages and sent whole each turn."""

    def __init__(self, url: str, max_tokens: int, temperature: float, top_k: int | None):
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if os.environ.get(API_KEY_ENV):
            self.headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
        self.settings = {"temperature": temperature, "top_k": top_k, "max_tokens": max_tokens}
        self.messages: list[dict] = []

    def clear(self) -> None:
        self.messages = []

    def reply(self, user_text: str) -> Iterator[str]:
        messages = self.messages + [{"role": "user", "content": user_text}]
        body = json.dumps({"messages": messages, **self.settings}).encode()
        request = urllib.request.Request(self.endpoint, data=body, method="POST", headers=self.headers)
        answer = []
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                for event in read_server_sent_events(response):
                    if "error" in event:
                        raise ChatError(f"the server reported an error: {event['error']}")
                    if event.get("done"):
                        break
                    if "token" in event:
                        answer.append(event["token"])
                        yield event["token"]
                else:
                    raise ChatError(f"the stream from {self.endpoint} ended without its final "
                                    '`data: {"done": true}`; the server may have stopped, check its log')
        except urllib.error.HTTPError as error:
            hint = f" (put the service's key in {API_KEY_ENV})" if error.code == 401 else ""
            raise ChatError(f"{self.endpoint} answered HTTP {error.code}: {http_error_message(error)}{hint}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ChatError(f"could not reach {self.endpoint} ({reason}); check --url and that the nanochat "
                            "Serve app is running there") from None
        self.messages = messages + [{"role": "assistant", "content": "".join(answer)}]


def read_server_sent_events(response) -> Iterator[dict]:
    """The JSON payloads of the `data:` lines of an event stream (other SSE fields are skipped)."""
    for raw_line in response:
        line = raw_line.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        try:
            yield json.loads(payload)
        except json.JSONDecodeError:
            raise ChatError(f"the server sent an event that is not JSON: {payload[:200]!r}") from None


def http_error_message(error: urllib.error.HTTPError) -> str:
    """The error text of a JSON error body ({"error": {"message": ...}}, {"error": ...} or FastAPI's
    {"detail": ...}), else the raw body."""
    body = error.read().decode("utf-8", errors="replace")
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:500] or error.reason
    if isinstance(parsed, dict):
        error_field = parsed.get("error")
        if isinstance(error_field, dict) and "message" in error_field:  # OpenAI-shaped: {"error": {"message": ...}}
            return str(error_field["message"])
        return str(error_field or parsed.get("detail") or parsed)
    return str(parsed)


def load_local_chat(args: argparse.Namespace) -> LocalChat:
    # Imported here so that --url needs neither torch nor a checkpoint on this machine.
    from nanochat.checkpoint import CheckpointError, load_model
    from nanochat.common import autodetect_device_type
    from nanochat.tokenizer import get_tokenizer

    device = args.device or autodetect_device_type()
    try:
        model, tokenizer, _ = load_model(args.source, device, model_tag=args.model_tag, step=args.step)
    except (CheckpointError, ValueError) as error:
        raise ChatError(str(error)) from None
    if tokenizer is None:
        # Checkpoints normally carry their tokenizer; an older one falls back to the project's.
        try:
            tokenizer = get_tokenizer()
        except (FileNotFoundError, ValueError) as error:
            raise ChatError(f"the checkpoint carries no tokenizer and none was found: {error}") from None
    return LocalChat(model, tokenizer, completion_only=args.source == "base", max_tokens=args.max_tokens,
                     temperature=args.temperature, top_k=args.top_k or None)


def print_reply(chat, user_text: str) -> None:
    for piece in chat.reply(user_text):
        print(piece, end="", flush=True)
    print(flush=True)


def interactive(chat) -> int:
    print(f"nanochat: type a message; '{CLEAR_COMMAND}' starts over, '{QUIT_COMMANDS[0]}' or Ctrl-D leaves.")
    while True:
        try:
            user_text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user_text.lower() in QUIT_COMMANDS:
            return 0
        if user_text.lower() == CLEAR_COMMAND:
            chat.clear()
            print("(new conversation)")
            continue
        if not user_text:
            continue
        print("Assistant: ", end="", flush=True)
        try:
            print_reply(chat, user_text)
        except ChatError as error:
            # One failed turn does not end the session; the history is left as it was.
            print(f"\nerror: {error}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(interrupted)")


def main(argv=None) -> int:
    """Run the chat; returns the exit status (0 = fine, 1 = nothing to talk to or the turn failed)."""
    args = parse_args(argv)
    try:
        if args.url:
            chat = RemoteChat(args.url, max_tokens=args.max_tokens, temperature=args.temperature,
                              top_k=args.top_k or None)
        else:
            chat = load_local_chat(args)
        if args.prompt is not None:
            print_reply(chat, args.prompt)
            return 0
    except ChatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return interactive(chat)


if __name__ == "__main__":
    sys.exit(main())
