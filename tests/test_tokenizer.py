"""Tests of nanochat.tokenizer on a tiny BPE trained once per module on a few KB of mixed text:
lossless round trips, special tokens that plain text can not forge, the chat rendering and its
training mask, saving and loading, and the byte lengths behind bits-per-byte."""

import os
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanochat.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    Tokenizer,
    compute_token_bytes,
    get_token_bytes,
    get_tokenizer,
    get_tokenizer_dir,
    save_token_bytes,
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "In 2024 the team trained 12 models on 8 GPUs and measured 3.14159 bits per byte.",
    "Tokenizers split text into pieces; byte pair encoding merges the most frequent pairs first.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Café, naïve, jalapeño and résumé are words with accents. Grüße aus München!",
    "你好世界，这是一个测试。Привет, мир! こんにちは 🌍🚀",
    "I'm sure you're right, it's what we'll do and they've said so.",
] * 8
VOCAB_SIZE = 420


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(TRAINING_TEXT), VOCAB_SIZE)


def special(tokenizer: Tokenizer, name: str) -> int:
    return tokenizer.encode_special(name)


def test_vocabulary_has_merges_and_the_special_tokens_in_order(tokenizer):
    vocab_size = tokenizer.get_vocab_size()
    # The text is small, so training may run out of pairs before VOCAB_SIZE; it must have merged some.
    assert 256 + len(SPECIAL_TOKENS) < vocab_size <= VOCAB_SIZE
    first_special = vocab_size - len(SPECIAL_TOKENS)
    assert [tokenizer.encode_special(name) for name in SPECIAL_TOKENS] == list(range(first_special, vocab_size))
    assert tokenizer.get_bos_token_id() == first_special
    assert tokenizer.get_special_tokens() == SPECIAL_TOKENS
    # Merges learned from the text make common words shorter than their bytes.
    assert len(tokenizer.encode(" the")) == 1
    assert tokenizer.id_to_token(tokenizer.encode(" the")[0]) == " the"


def test_too_small_vocab_size_is_refused():
    with pytest.raises(ValueError, match=r"at least 265"):
        Tokenizer.train_from_iterator(iter(["abc"]), 264)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=120))
def test_encode_decode_round_trip_on_any_unicode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # Byte lengths of the tokens add up to the text's UTF-8 length, even for split characters.
    token_bytes = compute_token_bytes(tokenizer)
    assert int(token_bytes[torch.tensor(ids, dtype=torch.long)].sum()) == len(text.encode("utf-8"))


