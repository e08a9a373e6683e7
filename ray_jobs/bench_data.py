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

Then one table for packing at scale: for each count in --consumers (2 and 8), that many
simulated train workers (Ray actors, each a process of its own as a train worker is, reading as
fast as they can) take rows of
T = --consumer-seq-len from one fresh local Ray with --consumer-cpus logical CPUs, the shards
streamed --copies times in a pass (--packing-copies when only packing runs) so that start-up
weighs little, in four runs:
- `one packer, full`: the whole stream through a single packer actor, split among the consumers
  with `streaming_split` (how base_train fed its workers before lanes);
- `lanes, full`: one lane per consumer (ray_jobs.pretrain_data: the read units dealt
  round-robin, each lane with its own packer), as base_train feeds its workers now;
- `one packer, packing only` and `lanes, packing only`: the same two designs fed with documents
  tokenized beforehand and held in the object store, so that the packers alone set the rate. This
  is the ceiling of each design once a cluster has CPUs enough to tokenize: one packer's is fixed
  at what one process packs, the lanes' grows with the consumers. On a machine with fewer cores
  than consumers the lanes share the cores and their start-up weighs on a short pass, so the
  ratio measured there understates a cluster's: targets apply only where there is a core per
  consumer.

The run ends with one `RESULT <name> <value> target <op> <number> PASS|FAIL` line per target
(ray_jobs.bench_results): more CPUs against the fewest, and lanes against one packer where there
is a core per consumer.

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

import pyarrow.compute as pc
import ray
import ray.data

from nanochat.dataset import SOURCES, resolve_source
from nanochat.packing import DEFAULT_MIN_BUFFER_DOCS
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
from ray_jobs.bench_results import result_line
from ray_jobs.pretrain_data import (PackRows, ParquetRowGroupDatasource, pack_stage, packed_dataset, read_row_groups,
                                    tokenize_documents)

