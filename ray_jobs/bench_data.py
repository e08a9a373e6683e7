"""Benchmark of the pretraining data pipeline alone (read parquet, tokenize, best-fit pack: the
stream ray_jobs.pretrain_data feeds the trainer), with no model consuming it. One run, one table.

    python -m ray_jobs.bench_data                          # the sample source, T = 256, 512, 2048
    python -m ray_jobs.bench_data --cores 1,2,4 --source fineweb-edu --max-files 4

1 CPU against 2: for every count N in --cores the benchmark runs a subprocess pinned to N cores
(os.sched_setaffinity, which every Ray process it starts inherits) with a fresh local Ray of its
own (`ray.init(address='local', num_cpus=N)`), so the counts never share workers or caches, and
streams the training shards through the pipeline once per sequence length. Both limits are
needed: num_cpus alone only limits how many tasks Ray schedules (a 1-CPU Ray still runs its read
task, a tokenize task, the packer and its own daemons on every core), and pinning alone would let
Ray schedule as many tokenize tasks as a 2-CPU machine gets, time-sharing one core.

Columns: `tokens/s` counts the tokens of the packed rows over the wall time of one pass (from
asking for the first row to the last); `first row s` is the part of it spent starting the pipeline
(the packer actor is a new process every pass) and filling the packer's buffer; `running tok/s`
is the rate after the first batch of rows arrived, the one a long epoch sees. The
crop fraction is the share of the tokens read (BOS + tokens of every document, counted beforehand
outside Ray) that no row holds: the tails that best-fit cropping cut off, plus the last partial row
of the stream (under T+1 tokens). It depends on T and the documents, not on the cores: equal values
across core counts show the stream is deterministic. Machines are noisy: compare the ratios within
one run. Before timing, each Ray streams the validation shard once, untimed, to start its workers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import ray
import ray.data

from nanochat.dataset import SOURCES, iter_text, resolve_source
from nanochat.packing import DEFAULT_MIN_BUFFER_DOCS
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
from ray_jobs.pretrain_data import packed_dataset


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="sample", choices=SOURCES, help="where the shards come from")
    parser.add_argument("--data-dir", default=None, help="folder (or, for 'local', a glob) of parquet shards")
    parser.add_argument("--tokenizer-dir", default=None, help="default: the project's trained tokenizer")
    parser.add_argument("--cores", default="1,2", help="comma-separated core counts, one pinned local Ray each")
    parser.add_argument("--seq-lens", default="256,512,2048", help="comma-separated sequence lengths T")
    parser.add_argument("--buffer-docs", type=int, default=DEFAULT_MIN_BUFFER_DOCS,
                        help="documents the best-fit packer chooses from")
    parser.add_argument("--max-files", type=int, default=0, help="stream only the first N training shards (0 = all)")
    # Set by the benchmark for the subprocess that runs one CPU count.
    parser.add_argument("--child-cores", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("cores", "seq_lens"):
        flag = "--" + name.replace("_", "-")
        try:
            values = [int(part) for part in getattr(args, name).split(",")]
        except ValueError:
            parser.error(f"{flag} {getattr(args, name)!r} must be comma-separated integers such as 1,2")
        if min(values) < 1:
            parser.error(f"{flag} values must be at least 1")
        setattr(args, name, sorted(set(values)))
    if args.buffer_docs < 1 or args.max_files < 0:
        parser.error("--buffer-docs must be at least 1 and --max-files at least 0")
    if not hasattr(os, "sched_setaffinity"):
        parser.error("pinning to cores needs os.sched_setaffinity (Linux)")
    available = len(os.sched_getaffinity(0))
    if max(args.cores) > available:
        parser.error(f"--cores {max(args.cores)} is more than the {available} cores this process may use")
    args.tokenizer_dir = args.tokenizer_dir or get_tokenizer_dir()
    return args


def train_files(args) -> tuple[list[str], list[str]]:
    shards = resolve_source(args.source, args.data_dir)
    files = shards.train_files
    return (files[:args.max_files] if args.max_files else files), shards.val_files


def count_tokens_read(files: list[str], tokenizer: Tokenizer) -> tuple[int, int]:
    """(documents, tokens) of the files as the pipeline reads them: BOS + the document's tokens."""
    documents = tokens = 0
    batch = []
    for text in iter_text(files):
        batch.append(text)
        if len(batch) == 1024:
            tokens += sum(len(ids) + 1 for ids in tokenizer.encode(batch))
            documents, batch = documents + len(batch), []
    tokens += sum(len(ids) + 1 for ids in tokenizer.encode(batch)) if batch else 0
    return documents + len(batch), tokens


