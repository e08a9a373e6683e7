"""How well the trained tokenizer compresses text: bytes per token on train and validation text,
beside the GPT-2 and GPT-4 encodings when tiktoken can load them.

    python -m ray_jobs.tok_eval [--source hf|sample|local|...] [--data-dir PATH] [--eval-chars N]

More bytes per token means shorter sequences for the same text, so more text per step of the
same context length. Train and validation should be close; a large gap means the tokenizer fit
its training text too closely. GPT-2/GPT-4 give a scale: a 32K-64K vocabulary trained on the
pretraining set usually lands between them on that set. tiktoken downloads those two encodings
on first use, so offline they are skipped with one line saying so.

A plain driver script, no Ray: it encodes a few MB of text.
"""

import argparse

import tiktoken

from nanochat.common import print0
from nanochat.dataset import SOURCES, iter_text, resolve_source
from nanochat.report import Report
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir

# Column title -> tiktoken encoding name.
BASELINES = {"GPT-2": "gpt2", "GPT-4": "cl100k_base"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Bytes per token of the trained tokenizer on train and val text")
    parser.add_argument("--source", default="hf", choices=SOURCES,
                        help="where the shards come from ('hf' = the default Hugging Face set)")
    parser.add_argument("--data-dir", default=None,
                        help="folder (or, for 'local', a glob) of parquet shards; overrides the source's default")
    parser.add_argument("--eval-chars", type=int, default=5_000_000,
                        help="characters of text to encode from each split")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="folder with tokenizer.pkl (default <base>/tokenizer, where tok_train saves)")
    args = parser.parse_args(argv)
    if args.eval_chars <= 0:
        parser.error(f"--eval-chars must be positive, got {args.eval_chars}")
    return args


def load_baselines() -> dict:
    """{column title: tiktoken Encoding} of the baselines that could be loaded; {} when offline."""
    try:
        return {title: tiktoken.get_encoding(name) for title, name in BASELINES.items()}
    except Exception as e:  # noqa: BLE001 - network, proxy, cache and registry errors all mean "not available"
        print0(f"the GPT-2/GPT-4 tiktoken encodings could not be loaded ({type(e).__name__}: {e}); "
               "showing this tokenizer only")
        return {}


def bytes_per_token(num_bytes: int, token_rows: list[list[int]]) -> float:
    num_tokens = sum(len(row) for row in token_rows)
    return num_bytes / num_tokens if num_tokens else float("nan")


def main(argv=None) -> dict:
    """Print the compression table; returns {split: {"bytes", "tokens", "ratio", <baseline>: ratio}}."""
    args = parse_args(argv)
    tokenizer_dir = args.tokenizer_dir or get_tokenizer_dir()
    print0("tok_eval config:")
    for key, value in {**vars(args), "tokenizer_dir": tokenizer_dir}.items():
        print0(f"  {key.replace('_', '-')}: {value}")

    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    shards = resolve_source(args.source, args.data_dir)
    docs_by_split = {split: list(iter_text(shards.split(split), max_chars=args.eval_chars))
                     for split in ("train", "val")}
    baselines = load_baselines()

    results = {}
    for split, docs in docs_by_split.items():
        ids = tokenizer.encode(docs)
        broken = [i for i, (doc, row) in enumerate(zip(docs, ids, strict=True)) if tokenizer.decode(row) != doc]
        if broken:
            raise RuntimeError(f"the tokenizer in {tokenizer_dir} does not round-trip {len(broken)} {split} "
                               f"document(s) (first: #{broken[0]}); retrain it with python -m ray_jobs.tok_train")
        num_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
        results[split] = {"bytes": num_bytes, "tokens": sum(len(row) for row in ids),
                          "ratio": bytes_per_token(num_bytes, ids)}
        for title, encoding in baselines.items():
            results[split][title] = bytes_per_token(num_bytes, encoding.encode_ordinary_batch(docs))

    print0(f"vocab sizes: ours {tokenizer.get_vocab_size():,}"
           + "".join(f", {title} {encoding.n_vocab:,}" for title, encoding in baselines.items()))
    print0("bytes/token (higher = better compression)")
    header = f"{'text':<8}{'bytes':>14}{'tokens':>14}{'ours':>10}" + "".join(f"{title:>10}" for title in baselines)
    print0(header)
    print0("-" * len(header))
    for split, row in results.items():
        print0(f"{split:<8}{row['bytes']:>14,}{row['tokens']:>14,}{row['ratio']:>10.3f}"
               + "".join(f"{row[title]:>10.3f}" for title in baselines))
    Report().log_stage("tok_eval", config=vars(args), metrics={
        f"{split} bytes/token" + ("" if column == "ratio" else f" ({column})"): value
        for split, row in results.items() for column, value in row.items() if column not in ("bytes", "tokens")})
    return results


if __name__ == "__main__":
    main()
