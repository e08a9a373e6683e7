"""Tool calls come out readable: no raw special token in any text that the APIs or the UI return.

The reader and the text stream are tested on token lists first (every way of cutting a reply into
batches gives the same text). Then a real ChatModel serves a checkpoint whose greedy reply is a
python block, the calculator's forced output and "Done" (tests.serve_helpers), and the reply is
read through the official openai client (streamed and whole), the seed's SSE API and the web UI in
Chromium. The finish reasons are checked on the same model: its <|assistant_end|> is "stop",
max_tokens is "length", a stop string is "stop".
"""

import openai
import pytest
from ray import serve

from nanochat.tokenizer import Tokenizer
from serve.api import ReplyReader, TextStream, ToolCall
from serve.app import ChatAppArgs, build_app, text_events
from tests.serve_helpers import (TOOL_AFTER, TOOL_EXPRESSION, TOOL_RESULT, save_tool_calling_checkpoint, serve_port,
                                 stream_events)
from tests.tiny import CHAT_TEXT

APP = "nanochat-tools"
ROUTE = "/tools"
MODEL_TAG = "tool_calling"
READABLE_REPLY = f"[calculator: {TOOL_EXPRESSION} = {TOOL_RESULT}]{TOOL_AFTER}"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_from_iterator(iter(CHAT_TEXT), vocab_size=300)


def special_ids(tokenizer) -> dict:
    return {name: tokenizer.encode_special(name) for name in
            ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>", "<|user_start|>",
             "<|assistant_end|>", "<|bos|>")}


def read_reply(tokenizer, batches: list[list[int]], stop=()) -> tuple[list[dict], TextStream]:
    """The replica's text and tool events for a reply that arrives in these batches."""
    reader = ReplyReader(tokenizer.decode, special_ids(tokenizer))
    text = TextStream(reader.decode_text, stop)
    events = []
    for batch in batches:
        events += text_events(reader.feed(batch), text)
        if text.stopped:
            return events, text
    unfinished = reader.finish()
    events += text_events([unfinished] if unfinished else [], text)
    if piece := text.finish():
        events.append({"type": "text", "text": piece})
    return events, text


def reply_tokens(tokenizer, before: str, expression: str, result: str | None, after: str) -> list[int]:
    s = special_ids(tokenizer)
    tokens = [*tokenizer.encode(before), s["<|python_start|>"], *tokenizer.encode(expression), s["<|python_end|>"]]
    if result is not None:
        tokens += [s["<|output_start|>"], *tokenizer.encode(result), s["<|output_end|>"]]
    return tokens + tokenizer.encode(after)


def joined(events: list[dict]) -> str:
    return "".join(event["text"] for event in events)


def test_a_tool_call_reads_as_text_however_the_reply_is_cut_into_batches(tokenizer):
    tokens = reply_tokens(tokenizer, "Let me compute. ", "12*7", "84", " So it is 84.")
    whole, stream = read_reply(tokenizer, [tokens])
    assert joined(whole) == "Let me compute. [calculator: 12*7 = 84] So it is 84."
    assert [e["tool_call"] for e in whole if e["type"] == "tool"] == [
        {"name": "calculator", "expression": "12*7", "result": "84"}]
    assert stream.tokens == len(tokens)  # every token counts, the special ones too
    for cut in range(1, len(tokens)):
        events, _ = read_reply(tokenizer, [tokens[:cut], tokens[cut:]])
        assert joined(events) == joined(whole), f"cut at {cut}"
    one_by_one, _ = read_reply(tokenizer, [[token] for token in tokens])
    assert joined(one_by_one) == joined(whole) and "<|" not in joined(one_by_one)


def test_a_refused_call_an_unfinished_call_and_a_stray_special_token_leave_no_raw_token(tokenizer):
    refused, _ = read_reply(tokenizer, [reply_tokens(tokenizer, "", "import os", None, "I cannot.")])
    assert joined(refused) == "[calculator: import os]I cannot."
    assert [e["tool_call"]["result"] for e in refused if e["type"] == "tool"] == [None]

    cut_short = reply_tokens(tokenizer, "Hm ", "3+4", "7", "")[:-1]  # ends inside the tool's output
    unfinished, _ = read_reply(tokenizer, [cut_short])
    assert joined(unfinished) == "Hm [calculator: 3+4 = 7]"

    stray = [*tokenizer.encode("a"), tokenizer.encode_special("<|user_start|>"), *tokenizer.encode("b")]
    assert joined(read_reply(tokenizer, [stray])[0]) == "ab"