def stream_once(files: list[str], args, seq_len: int) -> dict:
    """One pass of the pipeline over files: rows, tokens out, seconds to the first row and in all."""
    dataset = packed_dataset(files, args.tokenizer_dir, seq_len, args.buffer_docs, log_every_rows=0)
    rows, first_row, first_rows = 0, None, 0
    started = time.perf_counter()
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        if first_row is None and len(batch["tokens"]):
            first_row, first_rows = time.perf_counter() - started, len(batch["tokens"])
        rows += len(batch["tokens"])
    seconds = time.perf_counter() - started
    first_row = seconds if first_row is None else first_row
    running = (rows - first_rows) * (seq_len + 1) / (seconds - first_row) if seconds > first_row else float("nan")
    return {"seq_len": seq_len, "rows": rows, "tokens_out": rows * (seq_len + 1), "seconds": seconds,
            "first_row_seconds": first_row, "running_tokens_per_second": running}


def run_child(args) -> None:
    """Inside the subprocess for one core count: pinned to the cores, a fresh local Ray, a warm-up
    pass, then one timed pass per sequence length, written as JSON to --result-file."""
    files, val_files = train_files(args)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.child_cores])
    ray.init(address="local", num_cpus=args.child_cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        stream_once(val_files, args, min(args.seq_lens))
        results = []
        for seq_len in args.seq_lens:
            result = stream_once(files, args, seq_len)
            print(f"  {args.child_cores} core(s), T={seq_len}: {result['rows']:,} rows in {result['seconds']:.1f}s",
                  flush=True)
            results.append({"cores": args.child_cores, **result})
    finally:
        ray.shutdown()
    with open(args.result_file, "w") as f:
        json.dump(results, f)


def run_core_count(cores: int, argv: list[str], workdir: str) -> list[dict]:
    result_file = os.path.join(workdir, f"cores_{cores}.json")
    log_file = os.path.join(workdir, f"cores_{cores}.log")
    command = [sys.executable, "-m", "ray_jobs.bench_data", *argv, "--child-cores", str(cores),
               "--result-file", result_file]
    print(f"starting a local Ray pinned to {cores} core(s)", flush=True)
    with open(log_file, "w") as log:
        status = subprocess.run(command, stderr=log, check=False).returncode
    if status != 0:
        with open(log_file) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"the run on {cores} core(s) failed (exit status {status}); the end of its log:\n{tail}")
    with open(result_file) as f:
        return json.load(f)


def print_table(results: list[dict], tokens_read: int) -> None:
    rate = {(r["cores"], r["seq_len"]): r["tokens_out"] / r["seconds"] for r in results}
    running = {(r["cores"], r["seq_len"]): r["running_tokens_per_second"] for r in results}
    fewest = min(r["cores"] for r in results)
    header = (f"{'cores':>5} {'T':>5} {'rows':>8} {'tokens out':>11} {'first row s':>11} {'pass s':>7} "
              f"{'tokens/s':>10} {'vs ' + str(fewest) + ' core':>9} {'running tok/s':>13} {'vs ' + str(fewest) + ' core':>9} "
              f"{'crop fraction':>13}")
    print(header)
    print("-" * len(header))
    for r in sorted(results, key=lambda r: (r["seq_len"], r["cores"])):
        speedup = rate[(r["cores"], r["seq_len"])] / rate[(fewest, r["seq_len"])]
        running_speedup = r["running_tokens_per_second"] / running[(fewest, r["seq_len"])]
        crop = 1 - r["tokens_out"] / tokens_read
        print(f"{r['cores']:>5} {r['seq_len']:>5} {r['rows']:>8,} {r['tokens_out']:>11,} {r['first_row_seconds']:>11.1f} "
              f"{r['seconds']:>7.1f} {rate[(r['cores'], r['seq_len'])]:>10,.0f} {speedup:>8.2f}x "
              f"{r['running_tokens_per_second']:>13,.0f} {running_speedup:>8.2f}x {crop:>13.4f}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child_cores:
        run_child(args)
        return
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    files, _ = train_files(args)
    documents, tokens_read = count_tokens_read(files, tokenizer)
    print(f"source {args.source!r}: {len(files)} training shard(s), {documents:,} documents, {tokens_read:,} tokens "
          f"read with a {tokenizer.get_vocab_size():,}-token vocabulary; buffer {args.buffer_docs} documents; "
          f"{len(os.sched_getaffinity(0))} cores available", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as workdir:
        results = [r for cores in args.cores for r in run_core_count(cores, argv, workdir)]
    print_table(results, tokens_read)


if __name__ == "__main__":
    main()
