"""Tests of the web UI (serve/ui.html) in a real headless Chromium, driven by Playwright, against
the real ChatAPI ingress on a local Ray; and, on the same app, how the ingress ends a stream whose
answer fails half way.

Behind the ingress sits a scripted stand-in for ChatModel: a deployment that speaks the same event
protocol (start, text pieces, end) but answers from a script, piece by piece with a short pause,
instead of running a model. A random tiny model could not be made to say an exact string such as
`<img src=x onerror=alert(1)>`, and the UI is what is under test here; the ingress, the SSE
framing and the browser are all real. (The real model's streams are tested in test_serve_api.)

Chromium is Debian's `chromium` package, launched through `executable_path`; Playwright's own
browser download is never used.
"""

import asyncio
import sys

import pytest
from ray import cloudpickle, serve

from nanochat.prefix_cache import PrefixCache
from serve.app import ChatAPI
from tests.serve_helpers import serve_port, stream_events

APP = "nanochat-ui"
ROUTE = "/ui-test"
GREETING_PIECES = ["Hello", " from", " the", " scripted", " model", "."]
XSS = '<img src=x onerror=alert(1)><script>window.pwned = 1</script>'
FAILING = "fail half way"  # its answer ends as ChatModel ends one whose decode step failed
SCRIPT = {"say something dangerous": ["Here it is: ", XSS[:20], XSS[20:], " done"],
          FAILING: ["Half", " an", " answer"]}
CONTEXT = 1024
NEAR_FULL = "Tell me everything."  # answered as if the conversation filled 900 of the context's tokens
TOO_LONG = "And everything else?"  # refused as a replica refuses a conversation past the context

# The stand-in is defined in this module, which Ray's workers cannot import: ship it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ScriptedChatModel:
    """ChatModel's interface with scripted answers: SCRIPT's pieces for a known last user message,
    GREETING_PIECES otherwise."""

    def __init__(self, script: dict, default: list, pause_s: float):
        self.script = script
        self.default = default
        self.pause_s = pause_s

    def describe(self) -> dict:
        return {"id": "scripted", "context_length": CONTEXT}

    def stats(self) -> dict:
        return {"replica": "scripted", "active": 0, "queued": 0, "tokens_per_second": 0.0,
                **{key: 0 for key in PrefixCache.STAT_KEYS}}

    async def generate(self, settings: dict):
        message = settings["messages"][-1]["content"]
        if message == TOO_LONG:
            yield {"type": "rejected", "field": "messages", "limit": f"at most {CONTEXT - 1} prompt tokens",
                   "message": f"the conversation is 1100 tokens long and the model's context holds {CONTEXT}: "
                              "shorten it or start a new conversation"}
            return
        pieces = self.script.get(message, self.default)
        prompt_tokens = 900 if message == NEAR_FULL else len(settings["messages"])
        yield {"type": "start", "prompt_tokens": prompt_tokens, "max_tokens": 100, "replica": "scripted",
               "context_length": CONTEXT}
        for piece in pieces:
            await asyncio.sleep(self.pause_s)
            yield {"type": "text", "text": piece}
        failed = message == FAILING
        yield {"type": "end", "finish_reason": "error" if failed else "stop", "completion_tokens": len(pieces),
               "error": "the decode step failed" if failed else None}


@pytest.fixture(scope="module")
def ui_url(ray_local):
    port = serve_port()
    serve.run(ChatAPI.bind(ScriptedChatModel.bind(SCRIPT, GREETING_PIECES, 0.08)), name=APP, route_prefix=ROUTE)
    yield f"http://127.0.0.1:{port}{ROUTE}"
    serve.delete(APP)


