"""POST /v1/completions on an app built on a base checkpoint, through the official openai client:
the prompt continued as plain text, equal to the in-process Engine's continuation, streamed or
whole, with n choices, stop strings, the default of 16 tokens, and a 400 naming the field for a
request the endpoint cannot honour. The chat endpoints serve a base model too (it continues the
chat format as best it can)."""

import openai
import pytest
from ray import serve

from serve.app import ChatAppArgs, build_app
from tests.serve_helpers import engine_reply, save_tiny_chat_checkpoint, serve_port

APP = "nanochat-base"
ROUTE = "/base"
MODEL_TAG = "tiny_base"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def base_app(ray_local, tmp_path_factory):
    model, tokenizer = save_tiny_chat_checkpoint(MODEL_TAG, str(tmp_path_factory.mktemp("base_tokenizer")),
                                                 source="base")
    port = serve_port()
    serve.run(build_app(ChatAppArgs(source="base", model_tag=MODEL_TAG, replica_cpus=0.5, max_batch_size=4)),
              name=APP, route_prefix=ROUTE)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}{ROUTE}/v1", api_key="not-needed", max_retries=0)
    yield client, model, tokenizer
    serve.delete(APP)


def engine_continuation(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """Greedy continuation of BOS + the prompt by the in-process Engine."""
    ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
    return engine_reply(model, tokenizer, ids, max_tokens=max_tokens, temperature=0.0)


def test_a_completion_continues_the_prompt_as_the_engine_does_whole_and_streamed(base_app):
    client, model, tokenizer = base_app
    expected = engine_continuation(model, tokenizer, PROMPT, 12)
    whole = client.completions.create(model="nanochat", prompt=PROMPT, max_tokens=12, temperature=0.0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == expected and len(expected) > 3
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == len(tokenizer.encode(PROMPT)) + 1  # BOS + the prompt

    chunks = list(client.completions.create(model="nanochat", prompt=PROMPT, max_tokens=12, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True}))
    assert {chunk.object for chunk in chunks} == {"text_completion"} and len({chunk.id for chunk in chunks}) == 1
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_n_choices_a_stop_string_and_the_default_length(base_app):
    client, model, tokenizer = base_app
    sampled = client.completions.create(model="nanochat", prompt=PROMPT, n=2, max_tokens=10, temperature=1.0, seed=7)
    assert [choice.index for choice in sampled.choices] == [0, 1]
    assert sampled.choices[0].text != sampled.choices[1].text  # seeds 7 and 8

    greedy = engine_continuation(model, tokenizer, PROMPT, 24)
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    stopped = client.completions.create(model="nanochat", prompt=PROMPT, max_tokens=24, temperature=0.0, stop=[stop])
    assert stopped.choices[0].text == greedy[:greedy.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"

    default = client.completions.create(model="nanochat", prompt=PROMPT, temperature=0.0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


@pytest.mark.parametrize("fields, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": PROMPT, "echo": True}, "echo"),
    ({"prompt": PROMPT, "logprobs": 2}, "logprobs"),
    ({"prompt": PROMPT, "max_tokens": 100000}, "max_tokens"),
    ({"prompt": PROMPT, "n": 99}, "n"),
])
def test_requests_it_cannot_honour_are_a_400_naming_the_field(base_app, fields, param):
    client = base_app[0]
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="nanochat", **fields)
    assert refused.value.body["param"] == param


def test_the_chat_endpoint_serves_a_base_model_too(base_app):
    reply = base_app[0].chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5, temperature=0.0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 5
