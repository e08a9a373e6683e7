"""The chat service's API key, end to end: the real ChatAPI ingress with a key, on the session's
Serve, in front of test_serve_ui's scripted stand-in for ChatModel (the key is the ingress's
business, so no model needs loading). Clients as users run them: the official openai client with
the right key, a wrong key and none; curl without the header; `python -m serve.cli --url`; the
web UI in Chromium, which asks for the key once. Then the key must be nowhere in Ray's logs of the session, nor in /stats."""

import json
import os
import subprocess

import openai
import pytest
import ray
from ray import serve

from serve import cli
from serve.api import API_KEY_ENV, api_key_digest, bearer_key_matches, exposure_warning
from serve.app import ChatAPI, ChatAppArgs
from tests.serve_helpers import serve_port
from tests.test_serve_ui import GREETING_PIECES, SCRIPT, ScriptedChatModel, answer_after, message_texts


APP = "nanochat-auth"
ROUTE = "/auth-test"
KEY = "sk-nanochat-test-7f3a91c2e4"
WRONG_KEY = "sk-nanochat-wrong-0b55d1"
GREETING = "".join(GREETING_PIECES)


@pytest.fixture(scope="module")
def keyed_url(ray_local):
    port = serve_port()
    serve.run(ChatAPI.bind(ScriptedChatModel.bind(SCRIPT, GREETING_PIECES, 0.02), api_key_digest=api_key_digest(KEY)),
              name=APP, route_prefix=ROUTE)
    yield f"http://127.0.0.1:{port}{ROUTE}"
    serve.delete(APP)


def test_the_key_is_compared_whole_and_only_as_a_bearer_token():
    digest = api_key_digest(KEY)
    assert bearer_key_matches(f"Bearer {KEY}", digest) and bearer_key_matches(f"bearer  {KEY} ", digest)
    for header in (None, "", "Bearer", f"Basic {KEY}", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", KEY):
        assert not bearer_key_matches(header, digest), header


def test_a_warning_when_the_service_listens_beyond_this_machine_without_a_key():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, has_key=False) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "chat.example.com"):
        assert "NANOCHAT_API_KEY" in exposure_warning(host, has_key=False)
        assert exposure_warning(host, has_key=True) is None


def test_the_app_args_take_the_keys_digest_and_never_a_key():
    """Serve logs the args of an app built from a config: they hold the digest only."""
    assert ChatAppArgs(api_key_sha256=api_key_digest(KEY)).api_key_sha256 == api_key_digest(KEY)
    for wrong in (KEY, "", api_key_digest(KEY).upper()):
        with pytest.raises(ValueError):
            ChatAppArgs(api_key_sha256=wrong)
    with pytest.raises(ValueError):
        ChatAppArgs(api_key=KEY)


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return body["error"]


def test_the_openai_client_needs_the_right_key(keyed_url):
    messages = [{"role": "user", "content": "Hi!"}]
    client = openai.OpenAI(base_url=keyed_url + "/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model="nanochat", messages=messages)
    assert reply.choices[0].message.content == GREETING
    streamed = client.chat.completions.create(model="nanochat", messages=messages, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == GREETING
    assert [model.id for model in client.models.list()] == ["scripted"]

    # A wrong key; no key at all (the client insists on one, but leaves the header out when told).
    client = openai.OpenAI(base_url=keyed_url + "/v1", api_key=WRONG_KEY, max_retries=0)
    for headers, says in ((None, "not valid"), ({"Authorization": openai.omit}, "needs an API key")):
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model="nanochat", messages=messages, extra_headers=headers)
        assert refused.value.status_code == 401
        error = _error(refused.value)
        assert says in error["message"] and error["code"] == "invalid_api_key"
        assert error["type"] == "invalid_request_error" and WRONG_KEY not in json.dumps(error)


def _curl(url: str, *options: str) -> tuple[int, str]:
    """(HTTP status, body) of one curl call."""
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *options, url],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


def test_curl_without_the_header_gets_401_everywhere_but_health_and_the_page(keyed_url):
    chat = json.dumps({"messages": [{"role": "user", "content": "Hi!"}]})
    post = ("-H", "Content-Type: application/json", "-d", chat)
    for path, options in (("/v1/chat/completions", post), ("/chat/completions", post), ("/stats", ()),
                          ("/v1/models", ()), ("/docs", ()), ("/openapi.json", ()), ("/no-such-page", ())):
        status, body = _curl(keyed_url + path, *options)
        assert status == 401, (path, status, body)
        assert json.loads(body)["error"]["code"] == "invalid_api_key", (path, body)
    status, body = _curl(keyed_url + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = _curl(keyed_url + "/")
    assert status == 200 and 'id="key-form"' in body

    status, body = _curl(keyed_url + "/stats", "-H", f"Authorization: Bearer {KEY}")
    assert status == 200 and KEY not in body and api_key_digest(KEY) not in body
    status, body = _curl(keyed_url + "/chat/completions", *post, "-N", "-H", f"Authorization: Bearer {KEY}")
    assert status == 200 and '"done": true' in body


def test_the_terminal_chat_sends_the_key_from_the_environment(keyed_url, capsys, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert cli.main(["--url", keyed_url, "-p", "Hi!"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "needs an API key" in err and API_KEY_ENV in err
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert cli.main(["--url", keyed_url, "-p", "Hi!"]) == 0
    assert capsys.readouterr().out == GREETING + "\n"


def test_the_ui_asks_for_the_key_once_and_keeps_it_for_the_session(browser, keyed_url):
    context = browser.new_context()
    page = context.new_page()
    page.goto(keyed_url)
    assert page.locator("#key-form").is_hidden()

    page.fill("#input", "Hello there")
    answer_after(page, lambda: page.press("#input", "Enter"))
    assert page.locator("#key-form").is_visible()
    assert "API key" in page.text_content("#error")
    assert message_texts(page) == [("user", "Hello there")]

    page.fill("#api-key", WRONG_KEY)  # a wrong key is refused and asked for again
    answer_after(page, lambda: page.click("text=Use key"))
    assert page.locator("#key-form").is_visible() and "not valid" in page.text_content("#error")

    page.fill("#api-key", KEY)
    answer_after(page, lambda: page.click("text=Use key"))
    assert message_texts(page) == [("user", "Hello there"), ("assistant", GREETING)]
    assert page.locator("#key-form").is_hidden() and page.text_content("#error") == ""

    page.reload()  # the same tab keeps the key: no question this time
    page.fill("#input", "Again")
    answer_after(page, lambda: page.press("#input", "Enter"))
    assert message_texts(page) == [("user", "Again"), ("assistant", GREETING)]
    assert page.locator("#key-form").is_hidden()
    context.close()


def test_the_key_is_in_no_log_of_the_session(keyed_url):
    """Run after the requests above (pytest keeps file order): neither the key nor the wrong key
    that was sent reached any file under the Ray session's folder (Serve's access and replica logs,
    the workers' stdout and stderr)."""
    session = ray._private.worker.global_worker.node.get_session_dir_path()
    found = []
    for folder, _, files in os.walk(os.path.join(session, "logs")):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                content = f.read()
            found += [f"{path}: {secret}" for secret in (KEY, WRONG_KEY) if secret.encode() in content]
    assert not found
