"""Train the BPE tokenizer on the training shards and save it where every later stage looks.

    python -m ray_jobs.tok_train --max-chars 2000000000 --doc-cap 10000 --vocab-size 32768 \
        [--source hf|sample|local|fineweb-edu|climbmix] [--data-dir PATH]

Writes <base>/tokenizer/tokenizer.pkl and <base>/tokenizer/token_bytes.pt (the UTF-8 length of
every token, which turns a loss per token into bits per byte).

A plain driver script, no Ray: BPE training is one merge loop over pair counts held in one
process (rustbpe already counts on all local cores), so a cluster would only add transfer time.
Only training shards are read; the last shard is validation, and a tokenizer that has seen the
validation text would flatter the bits-per-byte measured on it.
"""

import argparse
import time

from nanochat.common import print0
from nanochat.dataset import SOURCES, iter_text, resolve_source
from nanochat.report import Report
from nanochat.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    compute_token_bytes,
    get_tokenizer_dir,
    save_token_bytes,
)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# Mixed text whose round trip must be exact before anything downstream trusts the tokenizer.
ROUND_TRIP_TEXT = ("Hello world! Numbers: 123, 4567, 3.14. Contractions: I'm, you're, it's.\n"
                   "Symbols: @#$%^&*() Unicode: 你好世界 🌍 Grüße <|bos|> text that looks special.")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train nanochat's BPE tokenizer on the training shards")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000,
                        help="characters of training text to read in total")
    parser.add_argument("--doc-cap", type=int, default=10_000,
                        help="crop every document to this many characters, so a few huge documents "
                             "can not dominate the pair counts")
    parser.add_argument("--vocab-size", type=int, default=32768,
                        help=f"tokens in the vocabulary, the {len(SPECIAL_TOKENS)} special tokens included")
    parser.add_argument("--source", default="hf", choices=SOURCES,
                        help="where the shards come from ('hf' = the default Hugging Face set)")
    parser.add_argument("--data-dir", default=None,
                        help="folder (or, for 'local', a glob) of parquet shards; overrides the source's default")
    args = parser.parse_args(argv)
    if args.max_chars <= 0:
        parser.error(f"--max-chars must be positive, got {args.max_chars}")
    if args.doc_cap <= 0:
        parser.error(f"--doc-cap must be positive, got {args.doc_cap}")
    if args.vocab_size < MIN_VOCAB_SIZE:
        parser.error(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 byte tokens + "
                     f"{len(SPECIAL_TOKENS)} special tokens), got {args.vocab_size}")
    return args


class CountingTexts:
    """Wraps the document stream to count what the trainer actually consumed."""

    def __init__(self, texts):
        self.texts = texts
        self.num_docs = 0
        self.num_chars = 0

    def __iter__(self):
        for text in self.texts:
            self.num_docs += 1
            self.num_chars += len(text)
            yield text


def main(argv=None) -> dict:
    """Train, check and save the tokenizer; returns a summary (paths, sizes, timing) for callers."""
    args = parse_args(argv)
    tokenizer_dir = get_tokenizer_dir()
    print0("tok_train config:")
    for key, value in {**vars(args), "tokenizer_dir": tokenizer_dir}.items():
        print0(f"  {key.replace('_', '-')}: {value}")

    shards = resolve_source(args.source, args.data_dir)
    print0(f"reading {len(shards.train_files)} training shard(s) of source {shards.source!r} "
           f"(held out for validation: {shards.val_files[0]})")
    texts = CountingTexts(iter_text(shards.train_files, max_chars=args.max_chars, doc_cap=args.doc_cap))

    started = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(iter(texts), args.vocab_size)
    train_time = time.perf_counter() - started
    vocab_size = tokenizer.get_vocab_size()
    print0(f"training time: {train_time:.2f}s on {texts.num_docs:,} documents, {texts.num_chars:,} characters")
    print0(f"vocab size: {vocab_size:,} (asked for {args.vocab_size:,})")
    if vocab_size < args.vocab_size:
        print0("the text ran out of byte pairs to merge before reaching --vocab-size: "
               "give it more text (--max-chars, more shards) or ask for a smaller vocabulary")

    decoded = tokenizer.decode(tokenizer.encode(ROUND_TRIP_TEXT))
    if decoded != ROUND_TRIP_TEXT:
        raise RuntimeError(f"the trained tokenizer does not round-trip text: {ROUND_TRIP_TEXT!r} came back "
                           f"as {decoded!r}; nothing was saved")
    tokenizer_path = tokenizer.save(tokenizer_dir)
    token_bytes = compute_token_bytes(tokenizer)
    token_bytes_path = save_token_bytes(token_bytes, tokenizer_dir)
    print0(f"saved {tokenizer_path} and {token_bytes_path}")
    regular = token_bytes[token_bytes > 0].float()
    print0(f"token bytes over the {regular.numel():,} regular tokens: min {int(regular.min())}, "
           f"max {int(regular.max())}, mean {regular.mean():.2f}")
    Report().log_stage("tokenizer", config=vars(args), timings={"train_s": train_time},
                       metrics={"vocab_size": vocab_size, "train_docs": texts.num_docs, "train_chars": texts.num_chars})
    return {"tokenizer_path": tokenizer_path, "token_bytes_path": token_bytes_path, "vocab_size": vocab_size,
            "train_time": train_time, "num_docs": texts.num_docs, "num_chars": texts.num_chars}


if __name__ == "__main__":
    main()