@pytest.fixture
def page(browser, ui_url):
    """A phone-sized page of the UI that records every dialog (alert) it opens and every request it makes."""
    context = browser.new_context(viewport={"width": 375, "height": 667}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.dialogs, page.requested = [], []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    page.on("request", lambda request: page.requested.append(request.url))
    page.goto(ui_url)
    yield page
    context.close()


def watch_assistant_text(page) -> None:
    """Record every distinct text the last assistant message shows, as the DOM changes."""
    page.evaluate("""() => {
        window.shownTexts = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('#messages .message.assistant .text');
            const text = replies.length ? replies[replies.length - 1].textContent : '';
            if (text && text !== window.shownTexts[window.shownTexts.length - 1]) window.shownTexts.push(text);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")


def answer_after(page, action) -> None:
    """Do action(), which sends a chat request, and wait until its answer has been shown in full."""
    with page.expect_response(lambda response: response.url.endswith("/chat/completions"), timeout=30_000):
        action()
    page.wait_for_selector("body[data-state=idle]", timeout=30_000)


def send_and_wait(page, text: str) -> None:
    page.fill("#input", text)
    answer_after(page, lambda: page.press("#input", "Enter"))


def message_texts(page) -> list[tuple[str, str]]:
    """(role, shown text) of every message on the page, in order."""
    pairs = page.eval_on_selector_all(
        "#messages .message",
        "boxes => boxes.map(b => [b.classList.contains('user') ? 'user' : 'assistant', "
        "b.querySelector('.text').textContent])")
    return [tuple(pair) for pair in pairs]


def test_a_typed_message_gets_a_streamed_answer_on_a_phone_sized_screen(page):
    watch_assistant_text(page)
    send_and_wait(page, "Hello there")
    full = "".join(GREETING_PIECES)
    assert message_texts(page) == [("user", "Hello there"), ("assistant", full)]
    shown = page.evaluate("window.shownTexts")
    assert len(shown) >= 3 and shown[-1] == full
    assert all(full.startswith(text) for text in shown)  # it grew piece by piece
    assert page.input_value("#input") == ""
    assert page.text_content("#error") == ""
    # Nothing sticks out sideways on a 375-pixel-wide screen, and the composer is on screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert page.locator("#send").is_visible() and page.locator("#input").is_visible()

    # Shift+Enter adds a line instead of sending.
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.type("#input", "line two")
    assert page.input_value("#input") == "line one\nline two"
    assert len(message_texts(page)) == 2

    # Regenerate asks again for the same conversation; Edit takes the last message back into the box.
    chat_requests = sum(url.endswith("/chat/completions") for url in page.requested)
    answer_after(page, lambda: page.click("text=Regenerate"))
    assert sum(url.endswith("/chat/completions") for url in page.requested) == chat_requests + 1
    assert message_texts(page) == [("user", "Hello there"), ("assistant", full)]
    page.click("text=Edit")
    assert message_texts(page) == [] and page.input_value("#input") == "Hello there"

    # A refused request shows the server's reason on the error line; New conversation clears all.
    page.fill("#temperature", "5")
    send_and_wait(page, "Too hot")
    assert "temperature" in page.text_content("#error")
    assert message_texts(page) == [("user", "Too hot")]
    page.click("#new-chat")
    assert message_texts(page) == [] and page.text_content("#error") == ""


def test_model_output_is_shown_as_text_and_never_run(page):
    send_and_wait(page, "say something dangerous")
    replies = [text for role, text in message_texts(page) if role == "assistant"]
    assert replies == ["Here it is: " + XSS + " done"]
    assert page.query_selector("#messages img") is None and page.query_selector("#messages script") is None
    page.wait_for_timeout(300)  # an onerror handler would have fired by now
    assert page.dialogs == []
    assert page.evaluate("window.pwned") is None
    assert not [url for url in page.requested if url.endswith("/x")]  # the <img> never loaded its src


def test_a_conversation_near_or_past_the_context_gets_a_notice_and_a_new_conversation_button(page):
    send_and_wait(page, "Hello there")
    assert page.locator("#context-notice").is_hidden()
    send_and_wait(page, NEAR_FULL)  # 900 + 6 of 1024 tokens: past 80%
    notice = page.text_content("#context-notice-text")
    assert page.locator("#context-notice").is_visible() and f"906 of the model's {CONTEXT} tokens" in notice
    send_and_wait(page, TOO_LONG)
    assert "no longer fits the model's context (at most 1023 prompt tokens)" in page.text_content(
        "#context-notice-text")
    assert page.text_content("#error") == ""  # said by the notice, not as a server error
    page.click("#context-new-chat")
    assert message_texts(page) == [] and page.locator("#context-notice").is_hidden()


def test_an_answer_that_fails_half_way_ends_with_an_error_and_on_v1_without_done(ui_url):
    """The text so far, then an error event; on /v1 an OpenAI error chunk and no [DONE], so that a
    client does not take the half answer for a whole one."""
    port = int(ui_url.split(":")[-1].split("/")[0])
    body = {"messages": [{"role": "user", "content": FAILING}], "max_tokens": 20}
    *pieces, ending = stream_events(port, f"{ROUTE}/chat/completions", body)
    assert "".join(piece["token"] for piece in pieces) == "Half an answer"
    assert set(ending) == {"error"} and "the decode step failed" in ending["error"], ending
    events = stream_events(port, f"{ROUTE}/v1/chat/completions", {**body, "stream": True})
    assert "[DONE]" not in events, events[-3:]
    *chunks, ending = events
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks) == "Half an answer"
    assert ending["error"]["type"] == "server_error" and "the decode step failed" in ending["error"]["message"]
