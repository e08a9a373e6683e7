"""Benchmark: what pretraining on Ray Train costs against a plain PyTorch loop on the same machine.

    python -m ray_jobs.bench_train [--depth 2 --max-seq-len 256 --device-batch-size 8 --steps 30 ...]

One run measures, on the same model config and the same data (the `sample` source by default):

- (a) a plain single-process loop over the nanochat core: GPT + MuonAdamW + the schedule, batches
  packed in the same process (base_eval.packed_batches), no Ray anywhere; eager, and again with
  torch.compile (the trainer's `--compile auto` compiles on CUDA only; this is the CPU evidence);
- (b) ray_jobs.base_train through Ray Train with 1 worker: the Ray Data stream, the per-step
  `ray.train.report` barrier, gauges and the progress line included. Its tokens/s is taken from
  the wall-clock stamps of its step reports, so everything between two steps counts;

and prints one table: tokens/s of each, the ratio (b)/(a) (target >= 0.95), the share of step
time spent waiting for data (target <= 2%), and the achieved FLOP/s (6N + attention per token,
GPT.estimate_flops) against the FLOP/s of a plain fp32 matmul measured here, with as many threads.
The first `--skip-steps` steps of every loop are warm-up (allocator, thread pools, compilation)
and are not timed. Machines here are shared and noisy, so the plain loop runs before AND after
the Ray run and the ratio uses their mean; both plain numbers are printed.
"""

import argparse
import itertools
import math
import os
import statistics
import tempfile
import time

import ray
import torch

from nanochat.dataset import resolve_source
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
from nanochat.training import REFERENCE_BATCH_TOKENS, lr_multiplier, muon_momentum, weight_decay_at
from ray_jobs import base_train
from ray_jobs.base_eval import packed_batches
from ray_jobs.train_common import measure_matmul_flops

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Plain PyTorch loop vs base_train on Ray Train (1 worker)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--aspect-ratio", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--device-batch-size", type=int, default=8)
    p.add_argument("--total-batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per loop, warm-up included")
    p.add_argument("--skip-steps", type=int, default=5, help="warm-up steps left out of the timing")
    p.add_argument("--source", default="sample")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--compile", choices=["on", "off"], default="on", help="also time the plain loop compiled")
    args = p.parse_args(argv)
    if args.steps <= args.skip_steps + 1:
        p.error(f"--steps ({args.steps}) must exceed --skip-steps ({args.skip_steps}) by at least 2")
    if args.total_batch_size % (args.device_batch_size * args.max_seq_len):
        p.error("--total-batch-size must be a multiple of --device-batch-size * --max-seq-len")
    return args


