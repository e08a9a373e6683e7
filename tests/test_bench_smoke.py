"""The serving and data benchmarks run end to end at tiny sizes. bench_serve --smoke must show its
ratio's direction: continuous batching serves more tokens per second than a replica that takes one
request at a time (about 2x at 4 clients here), and the batched replica's /stats must say it decoded
several requests at once (the ratio alone cannot tell, at this size, a batch of one from batching).
bench_routing --smoke must keep the single replica's prefix-cache hit rate over 2 replicas. bench_data, on a few small synthetic shards, must
stream the same rows without Ray and on local Rays of 1 and 2 logical CPUs, and state its 2-vs-1
CPU ratio against its target; the direction itself is not asserted at this size: the passes last
seconds and are mostly start-up, and 2 CPUs measured 0.80x and 0.84x of 1 CPU on the 2-core test
machine, so only a stream long enough for the tokenizing to dominate can show it. Each benchmark
runs as its users run it, as `python -m`, since each starts local Rays of its own."""

import os
import random
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.tokenizer import Tokenizer
from tests.tiny import CHAT_TEXT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(module: str, *flags: str) -> str:
    result = subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return result.stdout


def result_value(output: str, name: str, op: str, target: float) -> float:
    """The value of the benchmark's RESULT line `name`, which must state the given target."""
    match = re.search(rf"^RESULT {name} (\S+) target {op} {target:g} (PASS|FAIL)$", output, re.MULTILINE)
    assert match, f"no RESULT line {name} with target {op} {target:g} in:\n{output[-3000:]}"
    return float(match.group(1))


def test_bench_serve_smoke_batching_serves_more_than_one_at_a_time():
    output = run_benchmark("ray_jobs.bench_serve", "--smoke")
    assert "bench_serve: depth 1," in output and "4 clients done" in output
    assert result_value(output, "batching_vs_one_at_a_time_4", ">=", 1) > 1.0, output[-2000:]
    # At this size the ratio alone cannot tell batching from none (1.0-1.3 with a batch of one, from
    # 1.25 with batching): the replicas' own count of what they decoded at once can.
    peaks = dict(re.findall(r"/(batching|one-at-a-time): its replica decoded at most (\d+) requests at once", output))
    assert int(peaks["batching"]) >= 2 and int(peaks["one-at-a-time"]) == 1, output[-2000:]


def write_synthetic_shards(folder, shards: int, documents: int, seed: int = 0) -> None:
    """`shards` parquet files of `documents` texts each, made of the words of tests.tiny's chat
    text in random order, in row groups of 50 documents (the pipeline's read units)."""
    words = " ".join(CHAT_TEXT).split()
    rng = random.Random(seed)
    for shard in range(shards):
        texts = [" ".join(rng.choices(words, k=rng.randint(100, 400))) for _ in range(documents)]
        pq.write_table(pa.table({"text": texts}), str(folder / f"shard_{shard:05d}.parquet"), row_group_size=50)


def test_bench_data_smoke_streams_the_same_rows_on_1_and_2_cpus(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_synthetic_shards(shards, shards=4, documents=400)
    tokenizer = Tokenizer.train_from_iterator(iter(CHAT_TEXT), vocab_size=300)
    tokenizer.save(str(tmp_path / "tokenizer"))
    # The benchmark exits with an error when the runs of a T made different rows.
    output = run_benchmark("ray_jobs.bench_data", "--source", "local", "--data-dir", str(shards),
                           "--tokenizer-dir", str(tmp_path / "tokenizer"), "--cpus", "1,2", "--seq-lens", "512",
                           "--repeats", "1", "--consumers", "0")
    rows = {run: int(count.replace(",", "")) for run, count in
            re.findall(r"^(no Ray|Ray, [12] CPU) +512 +([\d,]+) ", output, re.MULTILINE)}
    assert set(rows) == {"no Ray", "Ray, 1 CPU", "Ray, 2 CPU"} and len(set(rows.values())) == 1, output[-2000:]
    result_value(output, "ray_2cpu_vs_1cpu_T512", ">=", 0.95)  # the line is there, with the benchmark's target


def test_bench_routing_smoke_the_prefix_aware_router_keeps_the_single_replicas_hit_rate():
    # With a load imbalance no burst of 8 chats reaches, every turn goes where its history is.
    out = run_benchmark("ray_jobs.bench_routing", "--smoke", "--skip-default-router", "--imbalance", "8")
    ratios = dict(re.findall(r"(prefix-aware router|Serve's default router) ([\d.]+)x", out))
    assert set(ratios) == {"prefix-aware router"}, out[-3000:]
    prefix = float(ratios["prefix-aware router"])
    assert prefix >= 0.8, out[-3000:]  # the target; Serve's default router measured 0.60x-0.87x here
    assert out.strip().splitlines()[-1].startswith("RESULT prefix_routing_hit_rate_vs_single_2_replicas ")