def test_text_that_spells_a_special_token_never_yields_its_id(tokenizer):
    special_ids = {tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
    for text in ["<|bos|>", "<|assistant_end|>", "hi <|user_start|> there <|python_end|>", "<|bos|><|bos|>"]:
        ids = tokenizer.encode(text)
        assert not special_ids & set(ids), text
        assert tokenizer.decode(ids) == text
    for row in tokenizer.encode(["<|bos|>", "x<|output_start|>y"]):
        assert not special_ids & set(row)


def test_prepend_and_append_by_name_or_id(tokenizer):
    bos, end = tokenizer.get_bos_token_id(), special(tokenizer, "<|assistant_end|>")
    plain = tokenizer.encode("hello world")
    assert tokenizer.encode("hello world", prepend="<|bos|>", append=end) == [bos] + plain + [end]
    assert tokenizer.encode("hello world", prepend=bos) == [bos] + plain
    with pytest.raises(ValueError, match="not a special token"):
        tokenizer.encode("x", prepend="<|eos|>")
    with pytest.raises(ValueError, match="str or a list of str"):
        tokenizer.encode(b"bytes")
    with pytest.raises(ValueError, match="not strings"):
        tokenizer.encode(["ok", 3])


def test_batch_encode_equals_encoding_each_item(tokenizer):
    texts = ["", "The quick brown fox", "你好世界 🌍", "def f(x):\n    return 2 * x\n"] + TRAINING_TEXT[:7]
    batch = tokenizer.encode(texts, prepend="<|bos|>", num_threads=2)
    assert batch == [tokenizer.encode(text, prepend="<|bos|>") for text in texts]
    assert tokenizer.encode([]) == []


def test_render_multi_turn_conversation_masks_only_the_assistant(tokenizer):
    conversation = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ]}
    ids, mask = tokenizer.render_conversation(conversation)
    s = lambda name: special(tokenizer, name)  # noqa: E731
    enc = tokenizer.encode
    expected = [
        ([s("<|bos|>"), s("<|user_start|>")] + enc("You are terse.\n\nWhat is 2+2?") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (enc("4.") + [s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")] + enc("And 3+3?") + [s("<|user_end|>"), s("<|assistant_start|>")], 0),
        (enc("6.") + [s("<|assistant_end|>")], 1),
    ]
    assert ids == [token for chunk, _ in expected for token in chunk]
    assert mask == [value for chunk, value in expected for _ in chunk]
    assert mask[ids.index(s("<|assistant_end|>"))] == 1
    assert mask[ids.index(s("<|assistant_start|>"))] == 0
    # The caller's conversation is left as it was (the system message is merged in a copy).
    assert conversation["messages"][1]["content"] == "What is 2+2?"


def test_render_tool_use_trains_the_call_but_not_the_output(tokenizer):
    conversation = {"messages": [
        {"role": "user", "content": "Compute 12*34"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*34"},
            {"type": "python_output", "text": "408"},
            {"type": "text", "text": "It is 408."},
        ]},
    ]}
    ids, mask = tokenizer.render_conversation(conversation)
    s = lambda name: special(tokenizer, name)  # noqa: E731
    enc = tokenizer.encode
    user_part = ([s("<|bos|>"), s("<|user_start|>")] + enc("Compute 12*34")
                 + [s("<|user_end|>"), s("<|assistant_start|>")])
    call = enc("Let me compute. ") + [s("<|python_start|>")] + enc("12*34") + [s("<|python_end|>")]
    output = [s("<|output_start|>")] + enc("408") + [s("<|output_end|>")]
    answer = enc("It is 408.") + [s("<|assistant_end|>")]
    assert ids == user_part + call + output + answer
    assert mask == [0] * len(user_part) + [1] * len(call) + [0] * len(output) + [1] * len(answer)
    by_token = dict(zip(ids, mask, strict=True))
    assert by_token[s("<|python_start|>")] == by_token[s("<|python_end|>")] == 1
    assert by_token[s("<|output_start|>")] == by_token[s("<|output_end|>")] == 0


def test_render_truncates_to_max_tokens(tokenizer):
    conversation = {"messages": [{"role": "user", "content": "a long question " * 20},
                                 {"role": "assistant", "content": "a long answer " * 20}]}
    full_ids, full_mask = tokenizer.render_conversation(conversation)
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=7)
    assert len(full_ids) > 7
    assert (ids, mask) == (full_ids[:7], full_mask[:7])


def test_render_for_completion_ends_with_assistant_start(tokenizer):
    conversation = {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a color"}, {"role": "assistant", "content": "Blue"},
    ]}
    prompt = tokenizer.render_for_completion(conversation)
    prefix, _ = tokenizer.render_conversation({"messages": conversation["messages"][:3]})
    assert prompt == prefix + [special(tokenizer, "<|assistant_start|>")]
    assert len(conversation["messages"]) == 4
    with pytest.raises(ValueError, match=r"ends with an assistant message.*messages\[2\]"):
        tokenizer.render_for_completion({"messages": conversation["messages"][:3]})