def plain_loop(args, tokenizer: Tokenizer, train_files: list[str], compile_model: bool) -> dict:
    """Train `args.steps` steps in this process; returns tokens/s and data-wait share after warm-up."""
    config = config_from_depth(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len,
                               tokenizer.get_vocab_size(), args.window_pattern)
    torch.manual_seed(42)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    recipe = base_train.parse_args([])  # the trainer's default learning rates and schedule
    scale = math.sqrt(args.total_batch_size / REFERENCE_BATCH_TOKENS)
    optimizer = model.setup_optimizer(unembedding_lr=recipe.unembedding_lr * scale, embedding_lr=recipe.embedding_lr * scale,
                                      matrix_lr=recipe.matrix_lr * scale, scalar_lr=recipe.scalar_lr * scale,
                                      weight_decay=recipe.weight_decay)
    train_model = torch.compile(model, dynamic=False) if compile_model else model
    batches = itertools.chain.from_iterable(
        packed_batches(path, tokenizer, args.device_batch_size, args.max_seq_len) for path in itertools.cycle(train_files))
    grad_accum = args.total_batch_size // (args.device_batch_size * args.max_seq_len)
    step_times, waits = [], []
    started = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        lrm = lr_multiplier(step, args.steps, recipe.warmup_ratio, recipe.warmdown_ratio, recipe.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
                group["weight_decay"] = weight_decay_at(step, args.steps, recipe.weight_decay)
        waited = 0.0
        for _ in range(grad_accum):
            t_data = time.perf_counter()
            x, y = next(batches)
            waited += time.perf_counter() - t_data
            loss = train_model(x, y)
            (loss / grad_accum).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        float(loss)
        step_times.append(time.perf_counter() - t0)
        waits.append(waited)
        if step == args.skip_steps - 1:
            warmup_seconds = time.perf_counter() - started
    timed, timed_waits = step_times[args.skip_steps:], waits[args.skip_steps:]
    return {"tokens_per_second": args.total_batch_size * len(timed) / sum(timed),
            "data_wait_share": sum(timed_waits) / sum(timed), "warmup_seconds": warmup_seconds,
            "median_step_ms": 1000 * statistics.median(timed)}


def ray_loop(args, storage: str) -> dict:
    """base_train with 1 worker on the same config; tokens/s from the wall-clock stamps of its steps."""
    flags = ["--depth", str(args.depth), "--aspect-ratio", str(args.aspect_ratio), "--head-dim", str(args.head_dim),
             "--max-seq-len", str(args.max_seq_len), "--window-pattern", args.window_pattern,
             "--device-batch-size", str(args.device_batch_size), "--total-batch-size", str(args.total_batch_size),
             "--num-iterations", str(args.steps), "--num-workers", "1", "--source", args.source,
             "--eval-every", "-1", "--eval-tokens", str(args.device_batch_size * args.max_seq_len),
             "--sample-every", "-1", "--compile", "off", "--storage-path", storage, "--run-name", "bench",
             "--model-tag", "bench"]
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    result = base_train.main(flags)
    steps = [r for r in result["history"] if "loss" in r][args.skip_steps:]
    # wall time from the end of the first timed step to the end of the last: every step in
    # between with everything around it (report, gauges, print, data)
    wall = steps[-1]["time"] - steps[0]["time"]
    step_seconds = sum(r["step_seconds"] for r in steps[1:])
    return {"tokens_per_second": args.total_batch_size * (len(steps) - 1) / wall,
            "data_wait_share": sum(r["data_wait_seconds"] for r in steps[1:]) / step_seconds,
            "outside_step_share": 1 - step_seconds / wall,
            "median_step_ms": 1000 * statistics.median(r["step_seconds"] for r in steps)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    tokenizer = Tokenizer.from_directory(get_tokenizer_dir())
    train_files = resolve_source(args.source, args.data_dir).train_files
    config = config_from_depth(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len,
                               tokenizer.get_vocab_size(), args.window_pattern)
    with torch.device("meta"):
        flops_per_token = GPT(config).estimate_flops()
    threads = torch.get_num_threads()
    matmul_flops = measure_matmul_flops(torch.device("cpu"), seconds=2.0)
    print(f"bench_train: {config}, {args.total_batch_size} tokens/step, {args.steps} steps "
          f"({args.skip_steps} untimed), {threads} torch threads, {flops_per_token:.3g} FLOP/token", flush=True)

    results = {"plain (before)": plain_loop(args, tokenizer, train_files, compile_model=False)}
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    with tempfile.TemporaryDirectory(prefix="bench_train_") as storage:
        results["ray train, 1 worker"] = ray_loop(args, storage)
    results["plain (after)"] = plain_loop(args, tokenizer, train_files, compile_model=False)
    if args.compile == "on":
        results["plain, torch.compile"] = plain_loop(args, tokenizer, train_files, compile_model=True)

    plain = (results["plain (before)"]["tokens_per_second"] + results["plain (after)"]["tokens_per_second"]) / 2
    print(f"\nmatmul peak measured here: {matmul_flops / 1e9:.1f} GFLOP/s (fp32, {threads} threads)")
    print(f"{'loop':<24}{'tokens/s':>10}{'vs plain':>10}{'step ms':>9}{'data wait':>11}{'GFLOP/s':>9}{'of matmul':>11}")
    for name, r in results.items():
        achieved = flops_per_token * r["tokens_per_second"]
        print(f"{name:<24}{r['tokens_per_second']:>10,.0f}{r['tokens_per_second'] / plain:>9.3f}x"
              f"{r['median_step_ms']:>9.0f}{100 * r['data_wait_share']:>10.2f}%{achieved / 1e9:>9.2f}"
              f"{100 * achieved / matmul_flops:>10.1f}%")
    ray_result = results["ray train, 1 worker"]
    print(f"\nray / plain: {ray_result['tokens_per_second'] / plain:.3f} (target >= 0.95); "
          f"ray data wait: {100 * ray_result['data_wait_share']:.2f}% of step time (target <= 2%); "
          f"outside the step (report, logging): {100 * ray_result['outside_step_share']:.2f}% of wall time")
    if "plain, torch.compile" in results:
        compiled = results["plain, torch.compile"]
        print(f"torch.compile on CPU: {compiled['tokens_per_second'] / plain:.3f}x the eager plain loop, "
              f"{compiled['warmup_seconds']:.0f}s of warm-up (compilation) vs "
              f"{results['plain (before)']['warmup_seconds']:.0f}s eager")
    return {"matmul_flops": matmul_flops, "flops_per_token": flops_per_token, "plain_tokens_per_second": plain,
            "results": results}


if __name__ == "__main__":
    main()
