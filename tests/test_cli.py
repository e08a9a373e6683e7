"""Tests of the chat CLI (serve/cli.py): one-shot and multi-turn chat with a tiny checkpoint saved
through nanochat.checkpoint, the message when no checkpoint exists, and the --url mode against a
small local HTTP server that streams server-sent events the way the Serve app does."""

import json
import math
import re
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from nanochat.checkpoint import checkpoint_dir, save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from serve import cli
from tests.tiny import CHAT_TEXT

@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_from_iterator(iter(CHAT_TEXT), vocab_size=300)


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """An empty base directory of our own, so no other test's checkpoints are found."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


@pytest.fixture
def sft_model(base_dir, tmp_path, tokenizer):
    """A random depth-2 model saved as the sft checkpoint d2, step 5, with its tokenizer. Only
    tokens of letters, digits and spaces get random logits, the rest (special tokens included) get
    zero, which greedy decoding never picks: answers never stop early and print as one clean line."""
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=64, window_pattern="SL")
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 1.0 / math.sqrt(parameter.size(1)))
        for token in range(model.padded_vocab_size):
            if token >= tokenizer.get_bos_token_id() or not re.fullmatch(r"[A-Za-z0-9 ]+", tokenizer.decode([token])):
                model.lm_head.weight[token] = 0.0
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save(str(tokenizer_dir))
    save_checkpoint(checkpoint_dir("sft", "d2"), 5, model.state_dict(), {"model_config": asdict(config)},
                    tokenizer_dir=str(tokenizer_dir))
    return model.eval()


def keyboard(lines):
    """A stand-in for input(): returns the lines in turn, then raises EOFError like Ctrl-D."""
    remaining = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(remaining)
        except StopIteration:
            raise EOFError from None

    return fake_input


def greedy_answer(model, tokenizer, prompt_ids, max_tokens):
    sequences, _ = Engine(model, tokenizer).generate_batch(prompt_ids, max_tokens=max_tokens, temperature=0.0)
    return sequences[0][len(prompt_ids):]


def chat_prompt(tokenizer, messages):
    """The model's prompt for the next answer, as the tokenizer renders chat conversations."""
    return tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})


def test_one_shot_prints_the_streamed_greedy_answer(sft_model, tokenizer, capsys):
    status = cli.main(["-p", "What is 12 plus 30?", "--temperature", "0", "--max-tokens", "9", "--device", "cpu"])
    assert status == 0
    prompt = chat_prompt(tokenizer, [{"role": "user", "content": "What is 12 plus 30?"}])
    answer = greedy_answer(sft_model, tokenizer, prompt, 9)
    assert len(answer) == 9
    assert capsys.readouterr().out == tokenizer.decode(answer) + "\n"


def test_interactive_chat_keeps_the_history_and_clear_forgets_it(sft_model, tokenizer, capsys, monkeypatch):
    typed = ["What is 12 plus 30?", "And the fox?", "clear", "And the fox?", "quit"]
    monkeypatch.setattr("builtins.input", keyboard(typed))
    flags = ["--temperature", "0", "--max-tokens", "6", "--device", "cpu", "--model-tag", "d2", "--step", "5"]
    assert cli.main(flags) == 0
    out = capsys.readouterr().out

    first_prompt = chat_prompt(tokenizer, [{"role": "user", "content": "What is 12 plus 30?"}])
    first = greedy_answer(sft_model, tokenizer, first_prompt, 6)
    special = tokenizer.encode_special
    # The second turn continues the token history: first prompt, first answer, <|assistant_end|>.
    second_prompt = (first_prompt + first + [special("<|assistant_end|>"), special("<|user_start|>")]
                     + tokenizer.encode("And the fox?") + [special("<|user_end|>"), special("<|assistant_start|>")])
    second = greedy_answer(sft_model, tokenizer, second_prompt, 6)
    fresh_prompt = chat_prompt(tokenizer, [{"role": "user", "content": "And the fox?"}])
    fresh = greedy_answer(sft_model, tokenizer, fresh_prompt, 6)
    assert second != fresh  # the history really changes the answer, so the check below means something
    replies = [line.removeprefix("Assistant: ") for line in out.split("\n") if line.startswith("Assistant:")]
    assert replies == [tokenizer.decode(first), tokenizer.decode(second), tokenizer.decode(fresh)]
    assert "(new conversation)" in out