def test_stop_sequences_match_the_models_text_and_a_call_releases_a_partial_match(tokenizer):
    tokens = reply_tokens(tokenizer, "Sum: ", "2+2", "4", " end STOP more")
    events, stream = read_reply(tokenizer, [tokens], stop=["STOP"])
    assert joined(events) == "Sum: [calculator: 2+2 = 4] end " and stream.stopped
    # "calc" inside the rendered call is not a stop, and "Su" held back before the call is released
    events, stream = read_reply(tokenizer, [reply_tokens(tokenizer, "Su", "1+1", "2", "m")], stop=["calc", "Sum"])
    assert joined(events) == "Su[calculator: 1+1 = 2]m" and not stream.stopped
    assert ToolCall("1+1", None, 3).readable() == "[calculator: 1+1]"


@pytest.fixture(scope="module")
def tool_app(ray_local, tmp_path_factory):
    save_tool_calling_checkpoint(MODEL_TAG, str(tmp_path_factory.mktemp("tool_tokenizer")))
    port = serve_port()
    serve.run(build_app(ChatAppArgs(model_tag=MODEL_TAG, replica_cpus=0.5, max_batch_size=2)), name=APP,
              route_prefix=ROUTE)
    yield f"http://127.0.0.1:{port}{ROUTE}", port
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(tool_app):
    return openai.OpenAI(base_url=tool_app[0] + "/v1", api_key="not-needed", max_retries=0)


MESSAGES = [{"role": "user", "content": "What is six times seven?"}]


def test_the_openai_api_returns_the_call_readable_with_stop_length_and_stop_string_finishes(client):
    whole = client.chat.completions.create(model="nanochat", messages=MESSAGES, temperature=0.0)
    assert whole.choices[0].message.content == READABLE_REPLY
    assert whole.choices[0].finish_reason == "stop"  # the model's <|assistant_end|>

    chunks = list(client.chat.completions.create(model="nanochat", messages=MESSAGES, temperature=0.0, stream=True))
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert "".join(pieces) == READABLE_REPLY and not any("<|" in piece for piece in pieces)
    assert chunks[-1].choices[0].finish_reason == "stop"

    cut = client.chat.completions.create(model="nanochat", messages=MESSAGES, temperature=0.0, max_tokens=3)
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == "[calculator: 6*]"  # ended inside the python block

    stopped = client.chat.completions.create(model="nanochat", messages=MESSAGES, temperature=0.0, stop=["Do"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == f"[calculator: {TOOL_EXPRESSION} = {TOOL_RESULT}]"


def test_the_seed_sse_api_sends_the_call_as_text_and_as_fields(tool_app):
    events = stream_events(tool_app[1], ROUTE + "/chat/completions", {"messages": MESSAGES, "temperature": 0.0})
    tokens = [event for event in events if "token" in event]
    assert "".join(event["token"] for event in tokens) == READABLE_REPLY
    assert [event["tool_call"] for event in tokens if "tool_call" in event] == [
        {"name": "calculator", "expression": TOOL_EXPRESSION, "result": TOOL_RESULT}]
    assert events[-1]["done"] is True and events[-1]["finish_reason"] == "stop"


def test_the_ui_shows_the_call_as_a_block_with_its_result(browser, tool_app):
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(tool_app[0] + "/")
        page.fill("#temperature", "0")
        page.fill("#input", MESSAGES[0]["content"])
        page.press("#input", "Enter")
        page.wait_for_selector("body[data-state=idle] .message.assistant .tool-call", timeout=30_000)
        block = page.locator(".message.assistant .tool-call")
        assert block.locator(".tool-name").text_content() == "calculator"
        assert block.locator(".tool-expression").text_content() == TOOL_EXPRESSION
        assert block.locator(".tool-result").text_content() == f" = {TOOL_RESULT}"
        shown = page.locator(".message.assistant .text").text_content()
        assert shown.endswith(TOOL_AFTER) and "<|" not in shown and "[calculator" not in shown
    finally:
        context.close()