@pytest.mark.parametrize("messages, message_pattern", [
    ([{"role": "assistant", "content": "hi"}],
     r"messages\[0\] has role 'assistant' but the expected role there is 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     r"messages\[1\] has role 'user' but the expected role there is 'assistant'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "user", "content": "u"}],
     r"messages\[2\] has role 'user' but the expected role there is 'assistant'"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     r"system message .* followed by a user"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     r"messages\[1\]\.content\[0\] .* an assistant part must be"),
    ([{"role": "user", "content": ["not", "a string"]}], r"messages\[0\] is a user message .* must be a string"),
    ([], r"at least one message"),
])
def test_bad_conversations_are_refused_with_a_message_that_says_where(tokenizer, messages, message_pattern):
    with pytest.raises(ValueError, match=message_pattern):
        tokenizer.render_conversation({"messages": messages})


def test_save_and_reload_encodes_identically(tokenizer, tmp_path):
    path = tokenizer.save(str(tmp_path / "tok"))
    assert path == str(tmp_path / "tok" / TOKENIZER_FILE)
    assert os.listdir(tmp_path / "tok") == [TOKENIZER_FILE]  # no temporary file left behind
    loaded = Tokenizer.from_directory(str(tmp_path / "tok"))
    assert loaded.get_vocab_size() == tokenizer.get_vocab_size()
    assert [loaded.encode_special(n) for n in SPECIAL_TOKENS] == [tokenizer.encode_special(n) for n in SPECIAL_TOKENS]
    assert loaded.encode(TRAINING_TEXT[:7]) == tokenizer.encode(TRAINING_TEXT[:7])
    # Ray ships tokenizers to workers by pickling them.
    shipped = pickle.loads(pickle.dumps(tokenizer))
    text = "Grüße 🌍 <|bos|>"
    assert shipped.encode(text, prepend="<|bos|>") == tokenizer.encode(text, prepend="<|bos|>")


def test_missing_or_corrupt_tokenizer_file_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / TOKENIZER_FILE)):
        Tokenizer.from_directory(str(tmp_path))
    (tmp_path / TOKENIZER_FILE).write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match=f"{tmp_path / TOKENIZER_FILE} is corrupt"):
        Tokenizer.from_directory(str(tmp_path))
    (tmp_path / TOKENIZER_FILE).write_bytes(pickle.dumps({"unexpected": 1}))
    with pytest.raises(ValueError, match="is corrupt"):
        Tokenizer.from_directory(str(tmp_path))


def test_token_bytes_sum_to_the_text_length_and_skip_specials(tokenizer):
    token_bytes = compute_token_bytes(tokenizer)
    assert token_bytes.dtype == torch.int32
    assert token_bytes.shape == (tokenizer.get_vocab_size(),)
    assert all(int(token_bytes[tokenizer.encode_special(n)]) == 0 for n in SPECIAL_TOKENS)
    assert int(token_bytes[:256].min()) == int(token_bytes[:256].max()) == 1
    text = "Grüße aus München! 你好世界 🌍 The quick brown fox, 2024."
    ids = tokenizer.encode(text, prepend="<|bos|>")
    assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_get_tokenizer_and_token_bytes_from_the_base_dir(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run python -m ray_jobs.tok_train first"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="run python -m ray_jobs.tok_train first"):
        get_token_bytes()
    tokenizer.save(get_tokenizer_dir())
    save_token_bytes(compute_token_bytes(tokenizer), get_tokenizer_dir())
    assert get_tokenizer().encode("The lazy dog") == tokenizer.encode("The lazy dog")
    assert torch.equal(get_token_bytes("cpu"), compute_token_bytes(tokenizer))


def test_visualize_marks_trained_and_untrained_tokens(tokenizer):
    ids, mask = tokenizer.render_conversation({"messages": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Yo"}]})
    shown = tokenizer.visualize_tokenization(ids, mask, with_token_id=True)
    green, red = "\033[92m", "\033[91m"
    assert shown.count(green) == sum(mask) and shown.count(red) == len(mask) - sum(mask)
    assert f"{red}<|bos|>" in shown and f"{green}<|assistant_end|>" in shown
    assert f"({tokenizer.get_bos_token_id()})" in shown
    with pytest.raises(ValueError, match="differ in length"):
        tokenizer.visualize_tokenization(ids, mask[:-1])