def test_base_source_completes_plain_text(base_dir, tokenizer, sft_model, capsys):
    # The same weights saved as a base checkpoint, this time without a copy of the tokenizer.
    save_checkpoint(checkpoint_dir("base", "d2"), 1, sft_model.state_dict(), {"model_config": asdict(sft_model.config)})
    args = ["--source", "base", "-p", "The quick brown", "--temperature", "0", "--max-tokens", "5", "--device", "cpu"]
    assert cli.main(args) == 1  # no tokenizer in the checkpoint, none under the base dir either
    err = capsys.readouterr().err
    assert "carries no tokenizer" in err and "python -m ray_jobs.tok_train" in err
    tokenizer.save(str(base_dir / "tokenizer"))  # the project's tokenizer, which the CLI falls back to
    assert cli.main(args) == 0
    # No chat template around the prompt: plain text after <|bos|>.
    expected = greedy_answer(sft_model, tokenizer, tokenizer.encode("The quick brown", prepend="<|bos|>"), 5)
    assert capsys.readouterr().out == tokenizer.decode(expected) + "\n"


@pytest.mark.parametrize("source, command", [("sft", "python -m ray_jobs.chat_sft"),
                                             ("rl", "python -m ray_jobs.chat_rl"),
                                             ("base", "python -m ray_jobs.base_train")])
def test_missing_checkpoint_names_the_command_that_makes_one(base_dir, capsys, source, command):
    assert cli.main(["--source", source, "-p", "hi", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert command in err and err.startswith("error: ") and "Traceback" not in err


class FakeServe:
    """A local HTTP server that answers POST /chat/completions with a scripted SSE stream and
    records every request body."""

    def __init__(self, replies, status=200, error_body=None, finish=True):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                if status != 200:
                    payload = json.dumps(error_body).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for piece in replies[len(outer.requests) - 1]:
                    self.wfile.write(f"data: {json.dumps({'token': piece})}\n\n".encode())
                    self.wfile.flush()
                if finish:
                    self.wfile.write(b'data: {"done": true}\n\n')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_url_mode_streams_the_server_tokens(capsys):
    with FakeServe([["Hel", "lo", " wörld", "!"]]) as server:
        status = cli.main(["--url", server.url + "/", "-p", "Say hello", "--temperature", "0.3", "--top-k", "7",
                           "--max-tokens", "20"])
    assert status == 0
    assert capsys.readouterr().out == "Hello wörld!\n"
    path, body = server.requests[0]
    assert path == "/chat/completions"
    assert body == {"messages": [{"role": "user", "content": "Say hello"}], "temperature": 0.3, "top_k": 7,
                    "max_tokens": 20}


def test_url_mode_sends_the_whole_conversation_each_turn(capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", keyboard(["hi", "again", "clear", "fresh"]))
    with FakeServe([["Hello", " there"], ["Sure"], ["New"]]) as server:
        assert cli.main(["--url", server.url, "--top-k", "0"]) == 0  # input runs dry: Ctrl-D
    messages = [body["messages"] for _, body in server.requests]
    assert messages == [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"},
         {"role": "user", "content": "again"}],
        [{"role": "user", "content": "fresh"}],
    ]
    assert server.requests[0][1]["top_k"] is None
    out = capsys.readouterr().out
    assert "Assistant: Hello there\n" in out and "Assistant: Sure\n" in out and "Assistant: New\n" in out


@pytest.mark.parametrize("error_body", [
    {"error": "max_tokens must be at most 1024"},
    {"error": {"message": "max_tokens must be at most 1024", "type": "invalid_request_error", "param": "max_tokens"}},
])
def test_url_mode_reports_http_errors(capsys, error_body):
    with FakeServe([], status=400, error_body=error_body) as server:
        assert cli.main(["--url", server.url, "-p", "hi", "--max-tokens", "5000"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "max_tokens must be at most 1024" in err and "Traceback" not in err
    assert "invalid_request_error" not in err  # the message, not the whole error object


def test_url_mode_reports_a_stream_cut_short(capsys):
    with FakeServe([["partial"]], finish=False) as server:
        assert cli.main(["--url", server.url, "-p", "hi"]) == 1
    assert '"done": true' in capsys.readouterr().err


def test_url_mode_reports_an_unreachable_server(capsys):
    with FakeServe([]) as server:
        url = server.url
    assert cli.main(["--url", url, "-p", "hi"]) == 1
    err = capsys.readouterr().err
    assert "could not reach" in err and "--url" in err


def test_bad_flags_are_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--temperature", "-1", "-p", "hi"])
    assert exit_info.value.code == 2
    assert "not a number >= 0" in capsys.readouterr().err