# More logical CPUs must not make the stream slower: the most CPUs against the fewest, within noise.
MORE_CPUS_TARGET = 0.95
# Lanes against one packer for the same consumers, where the machine has a core per consumer: never
# slower over the whole pipeline (within noise), and faster where only packing works.
LANES_FULL_TARGET = 0.95
LANES_PACKING_TARGET = 1.3


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
    parser.add_argument("--consumers", default="2,8", help="comma-separated numbers of simulated train workers for "
                        "the packing table (0 = skip it)")
    parser.add_argument("--consumer-seq-len", type=int, default=2048, help="T of the rows the consumers take")
    parser.add_argument("--copies", type=int, default=4,
                        help="times the training shards are streamed in one pass of a 'full' run of the packing "
                        "table, so that start-up weighs little")
    parser.add_argument("--packing-copies", type=int, default=32,
                        help="the same for the 'packing only' runs, which go through the documents much faster")
    parser.add_argument("--consumer-cpus", type=int, default=4,
                        help="logical CPUs of the Ray for the packing table (each lane's packer holds 0.25)")
    # Set by the benchmark for the subprocess that runs one CPU count.
    parser.add_argument("--child-cpus", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-consumers", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("cpus", "seq_lens", "consumers"):
        flag = "--" + name.replace("_", "-")
        try:
            values = [int(part) for part in getattr(args, name).split(",")]
        except ValueError:
            parser.error(f"{flag} {getattr(args, name)!r} must be comma-separated integers such as 1,2")
        if min(values) < (0 if name == "consumers" else 1):
            parser.error(f"{flag} values must be at least {0 if name == 'consumers' else 1}")
        setattr(args, name, sorted(set(values)))
    if args.buffer_docs < 1 or args.max_files < 0 or args.repeats < 1:
        parser.error("--buffer-docs and --repeats must be at least 1, --max-files at least 0")
    args.consumers = [n for n in args.consumers if n]
    if (args.consumer_seq_len < 1 or min(args.copies, args.packing_copies) < 1
            or args.consumer_cpus * 4 < max(args.consumers, default=0) + 3):
        parser.error("--consumer-seq-len, --copies and --packing-copies must be at least 1, and --consumer-cpus "
                     "must hold a quarter CPU per lane's packer and one CPU besides for reading and tokenizing")
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
    documents = ParquetRowGroupDatasource(files, list(range(len(files)))).num_documents
    pack = PackRows(seq_len, tokenizer.get_bos_token_id(), args.buffer_docs, documents, log_every_rows=0)
    rows = tokens_read = 0
    started = time.perf_counter()
    for batch in tokenized_units(files, args.tokenizer_dir):
        tokens_read += pc.sum(pc.list_value_length(batch.column("ids"))).as_py()
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


@ray.remote(num_cpus=0)
class Consumer:
    """A simulated train worker: a process of its own that reads a stream (a lane's dataset or a
    split's iterator) to its end as fast as it can, as a train worker's ingest does."""

    def read(self, stream) -> tuple[int, float, float]:
        """(rows, wall time of the first row, wall time of the end)."""
        rows, first = 0, None
        for batch in stream.iter_batches(batch_size=None, batch_format="numpy"):
            if first is None and len(batch["tokens"]):
                first = time.time()
            rows += len(batch["tokens"])
        return rows, first, time.time()


def consume_concurrently(consumers: list, streams: list) -> dict:
    """Each consumer reads its stream, all at once. Returns the rows in all, the seconds until the
    last consumer is done, the seconds until the last one got its first row (the start-up: packer
    actors and tasks starting, buffers filling), and rows/s over the whole pass."""
    started = time.time()
    results = ray.get([consumer.read.remote(stream) for consumer, stream in zip(consumers, streams, strict=True)])
    if any(first is None for _, first, _ in results):
        raise SystemExit("a consumer got no rows: the shards hold too little text for this many consumers")
    rows = sum(r for r, _, _ in results)
    seconds = max(end for _, _, end in results) - started
    return {"rows": rows, "seconds": seconds, "first_row_seconds": max(first for _, first, _ in results) - started,
            "rows_per_s": rows / seconds}


def tokenized_units(files: list[str], tokenizer_dir: str):
    """The stream's read units tokenized in this process, one table at a time, as the read and
    tokenize stages make them."""
    for path, row_groups, index, _, _ in ParquetRowGroupDatasource(files, list(range(len(files)))).units:
        for table in read_row_groups(path, row_groups, index):
            yield tokenize_documents(table, tokenizer_dir)


def packing_streams(design: str, files: list[str], tokenized: list, args, n: int) -> list:
    """What the consumers read, for one design: 'one packer' (a single packer, split among the
    consumers) or 'lanes' (a lane per consumer); over the shards, or with `tokenized` documents
    already in the object store (then only the packers work)."""
    seq_len = args.consumer_seq_len
    bos = Tokenizer.from_directory(args.tokenizer_dir).get_bos_token_id()

    def packed_from_store(tables: list) -> ray.data.Dataset:
        return pack_stage(ray.data.from_arrow_refs(tables), seq_len, bos, args.buffer_docs,
                          sum(ray.get(table).num_rows for table in tables), log_every_rows=0)

    if design == "one packer":
        whole = (packed_from_store(tokenized) if tokenized else
                 packed_dataset(files, args.tokenizer_dir, seq_len, args.buffer_docs, log_every_rows=0))
        return whole.streaming_split(n, equal=True)
    if tokenized:
        return [packed_from_store(tokenized[lane::n]) for lane in range(n)]
    return [packed_dataset(files, args.tokenizer_dir, seq_len, args.buffer_docs, log_every_rows=0, lane=lane,
                           num_lanes=n) for lane in range(n)]


def run_consumers_child(args) -> None:
    """Inside the subprocess for the packing table: one local Ray, the four runs, as JSON."""
    files, val_files = split_files(args)
    ray.init(address="local", num_cpus=args.consumer_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    try:
        stream_with_ray(val_files, args, args.consumer_seq_len)  # warm-up: start the workers
        tokenized = [ray.put(table) for table in tokenized_units(files, args.tokenizer_dir)] * args.packing_copies
        files = files * args.copies
        all_consumers = [Consumer.remote() for _ in range(max(args.consumers))]
        ray.get([consumer.__ray_ready__.remote() for consumer in all_consumers])
        results = []
        for n in args.consumers:
            for stage in ("full", "packing only"):
                for design in ("one packer", "lanes"):
                    passes = [consume_concurrently(all_consumers[:n], packing_streams(
                        design, files, tokenized if stage == "packing only" else [], args, n))
                        for _ in range(args.repeats)]
                    best = max(passes, key=lambda p: p["rows_per_s"])
                    print(f"  {n} consumers, {design}, {stage}: {best['rows']:,} rows in {best['seconds']:.1f}s",
                          flush=True)
                    results.append({"consumers": n, "design": design, "stage": stage, **best})
    finally:
        ray.shutdown()
    with open(args.result_file, "w") as f:
        json.dump(results, f)


def run_child_process(label: str, flags: list[str], argv: list[str], workdir: str) -> list:
    """Run this benchmark in a subprocess with `flags` (a fresh local Ray); its JSON results."""
    name = label.replace(" ", "_")
    result_file = os.path.join(workdir, f"{name}.json")
    log_file = os.path.join(workdir, f"{name}.log")
    command = [sys.executable, "-m", "ray_jobs.bench_data", *argv, *flags, "--result-file", result_file]
    print(f"starting a local Ray for {label}", flush=True)
    with open(log_file, "w") as log:
        status = subprocess.run(command, stderr=log, check=False).returncode
    if status != 0:
        with open(log_file) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"the run for {label} failed (exit status {status}); the end of its log:\n{tail}")
    with open(result_file) as f:
        return json.load(f)


def print_packing_table(results: list[dict], args) -> None:
    print(f"\npacking, T={args.consumer_seq_len}, {args.consumer_cpus} logical CPUs, the shards streamed "
          f"{args.copies} times in a full pass, {args.packing_copies} in a packing one")
    header = (f"{'consumers':>9} {'design':<12} {'stage':<13} {'rows':>7} {'pass s':>7} {'first row s':>11} "
              f"{'rows/s':>8} {'vs one packer':>13}")
    print(header)
    print("-" * len(header))
    rate = {(r["consumers"], r["design"], r["stage"]): r["rows_per_s"] for r in results}
    for r in results:
        ratio = rate[(r["consumers"], r["design"], r["stage"])] / rate[(r["consumers"], "one packer", r["stage"])]
        print(f"{r['consumers']:>9} {r['design']:<12} {r['stage']:<13} {r['rows']:>7,} {r['seconds']:>7.1f} "
              f"{r['first_row_seconds']:>11.1f} {r['rows_per_s']:>8,.0f} {ratio:>12.2f}x")
    cores = os.cpu_count() or 1
    for n in args.consumers:
        if n > cores:
            print(f"({n} consumers: more packer processes than the {cores} cores here, so no target: they share "
                  "the cores, and their start-up (one process each) weighs on a short pass)")
            continue
        for stage, target in (("full", LANES_FULL_TARGET), ("packing only", LANES_PACKING_TARGET)):
            print(result_line(f"lanes_vs_one_packer_{stage.replace(' ', '_')}_{n}consumers",
                              rate[(n, "lanes", stage)] / rate[(n, "one packer", stage)], ">=", target))


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
    if args.child_consumers:
        run_consumers_child(args)
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
        results += [r for cpus in args.cpus
                    for r in run_child_process(f"{cpus} CPU", ["--child-cpus", str(cpus)], argv, workdir)]
        packing = run_child_process("the packing table", ["--child-consumers"], argv, workdir) if args.consumers else []
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

    if packing:
        print_packing_table(packing, args)


if __name__ == "__main__":
    main()
