"""Benchmark: what pretraining on Ray Train costs against a plain PyTorch loop on the same machine.

    python -m ray_jobs.bench_train [--depth 2 --max-seq-len 256 --device-batch-size 8 --steps 40 ...]

One run measures, on the same model config and the same data (the `sample` source by default):

- (a) a plain single-process loop over the nanochat core: GPT + MuonAdamW + the trainer's default
  schedule, batches packed in the same process (base_eval.packed_batches), no Ray anywhere;
- (b) ray_jobs.base_train through Ray Train with 1 worker: the Ray Data stream, the per-step
  `ray.train.report`, gauges and the progress line included. Its step time is the wall time
  between the stamps of consecutive step reports, so everything between two steps counts;
- torch.compile on CPU (the evidence for `--compile auto` compiling there): the plain loop
  steps an eager and a compiled copy of the model in turn, on the same batches, so both see the
  same machine load.

It prints one table: tokens/s of each, the ratio (b)/(a) (target >= 0.95), the share of step time
spent waiting for data (target <= 2%), and the achieved FLOP/s (GPT.estimate_flops per token)
against the FLOP/s of a plain fp32 matmul measured here with as many threads. Rates come from the
median step time after `--skip-steps` warm-up steps (allocator, thread pools, compilation): the
machines here are shared, and a median ignores the steps another process slowed down. For the
same reason the plain loop runs before AND after the Ray run, the ratio uses their mean, and the
load average is printed with every phase.
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
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per loop, warm-up included")
    p.add_argument("--skip-steps", type=int, default=8, help="warm-up steps left out of the timing")
    p.add_argument("--source", default="sample")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--compile", choices=["on", "off"], default="on",
                   help="also step a torch.compile'd copy in the plain loop")
    args = p.parse_args(argv)
    if args.steps <= args.skip_steps + 2:
        p.error(f"--steps ({args.steps}) must exceed --skip-steps ({args.skip_steps}) by at least 3")
    if args.total_batch_size % (args.device_batch_size * args.max_seq_len):
        p.error("--total-batch-size must be a multiple of --device-batch-size * --max-seq-len")
    return args


def _load() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def plain_loop(args, tokenizer: Tokenizer, train_files: list[str], variants: tuple[str, ...]) -> dict[str, dict]:
    """Train one copy of the model per variant ('eager', 'compiled') for `args.steps` steps in this
    process, stepping the copies in turn on the same batches; returns each one's timings."""
    config = config_from_depth(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len,
                               tokenizer.get_vocab_size(), args.window_pattern)
    recipe = base_train.parse_args([])  # the trainer's default learning rates and schedule
    scale = math.sqrt(args.total_batch_size / REFERENCE_BATCH_TOKENS)
    runs = {}
    for variant in variants:
        torch.manual_seed(42)
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device="cpu")
        model.init_weights()
        optimizer = model.setup_optimizer(unembedding_lr=recipe.unembedding_lr * scale,
                                          embedding_lr=recipe.embedding_lr * scale, matrix_lr=recipe.matrix_lr * scale,
                                          scalar_lr=recipe.scalar_lr * scale, weight_decay=recipe.weight_decay)
        forward = torch.compile(model, dynamic=False) if variant == "compiled" else model
        runs[variant] = {"model": model, "optimizer": optimizer, "forward": forward, "steps": [], "waits": []}
    batches = itertools.chain.from_iterable(
        packed_batches(path, tokenizer, args.device_batch_size, args.max_seq_len) for path in itertools.cycle(train_files))
    grad_accum = args.total_batch_size // (args.device_batch_size * args.max_seq_len)
    for step in range(args.steps):
        waited = 0.0
        step_batches = []
        for _ in range(grad_accum):  # read once per step; every copy's step time counts the reading
            t_data = time.perf_counter()
            step_batches.append(next(batches))
            waited += time.perf_counter() - t_data
        lrm = lr_multiplier(step, args.steps, recipe.warmup_ratio, recipe.warmdown_ratio, recipe.final_lr_frac,
                            recipe.warmup_steps)
        for run in runs.values():
            t0 = time.perf_counter()
            for group in run["optimizer"].param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group["kind"] == "muon":
                    group["momentum"] = muon_momentum(step, args.steps, recipe.warmdown_ratio)
                    group["weight_decay"] = weight_decay_at(step, args.steps, recipe.weight_decay)
            for x, y in step_batches:
                loss = run["forward"](x, y)
                (loss / grad_accum).backward()
            run["optimizer"].step()
            run["model"].zero_grad(set_to_none=True)
            float(loss)
            run["steps"].append(time.perf_counter() - t0 + waited)
            run["waits"].append(waited)
    results = {}
    for variant, run in runs.items():
        timed, waits = run["steps"][args.skip_steps:], run["waits"][args.skip_steps:]
        median = statistics.median(timed)
        results[variant] = {"tokens_per_second": args.total_batch_size / median, "median_step_ms": 1000 * median,
                            "data_wait_share": sum(waits) / sum(timed),
                            "warmup_seconds": sum(run["steps"][:args.skip_steps])}
    return results


