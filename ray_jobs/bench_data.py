"""Benchmark of the pretraining data pipeline alone (read parquet, tokenize, best-fit pack: the
stream ray_jobs.pretrain_data feeds the trainer), with no model consuming it. One run, one table.

    python -m ray_jobs.bench_data                          # the sample source, T = 256, 512, 2048
    python -m ray_jobs.bench_data --cpus 1,2,8 --source fineweb-edu --max-files 4

Rows of the table, for every sequence length T:
- `no Ray`: the same stages in this one process, one thread: parquet row groups in file order,
  tokenize, PackRows. The compute the pipeline has to do, without any distribution.
- `Ray, N CPU`: for every N in --cpus a subprocess starts a fresh local Ray with N logical CPUs
  (`ray.init(address='local', num_cpus=N)`, so the runs never share workers or caches) and streams
  the training shards through the pipeline. Logical CPUs are what a Ray cluster hands out: they
  decide how many tokenize tasks (0.5 CPU each) run at once beside the read task (0.25) and the
  packer actor (0.25): one at 1 CPU, three at 2. They do not pin processes to cores, so Ray's own
  processes use every core in each run; what changes is the pipeline's parallelism, as it would on
  a cluster node with that many CPUs.

Columns: `pass s` is the wall time of one pass, from asking for the first row to the last, the
fastest of --repeats passes; `first row s` is the part of that pass spent starting (the packer
actor is a new process each pass, Ray's tasks are scheduled, the packer's buffer fills), which a
pass over the small sample cannot hide but a long epoch does; `tokens/s` counts the tokens of the
rows over the whole pass, and the ratio compares it with the Ray run with the fewest CPUs at the
same T. The crop fraction is
the share of the tokens read (BOS + tokens of every document) that no row holds: the tails that
best-fit cropping cut off plus the last partial row (under T+1 tokens). It depends on T and the
documents only: every run of a T must show the same rows and crop fraction, which the benchmark
checks. Machines are noisy: compare ratios within one run. Before timing, each Ray streams the
validation shard once, untimed, to start its workers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from nanochat.dataset import SOURCES, TEXT_COLUMN, resolve_source
from nanochat.packing import DEFAULT_MIN_BUFFER_DOCS
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
from ray_jobs.bench_results import result_line
from ray_jobs.pretrain_data import PackRows, ParquetRowGroupDatasource, packed_dataset

# More logical CPUs must not make the stream slower: the most CPUs against the fewest, within noise.
MORE_CPUS_TARGET = 0.95


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="sample", choices=SOURCES, help="where the shards come from")
    parser.add_argument("--data-dir", default=None, help="folder (or, for 'local', a glob) of parquet shards")
    parser.add_argument("--tokenizer-dir", default=None, help="default: the project's trained tokenizer")
    parser.add_argument("--cpus", default="1,2", help="comma-separated logical CPU counts, one local Ray each")
    parser.add_argument("--seq-lens", default="256,512,2048", help="comma-separated sequence lengths T")
    parser.add_argument("--buffer-docs", type=int, default=DEFAULT_MIN_BUFFER_DOCS,
                        help="documents the best-fit packer chooses from")
    parser.add_argument("--max-files", type=int, default=0, help="stream only the first N training shards (0 = all)")
    parser.add_argument("--repeats", type=int, default=2, help="passes per run and T; the fastest is reported")
    # Set by the benchmark for the subprocess that runs one CPU count.
    parser.add_argument("--child-cpus", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("cpus", "seq_lens"):
        flag = "--" + name.replace("_", "-")
        try:
            values = [int(part) for part in getattr(args, name).split(",")]
        except ValueError:
            parser.error(f"{flag} {getattr(args, name)!r} must be comma-separated integers such as 1,2")
        if min(values) < 1:
            parser.error(f"{flag} values must be at least 1")
        setattr(args, name, sorted(set(values)))
    if args.buffer_docs < 1 or args.max_files < 0 or args.repeats < 1:
        parser.error("--buffer-docs and --repeats must be at least 1, --max-files at least 0")
    args.tokenizer_dir = args.tokenizer_dir or get_tokenizer_dir()
    return args


def split_files(args) -> tuple[list[str], list[str]]:
    """(training shards to stream, validation shards for the warm-up pass)."""
    shards = resolve_source(args.source, args.data_dir)
    files = shards.train_files
    return (files[:args.max_files] if args.max_files else files), shards.val_files


def stream_without_ray(files: list[str], tokenizer: Tokenizer, args, seq_len: int) -> dict:
    """The pipeline's work in this process: each read unit's texts, tokenized on one thread, into
    one PackRows. Also counts the tokens read, for the crop fraction."""
    units = ParquetRowGroupDatasource(files, list(range(len(files)))).units
    bos = tokenizer.get_bos_token_id()
    pack = PackRows(seq_len, bos, args.buffer_docs, sum(unit[3] for unit in units), log_every_rows=0)
    rows = tokens_read = 0
    started = time.perf_counter()
    for path, row_groups, _, _, _ in units:
        texts = pq.ParquetFile(path).read_row_groups(row_groups, columns=[TEXT_COLUMN]).column(TEXT_COLUMN)
        ids = tokenizer.encode(texts.to_pylist(), prepend=bos, num_threads=1)
        tokens_read += sum(len(doc) for doc in ids)
        batch = pa.table({"ids": pa.array(ids, type=pa.list_(pa.int32())),
                          "file_index": pa.array(np.zeros(len(ids), dtype=np.int32))})
        rows += pack(batch).num_rows
    seconds = time.perf_counter() - started
    return {"run": "no Ray", "cpus": 0, "seq_len": seq_len, "rows": rows, "tokens_out": rows * (seq_len + 1),
            "seconds": seconds, "first_row_seconds": float("nan"), "tokens_read": tokens_read}


def stream_with_ray(files: list[str], args, seq_len: int) -> dict:
    """One pass of the Ray pipeline over files: rows, tokens out, seconds to the first row and in all."""
    dataset = packed_dataset(files, args.tokenizer_dir, seq_len, args.buffer_docs, log_every_rows=0)
    rows, first_row = 0, None
    started = time.perf_counter()
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        if first_row is None and len(batch["tokens"]):
            first_row = time.perf_counter() - started
        rows += len(batch["tokens"])
    seconds = time.perf_counter() - started
    return {"seq_len": seq_len, "rows": rows, "tokens_out": rows * (seq_len + 1), "seconds": seconds,
            "first_row_seconds": seconds if first_row is None else first_row}


def run_child(args) -> None:
    """Inside the subprocess for one CPU count: a fresh local Ray, a warm-up pass, then one timed
    pass per sequence length, written as JSON to --result-file."""
    files, val_files = split_files(args)
    ray.init(address="local", num_cpus=args.child_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        stream_with_ray(val_files, args, min(args.seq_lens))
        results = []
        for seq_len in args.seq_lens:
            result = min((stream_with_ray(files, args, seq_len) for _ in range(args.repeats)),
                         key=lambda r: r["seconds"])
            print(f"  Ray, {args.child_cpus} CPU, T={seq_len}: {result['rows']:,} rows in {result['seconds']:.1f}s",
                  flush=True)
            results.append({"run": f"Ray, {args.child_cpus} CPU", "cpus": args.child_cpus, **result})
    finally:
        ray.shutdown()
    with open(args.result_file, "w") as f:
        json.dump(results, f)


def run_cpu_count(cpus: int, argv: list[str], workdir: str) -> list[dict]:
    result_file = os.path.join(workdir, f"cpus_{cpus}.json")
    log_file = os.path.join(workdir, f"cpus_{cpus}.log")
    command = [sys.executable, "-m", "ray_jobs.bench_data", *argv, "--child-cpus", str(cpus),
               "--result-file", result_file]
    print(f"starting a local Ray with {cpus} CPU", flush=True)
    with open(log_file, "w") as log:
        status = subprocess.run(command, stderr=log, check=False).returncode
    if status != 0:
        with open(log_file) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"the run with {cpus} CPU failed (exit status {status}); the end of its log:\n{tail}")
    with open(result_file) as f:
        return json.load(f)


def print_table(results: list[dict], tokens_read: int) -> None:
    fewest = min(r["cpus"] for r in results if r["cpus"])
    base = {r["seq_len"]: r for r in results if r["cpus"] == fewest}
    label = f"vs {fewest} CPU"
    header = (f"{'run':<10} {'T':>5} {'rows':>7} {'pass s':>7} {'first row s':>11} {'tokens/s':>10} {label:>9} "
              f"{'crop fraction':>13}")
    print(header)
    print("-" * len(header))
    for r in sorted(results, key=lambda r: (r["seq_len"], r["cpus"])):
        rate = r["tokens_out"] / r["seconds"]
        ratio = rate / (base[r["seq_len"]]["tokens_out"] / base[r["seq_len"]]["seconds"])
        # the no-Ray pass has no start-up to split off
        first_row = "-" if r["run"] == "no Ray" else f"{r['first_row_seconds']:.1f}"
        print(f"{r['run']:<10} {r['seq_len']:>5} {r['rows']:>7,} {r['seconds']:>7.1f} {first_row:>11} "
              f"{rate:>10,.0f} {ratio:>8.2f}x {1 - r['tokens_out'] / tokens_read:>13.4f}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child_cpus:
        run_child(args)
        return
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    files, _ = split_files(args)
    print(f"source {args.source!r}: {len(files)} training shard(s), {tokenizer.get_vocab_size():,}-token vocabulary, "
          f"buffer {args.buffer_docs} documents, {os.cpu_count()} cores on this machine", flush=True)
    results = []
    for seq_len in args.seq_lens:
        results.append(min((stream_without_ray(files, tokenizer, args, seq_len) for _ in range(args.repeats)),
                           key=lambda r: r["seconds"]))
        print(f"  no Ray, T={seq_len}: {results[-1]['rows']:,} rows in {results[-1]['seconds']:.1f}s", flush=True)
    tokens_read = results[0]["tokens_read"]
    with tempfile.TemporaryDirectory(prefix="bench_data_") as workdir:
        results += [r for cpus in args.cpus for r in run_cpu_count(cpus, argv, workdir)]
    print(f"{tokens_read:,} tokens read per pass")
    print_table(results, tokens_read)
    for seq_len in args.seq_lens:
        counts = {r["run"]: r["rows"] for r in results if r["seq_len"] == seq_len}
        if len(set(counts.values())) != 1:
            raise SystemExit(f"T={seq_len}: the runs made different numbers of rows {counts}: the stream is not "
                             "deterministic")
    ray_runs = sorted({r["cpus"] for r in results if r["cpus"]})
    for seq_len in args.seq_lens:
        if len(ray_runs) < 2:
            break
        rate = {r["cpus"]: r["tokens_out"] / r["seconds"] for r in results if r["seq_len"] == seq_len and r["cpus"]}
        # more CPUs must never make the stream slower (within a machine's noise)
        print(result_line(f"ray_{ray_runs[-1]}cpu_vs_{ray_runs[0]}cpu_T{seq_len}", rate[ray_runs[-1]] / rate[ray_runs[0]],
                          ">=", MORE_CPUS_TARGET))


if __name__ == "__main__":
    main()
