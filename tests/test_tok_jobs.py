"""Tests of the tokenizer jobs, run in-process on two tiny local parquet shards: tok_train reads
only the training shard within its character caps and saves a loadable tokenizer with matching
token byte lengths; tok_eval prints a bytes/token table, with or without the tiktoken baselines."""

import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch

from nanochat.tokenizer import Tokenizer, get_token_bytes, get_tokenizer, get_tokenizer_dir
from ray_jobs import tok_eval, tok_train

WORDS = ("the model reads text and learns to predict the next token while the tokenizer "
         "merges frequent pairs of bytes into longer tokens such as words and numbers 2024 café").split()
DOC_CAP = 400


def random_docs(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) for _ in range(count)]


def write_shard(path, docs: list[str]) -> None:
    pq.write_table(pa.table({"text": docs}), str(path), row_group_size=8)  # several row groups


@pytest.fixture
def shards(tmp_path, monkeypatch):
    """A base dir of its own and two shards: shard_00000 (train) and shard_00001 (val)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    train_docs = random_docs(0, 40) + ["x" * 1000]  # one document longer than the cap
    # Validation text uses letters the training text never has, so reading it would show in the merges.
    val_docs = ["qqq zzz jjj " * 20 for _ in range(10)]
    write_shard(data_dir / "shard_00000.parquet", train_docs)
    write_shard(data_dir / "shard_00001.parquet", val_docs)
    return str(data_dir), train_docs, val_docs


def train(data_dir: str, *extra: str) -> dict:
    return tok_train.main(["--source", "local", "--data-dir", data_dir, "--vocab-size", "320",
                           "--doc-cap", str(DOC_CAP), *extra])


def test_tok_train_reads_only_training_text_and_saves_a_loadable_tokenizer(shards, capsys):
    data_dir, train_docs, val_docs = shards
    summary = train(data_dir)
    out = capsys.readouterr().out
    assert out.startswith("tok_train config:\n")
    assert "vocab-size: 320" in out and "training time:" in out and "vocab size: 320" in out

    assert summary["num_docs"] == len(train_docs)
    assert summary["num_chars"] == sum(min(len(doc), DOC_CAP) for doc in train_docs)
    assert summary["tokenizer_path"] == os.path.join(get_tokenizer_dir(), "tokenizer.pkl")
    assert sorted(os.listdir(get_tokenizer_dir())) == ["token_bytes.pt", "tokenizer.pkl"]

    tokenizer = get_tokenizer()
    assert tokenizer.get_vocab_size() == summary["vocab_size"] == 320
    # Training text compresses; validation-only letters stay single bytes (they were never read).
    assert len(tokenizer.encode(" tokenizer")) == 1
    assert len(tokenizer.encode("qqq zzz jjj")) == len("qqq zzz jjj")

    token_bytes = get_token_bytes()
    assert token_bytes.shape == (320,) and token_bytes.dtype == torch.int32
    for text in train_docs[:5] + val_docs[:1] + ["Grüße 🌍"]:
        ids = tokenizer.encode(text, prepend="<|bos|>")
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_tok_train_stops_at_max_chars(shards):
    data_dir, _, _ = shards
    summary = train(data_dir, "--max-chars", "1000")
    assert summary["num_chars"] == 1000
    assert Tokenizer.from_directory(get_tokenizer_dir()).get_vocab_size() == summary["vocab_size"]


@pytest.mark.parametrize("flags, message", [
    (["--vocab-size", "100"], "--vocab-size must be at least 265"),
    (["--doc-cap", "0"], "--doc-cap must be positive"),
    (["--max-chars", "-5"], "--max-chars must be positive"),
    (["--source", "nowhere"], "invalid choice: 'nowhere'"),
])
def test_tok_train_refuses_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        tok_train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_tok_train_needs_a_validation_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    write_shard(tmp_path / "shard_00000.parquet", random_docs(1, 10))
    with pytest.raises(ValueError, match="at least two are needed"):
        train(str(tmp_path))


def test_tok_eval_prints_ratios_and_says_when_baselines_are_missing(shards, capsys, monkeypatch):
    data_dir, train_docs, val_docs = shards
    train(data_dir)
    capsys.readouterr()

    def offline(name):
        raise ConnectionError(f"no network to fetch {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    results = tok_eval.main(["--source", "local", "--data-dir", data_dir])
    out = capsys.readouterr().out
    assert out.startswith("tok_eval config:\n")
    assert out.count("could not be loaded") == 1

    tokenizer = get_tokenizer()
    val_bytes = sum(len(doc.encode("utf-8")) for doc in val_docs)
    assert results["val"]["bytes"] == val_bytes
    assert results["val"]["tokens"] == sum(len(row) for row in tokenizer.encode(val_docs))
    assert results["val"]["ratio"] == pytest.approx(val_bytes / results["val"]["tokens"])
    # The tokenizer learned the training words, so train text compresses well beyond 1 byte/token,
    # better than the validation text whose letters it never saw.
    assert results["train"]["ratio"] > 2.0 > results["val"]["ratio"]
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["train"], ["val"])}
    assert float(rows["train"][3]) == pytest.approx(results["train"]["ratio"], abs=1e-3)
    assert int(rows["val"][1].replace(",", "")) == val_bytes


def test_tok_eval_shows_baseline_columns_when_they_load(shards, capsys, monkeypatch):
    data_dir, train_docs, _ = shards
    train(data_dir)
    capsys.readouterr()
    # A byte-level stand-in for GPT-2/GPT-4 (no network in tests): exactly 1 byte per token.
    bytes_only = tiktoken.Encoding(name="bytes_only", pat_str=r"\S+|\s+",
                                   mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: bytes_only)
    results = tok_eval.main(["--source", "local", "--data-dir", data_dir, "--eval-chars", "2000"])
    out = capsys.readouterr().out
    assert "could not be loaded" not in out
    assert "GPT-2" in out and "GPT-4" in out
    assert results["train"]["GPT-2"] == results["train"]["GPT-4"] == 1.0
    train_row = next(line.split() for line in out.splitlines() if line.startswith("train"))
    assert train_row[-2:] == ["1.000", "1.000"]
    # --eval-chars caps the text read from each split at exactly that many characters.
    assert results["train"]["bytes"] == len("".join(train_docs)[:2000].encode("utf-8"))