def ray_loop(args, storage: str) -> dict:
    """base_train with 1 worker on the same config; a step's time is the wall time between the
    stamps of its report and the previous step's."""
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
    walls = [b["time"] - a["time"] for a, b in zip(steps, steps[1:])]
    median = statistics.median(walls)
    inside = statistics.median(r["step_seconds"] for r in steps[1:])
    return {"tokens_per_second": args.total_batch_size / median, "median_step_ms": 1000 * median,
            "data_wait_share": sum(r["data_wait_seconds"] for r in steps[1:]) / sum(r["step_seconds"] for r in steps[1:]),
            "outside_step_share": 1 - inside / median}


def main(argv=None) -> dict:
    args = parse_args(argv)
    tokenizer = Tokenizer.from_directory(get_tokenizer_dir())
    train_files = resolve_source(args.source, args.data_dir).train_files
    config = config_from_depth(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len,
                               tokenizer.get_vocab_size(), args.window_pattern)
    with torch.device("meta"):
        flops_per_token = GPT(config).estimate_flops()
    threads = torch.get_num_threads()
    print(f"bench_train: {config}, {args.total_batch_size} tokens/step, {args.steps} steps "
          f"({args.skip_steps} untimed), {threads} torch threads, {flops_per_token:.3g} FLOP/token", flush=True)
    variants = ("eager", "compiled") if args.compile == "on" else ("eager",)

    print(f"plain loop, before the Ray run ({_load()})", flush=True)
    matmul_before = measure_matmul_flops(torch.device("cpu"), seconds=2.0)
    before = plain_loop(args, tokenizer, train_files, variants)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    print(f"base_train on Ray Train, 1 worker ({_load()})", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as storage:
        on_ray = ray_loop(args, storage)
    print(f"plain loop, after the Ray run ({_load()})", flush=True)
    after = plain_loop(args, tokenizer, train_files, ("eager",))
    matmul_flops = (matmul_before + measure_matmul_flops(torch.device("cpu"), seconds=2.0)) / 2

    results = {"plain (before)": before["eager"], "ray train, 1 worker": on_ray, "plain (after)": after["eager"]}
    if "compiled" in before:
        results["plain, torch.compile"] = before["compiled"]
    plain = (before["eager"]["tokens_per_second"] + after["eager"]["tokens_per_second"]) / 2
    print(f"\nmatmul measured here: {matmul_flops / 1e9:.1f} GFLOP/s (fp32, {threads} threads; mean of before and after)")
    print(f"{'loop':<24}{'tokens/s':>10}{'vs plain':>10}{'step ms':>9}{'data wait':>11}{'GFLOP/s':>9}{'of matmul':>11}")
    for name, r in results.items():
        achieved = flops_per_token * r["tokens_per_second"]
        print(f"{name:<24}{r['tokens_per_second']:>10,.0f}{r['tokens_per_second'] / plain:>9.3f}x"
              f"{r['median_step_ms']:>9.0f}{100 * r['data_wait_share']:>10.2f}%{achieved / 1e9:>9.2f}"
              f"{100 * achieved / matmul_flops:>10.1f}%")
    print(f"\nray / plain: {on_ray['tokens_per_second'] / plain:.3f} (target >= 0.95); "
          f"ray data wait: {100 * on_ray['data_wait_share']:.2f}% of step time (target <= 2%); "
          f"between steps (report, gauges, logging): {100 * on_ray['outside_step_share']:.2f}% of a step's wall time")
    if "compiled" in before:
        eager, compiled = before["eager"], before["compiled"]
        print(f"torch.compile on CPU, paired with eager on the same batches: "
              f"{compiled['tokens_per_second'] / eager['tokens_per_second']:.3f}x the eager tokens/s, after "
              f"{compiled['warmup_seconds']:.0f}s of warm-up steps (compilation) against {eager['warmup_seconds']:.0f}s")
    return {"matmul_flops": matmul_flops, "flops_per_token": flops_per_token, "plain_tokens_per_second": plain,
            "results": results}


if __name__ == "__main__":
    main()
