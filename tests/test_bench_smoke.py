"""The serving and data benchmarks run end to end at tiny sizes, and their ratios point the way
the README says: continuous batching serves more tokens per second than a replica that takes one
request at a time (bench_serve --smoke), and the data stream is no slower on 2 logical CPUs than on
1 (bench_data on a few small synthetic shards). Each benchmark runs as its users run it, as
`python -m`, since each starts local Rays of its own; the verdict is its RESULT line."""

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


def write_synthetic_shards(folder, shards: int, documents: int, seed: int = 0) -> None:
    """`shards` parquet files of `documents` texts each, made of the words of tests.tiny's chat
    text in random order, in row groups of 50 documents (the pipeline's read units)."""
    words = " ".join(CHAT_TEXT).split()
    rng = random.Random(seed)
    for shard in range(shards):
        texts = [" ".join(rng.choices(words, k=rng.randint(100, 400))) for _ in range(documents)]
        pq.write_table(pa.table({"text": texts}), str(folder / f"shard_{shard:05d}.parquet"), row_group_size=50)


def test_bench_data_smoke_two_cpus_stream_no_slower_than_one(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_synthetic_shards(shards, shards=4, documents=2400)
    tokenizer = Tokenizer.train_from_iterator(iter(CHAT_TEXT), vocab_size=300)
    tokenizer.save(str(tmp_path / "tokenizer"))
    output = run_benchmark("ray_jobs.bench_data", "--source", "local", "--data-dir", str(shards),
                           "--tokenizer-dir", str(tmp_path / "tokenizer"), "--cpus", "1,2", "--seq-lens", "512",
                           "--repeats", "1", "--consumers", "0")
    # 2 CPUs run three tokenize tasks at once to 1 CPU's one: never slower, within the benchmark's noise margin.
    assert result_value(output, "ray_2cpu_vs_1cpu_T512", ">=", 0.95) >= 0.95, output[-2000:]
