"""Benchmark: what pretraining on Ray Train costs against a plain PyTorch loop on the same machine,
and how the plain loop over our core compares with the reference nanochat's own base_train.

    python -m ray_jobs.bench_train                          # depth 4, T=256, 4096 tokens/step: ~6 min
    python -m ray_jobs.bench_train --reference /path/to/karpathy-nanochat --reference-python /venv/bin/python

One run measures, on the same model config and the same data (the `sample` source by default):

- (a) a plain single-process loop over the nanochat core: GPT + MuonAdamW + the trainer's default
  schedule, batches packed in the same process (base_eval.packed_batches), no Ray anywhere. It
  steps a torch.compile'd copy and an eager copy in turn, on the same batches, so both see the
  same machine load; it runs before AND after the Ray runs (after shutting down the local Ray
  cluster that bench_train started, so that neither pass shares the CPUs with Ray's idle
  processes), and the ratios use the mean;
- (b) ray_jobs.base_train through Ray Train with 1 worker, compiled (what users run) and eager:
  the Ray Data stream, the reports, gauges and the progress line included. Its step time is the
  wall time between the stamps of consecutive steps in the run's history, so everything between
  two steps counts;
- (b') the plain loop (compiled, or eager with --compile off) as a task of the same local Ray
  cluster once the Ray Train runs are over: the cluster's own processes (each Ray worker process
  wakes every 10 ms, measured with strace on Ray 2.60) cost the loop this much, and Ray Train
  and Ray Data the rest;
- during (b), compiled, a census of this machine's CPU (ray_jobs/process_cpu.py, a snapshot of
  every process's CPU time every 2 s) over the timed steps: the train worker, the other Ray
  worker processes (Ray Train's and Ray Data's actors, the stream's tasks, the idle pooled
  workers) and Ray's daemons by name, the driver, and the processes that are not Ray's; the share
  of the machine that Ray's processes took besides the train worker is what a Ray loop loses
  before anything of its own runs slower;
- (c) with --reference, the reference's scripts.base_train on the same shards, tokenizer and
  settings (its own venv through --reference-python), run as a subprocess between the two plain
  passes; its step time is the median of the `dt` it prints.

`--stand-in 100,500` measures instead what the Ray layer adds to a step at GPU step rates, which
this machine cannot reach with a real model: base_train runs with a sleep of that many ms in place
of the forward, backward and optimizer step (`--stand-in-step-ms`), at T=2048 with a checkpoint
every `--save-every` steps, and the time between steps beyond the sleep is split into fetching the
batch, gauges and progress line, reports to Ray Train, checkpoints and the rest. Target: at most
1% of a 500 ms step (about a d20 step on 8xH100).

It prints one table: tokens/s of each, ratios against the plain loop, the share of step time
spent waiting for data, and the achieved FLOP/s (GPT.estimate_flops per token) against the FLOP/s
of a plain fp32 matmul measured here with as many threads. Rates come from the median step time
after `--skip-steps` warm-up steps (allocator, thread pools, compilation): the machines here are
shared, and a median ignores the steps another process slowed down. The load average is printed
with every phase. The run ends with one `RESULT <name> <value> target <op> <number> PASS|FAIL`
line per target.
"""

import argparse
import contextlib
import itertools
import math
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time

import ray
import torch

from nanochat.dataset import resolve_source
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import Tokenizer, compute_token_bytes, get_tokenizer_dir
from nanochat.training import REFERENCE_BATCH_TOKENS, lr_multiplier, muon_momentum, weight_decay_at
from ray_jobs import base_train, process_cpu
from ray_jobs.base_eval import packed_batches
from ray_jobs.bench_results import result_line
from ray_jobs.train_common import maybe_compile, measure_matmul_flops


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Plain PyTorch loop vs base_train on Ray Train (1 worker), "
                                            "optionally vs the reference nanochat")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument("--total-batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per loop, warm-up included")
    p.add_argument("--skip-steps", type=int, default=8, help="warm-up steps left out of the timing")
    p.add_argument("--source", default="sample")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--compile", choices=["on", "off"], default="on",
                   help="on: the compiled loops are the main comparison, eager a second line; off: eager only")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="a checkout of karpathy/nanochat to run on the same data and settings")
    p.add_argument("--reference-python", default=None, metavar="PYTHON",
                   help="the interpreter of the reference's environment (default: this one)")
    p.add_argument("--stand-in", default=None, metavar="MS[,MS...]",
                   help="instead of the comparison: base_train with a sleep of MS ms in place of the model step, "
                        "T=2048, a checkpoint every --save-every steps; reports what Ray adds per step")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint interval of the --stand-in runs")
    args = p.parse_args(argv)
    if args.steps <= args.skip_steps + 2:
        p.error(f"--steps ({args.steps}) must exceed --skip-steps ({args.skip_steps}) by at least 3")
    if args.total_batch_size % (args.device_batch_size * args.max_seq_len):
        p.error("--total-batch-size must be a multiple of --device-batch-size * --max-seq-len")
    if args.stand_in:
        try:
            args.stand_in = [float(ms) for ms in args.stand_in.split(",")]
        except ValueError:
            p.error(f"--stand-in {args.stand_in!r} must be comma-separated milliseconds, such as 100,500")
        if min(args.stand_in) <= 0:
            p.error("--stand-in times must be positive")
    if args.reference and not os.path.isfile(os.path.join(args.reference, "scripts", "base_train.py")):
        p.error(f"--reference {args.reference} is not a nanochat checkout (no scripts/base_train.py in it)")
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
        forward = maybe_compile(model, optimizer, "on" if variant == "compiled" else "off", torch.device("cpu"))
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


def ray_loop(args, storage: str, compile_mode: str, census: bool) -> dict:
    """base_train with 1 worker on the same config; a step's time is the wall time between the
    stamps of its record and the previous step's in the run's history. With `census`, also the
    CPU census of its timed steps ("cpu", None without)."""
    flags = ["--depth", str(args.depth), "--aspect-ratio", str(args.aspect_ratio), "--head-dim", str(args.head_dim),
             "--max-seq-len", str(args.max_seq_len), "--window-pattern", args.window_pattern,
             "--device-batch-size", str(args.device_batch_size), "--total-batch-size", str(args.total_batch_size),
             "--num-iterations", str(args.steps), "--num-workers", "1", "--source", args.source,
             "--eval-every", "-1", "--eval-tokens", str(args.device_batch_size * args.max_seq_len),
             "--sample-every", "-1", "--compile", compile_mode, "--storage-path", storage,
             "--run-name", f"bench_{compile_mode}", "--model-tag", "bench"]
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    sampler = process_cpu.CPUSampler(main=process_cpu.TRAIN_WORKER_MAIN) if census else None
    with sampler or contextlib.nullcontext():
        result = base_train.main(flags)
    steps = [r for r in result["history"] if "loss" in r][args.skip_steps:]
    walls = [b["time"] - a["time"] for a, b in zip(steps, steps[1:])]
    median = statistics.median(walls)
    inside = statistics.median(r["step_seconds"] for r in steps[1:])
    return {"tokens_per_second": args.total_batch_size / median, "median_step_ms": 1000 * median,
            "data_wait_share": sum(r["data_wait_seconds"] for r in steps[1:]) / sum(r["step_seconds"] for r in steps[1:]),
            "outside_step_share": 1 - inside / median,
            "cpu": process_cpu.census_or_none(sampler, steps[0]["time"], steps[-1]["time"], "this run") if census else None}


def print_cpu_census(variant: str, census: process_cpu.Census) -> None:
    """Where this machine's CPU went during the timed steps of a Ray Train run (process_cpu.report_lines)."""
    print()
    print("\n".join(process_cpu.report_lines(census, f"CPU during the timed steps of base_train on Ray Train ({variant})")))
    print(f"a loop that lost exactly that share would run at {1 - process_cpu.ray_share(census):.3f}x of its "
          f"speed without Ray")


def plain_loop_on_ray(args, tokenizer: Tokenizer, train_files: list[str], threads: int, variant: str) -> dict:
    """The plain loop run as a Ray task (a worker process of the local cluster, at Ray's worker
    niceness like a Ray Train worker, with as many torch threads as the driver), while the cluster
    runs nothing else: what the cluster's own processes cost the loop, apart from what Ray Train
    and Ray Data add."""

    @ray.remote(num_cpus=1)
    def run() -> dict:
        torch.set_num_threads(threads)
        return plain_loop(args, tokenizer, train_files, (variant,))[variant]

    return ray.get(run.remote())


def reference_base_dir(folder: str, tokenizer: Tokenizer, train_files: list[str], val_files: list[str]) -> str:
    """A NANOCHAT_BASE_DIR for the reference holding our shards (linked, same order, the last one
    validation) under the name its current loader reads, and our tokenizer in its format (a pickled
    tiktoken Encoding with the same merges) with the token byte lengths."""
    data_dir = os.path.join(folder, "base_data_climbmix")
    tokenizer_dir = os.path.join(folder, "tokenizer")
    os.makedirs(data_dir)
    os.makedirs(tokenizer_dir)
    for index, path in enumerate(train_files + val_files[-1:]):
        os.symlink(os.path.abspath(path), os.path.join(data_dir, f"shard_{index:05d}.parquet"))
    with open(os.path.join(tokenizer_dir, "tokenizer.pkl"), "wb") as f:
        pickle.dump(tokenizer.encoding, f)
    torch.save(compute_token_bytes(tokenizer), os.path.join(tokenizer_dir, "token_bytes.pt"))
    return folder


def reference_loop(args, tokenizer: Tokenizer, train_files: list[str], val_files: list[str]) -> dict:
    """The reference's base_train on the same settings, fp32 on CPU; its step time is the median
    of the `dt` of the steps after --skip-steps."""
    with tempfile.TemporaryDirectory(prefix="bench_train_reference_") as folder:
        env = {**os.environ, "NANOCHAT_BASE_DIR": reference_base_dir(folder, tokenizer, train_files, val_files),
               "NANOCHAT_DTYPE": "float32", "PYTHONPATH": os.path.abspath(args.reference)}
        command = [args.reference_python or sys.executable, "-m", "scripts.base_train", "--device-type=cpu",
                   f"--depth={args.depth}", f"--aspect-ratio={args.aspect_ratio}", f"--head-dim={args.head_dim}",
                   f"--max-seq-len={args.max_seq_len}", f"--window-pattern={args.window_pattern}",
                   f"--device-batch-size={args.device_batch_size}", f"--total-batch-size={args.total_batch_size}",
                   f"--num-iterations={args.steps}", "--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1"]
        run = subprocess.run(command, cwd=args.reference, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"the reference's base_train failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    step_ms = [float(ms) for ms in re.findall(r"dt: ([0-9.]+)ms", run.stdout)][args.skip_steps:]
    if len(step_ms) < 3:
        raise RuntimeError(f"the reference's base_train printed {len(step_ms)} timed steps; its output ends:\n"
                           f"{run.stdout[-2000:]}")
    median = statistics.median(step_ms) / 1000
    return {"tokens_per_second": args.total_batch_size / median, "median_step_ms": 1000 * median,
            "data_wait_share": float("nan")}


STAND_IN_SEQ_LEN = 2048  # the context of the GPU presets: what a worker fetches per row
STAND_IN_TARGET_PERCENT = 1.0  # Ray's share of a 500 ms step (about a d20 step on 8xH100)


def stand_in_loop(args, storage: str, step_ms: float) -> dict:
    """base_train (1 worker, T=2048) with a `step_ms` sleep in place of the model step: every
    other part of a step is the real one. Returns the per-step time Ray adds, in seconds, in all
    and by part: fetching the batch from the stream, gauges and progress line, reports to Ray
    Train, checkpoints (their stall spread over the steps), and the rest of the loop."""
    steps = max(30, round(15000 / step_ms))
    rows = 4
    flags = ["--depth", "2", "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", str(STAND_IN_SEQ_LEN),
             "--window-pattern", "L", "--device-batch-size", str(rows), "--total-batch-size",
             str(rows * STAND_IN_SEQ_LEN), "--num-iterations", str(steps), "--num-workers", "1",
             "--source", args.source, "--eval-every", "-1", "--eval-tokens", str(rows * STAND_IN_SEQ_LEN),
             "--sample-every", "-1", "--compile", "off", "--storage-path", storage, "--save-every",
             str(args.save_every), "--run-name", f"stand_in_{step_ms:g}", "--model-tag", "bench",
             "--stand-in-step-ms", str(step_ms)]
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    history = base_train.main(flags)["history"]
    first = args.skip_steps
    timed = [r for r in history if "loss" in r and r["step"] > first]
    previous = next(r for r in history if "loss" in r and r["step"] == first)
    walls = [b["time"] - a["time"] for a, b in zip([previous] + timed, timed)]
    saves = [r for r in history if "checkpoint_seconds" in r and first <= r["step"] < timed[-1]["step"]]
    n = len(timed)
    parts = {"batch fetch": sum(r["data_wait_seconds"] for r in timed) / n,
             "gauges, progress line": sum(r["gauge_seconds"] for r in timed) / n,
             "ray.train.report": sum(r["report_seconds"] for r in timed) / n,
             "checkpoints": sum(r["checkpoint_seconds"] for r in saves) / n}
    total = sum(walls) / n - step_ms / 1000
    parts["rest of the loop"] = total - sum(parts.values())
    return {"total": total, "parts": parts, "steps": n, "saves": len(saves),
            "largest_save_stall": max((r["checkpoint_seconds"] for r in saves), default=0.0)}


def stand_in_main(args) -> dict:
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_stand_in_") as storage:
        for step_ms in args.stand_in:
            print(f"base_train with a {step_ms:g} ms stand-in step, T={STAND_IN_SEQ_LEN} ({_load()})", flush=True)
            results[step_ms] = stand_in_loop(args, storage, step_ms)
    for step_ms, r in results.items():
        print(f"\nwhat Ray adds to a {step_ms:g} ms step ({r['steps']} steps, {r['saves']} checkpoints every "
              f"{args.save_every} steps, the largest stalled {1000 * r['largest_save_stall']:.0f} ms):")
        for name, seconds in [*r["parts"].items(), ("in all", r["total"])]:
            print(f"  {name:<24}{1000 * seconds:>8.2f} ms{100 * seconds / (step_ms / 1000):>8.2f}%")
    for step_ms, r in results.items():
        if step_ms >= 500:  # the target is set for GPU-sized steps; shorter ones are shown for the trend
            percent = 100 * r["total"] / (step_ms / 1000)
            print(result_line(f"ray_overhead_percent_{step_ms:g}ms", percent, "<=", STAND_IN_TARGET_PERCENT))
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.stand_in:
        return stand_in_main(args)
    tokenizer = Tokenizer.from_directory(get_tokenizer_dir())
    shards = resolve_source(args.source, args.data_dir)
    config = config_from_depth(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len,
                               tokenizer.get_vocab_size(), args.window_pattern)
    with torch.device("meta"):
        flops_per_token = GPT(config).estimate_flops()
    threads = torch.get_num_threads()
    print(f"bench_train: {config}, {args.total_batch_size} tokens/step, {args.steps} steps "
          f"({args.skip_steps} untimed), {threads} torch threads, {flops_per_token:.3g} FLOP/token", flush=True)
    variants = ("compiled", "eager") if args.compile == "on" else ("eager",)

    print(f"plain loop, before the Ray runs ({_load()})", flush=True)
    matmul_before = measure_matmul_flops(torch.device("cpu"), seconds=2.0)
    before = plain_loop(args, tokenizer, shards.train_files, variants)
    reference = None
    if args.reference:
        print(f"the reference's base_train ({_load()})", flush=True)
        reference = reference_loop(args, tokenizer, shards.train_files, shards.val_files)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    on_ray = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as storage:
        for variant in variants:
            print(f"base_train on Ray Train, 1 worker, {variant} ({_load()})", flush=True)
            on_ray[variant] = ray_loop(args, storage, "on" if variant == "compiled" else "off",
                                       census=variant == variants[0])
    print(f"plain loop, {variants[0]}, as a task of the otherwise idle Ray cluster ({_load()})", flush=True)
    in_ray_task = plain_loop_on_ray(args, tokenizer, shards.train_files, threads, variants[0])
    if started_ray and not os.environ.get("RAY_ADDRESS"):
        # The plain loop runs without Ray, as before the Ray runs: the local cluster's idle
        # processes alone took 6% of a d4 step on 2 CPUs (measured), which belongs to the Ray path.
        ray.shutdown()
    print(f"plain loop, after the Ray runs ({_load()})", flush=True)
    after = plain_loop(args, tokenizer, shards.train_files, variants)
    matmul_flops = (matmul_before + measure_matmul_flops(torch.device("cpu"), seconds=2.0)) / 2

    plain = {variant: (before[variant]["tokens_per_second"] + after[variant]["tokens_per_second"]) / 2
             for variant in variants}
    rows = []
    for variant in variants:
        rows += [(f"plain {variant} (before)", before[variant], variant), (f"plain {variant} (after)", after[variant], variant),
                 (f"ray train {variant}", on_ray[variant], variant)]
    rows.append((f"plain {variants[0]} in a Ray task", in_ray_task, variants[0]))
    if reference is not None:
        rows.append(("reference base_train", reference, variants[0]))
    print(f"\nmatmul measured here: {matmul_flops / 1e9:.1f} GFLOP/s (fp32, {threads} threads; mean of before and after)")
    print(f"{'loop':<26}{'tokens/s':>10}{'vs plain':>10}{'step ms':>9}{'data wait':>11}{'GFLOP/s':>9}{'of matmul':>11}")
    for name, r, variant in rows:
        achieved = flops_per_token * r["tokens_per_second"]
        print(f"{name:<26}{r['tokens_per_second']:>10,.0f}{r['tokens_per_second'] / plain[variant]:>9.3f}x"
              f"{r['median_step_ms']:>9.0f}{100 * r['data_wait_share']:>10.2f}%{achieved / 1e9:>9.2f}"
              f"{100 * achieved / matmul_flops:>10.1f}%")
    main_variant = variants[0]
    if on_ray[main_variant]["cpu"] is not None:
        print_cpu_census(main_variant, on_ray[main_variant]["cpu"])
    print(f"\nbetween steps on Ray (reports, gauges, logging): "
          f"{100 * on_ray[main_variant]['outside_step_share']:.2f}% of a step's wall time")
    print(f"the plain loop as a task of the idle Ray cluster ran at "
          f"{in_ray_task['tokens_per_second'] / plain[main_variant]:.3f}x of its speed without Ray (the cluster's "
          f"own processes), base_train on Ray Train at "
          f"{on_ray[main_variant]['tokens_per_second'] / in_ray_task['tokens_per_second']:.3f}x of that task's "
          f"(what Ray Train and Ray Data add)")
    ratios = {f"ray_vs_plain_{variant}": on_ray[variant]["tokens_per_second"] / plain[variant] for variant in variants}
    print(result_line(f"ray_vs_plain_{main_variant}", ratios[f"ray_vs_plain_{main_variant}"], ">=", 0.95))
    print(result_line("ray_data_wait_percent", 100 * on_ray[main_variant]["data_wait_share"], "<=", 2))
    if reference is not None:
        ratios["plain_vs_reference"] = plain[main_variant] / reference["tokens_per_second"]
        print(result_line(f"plain_{main_variant}_vs_reference", ratios["plain_vs_reference"], ">=", 1.05))
        ratios["ray_vs_reference"] = on_ray[main_variant]["tokens_per_second"] / reference["tokens_per_second"]
        print(result_line(f"ray_{main_variant}_vs_reference", ratios["ray_vs_reference"], ">=", 1.0))
    return {"matmul_flops": matmul_flops, "flops_per_token": flops_per_token, "plain_tokens_per_second": plain,
            "ray": on_ray, "plain_in_ray_task": in_ray_task, "reference": reference, "ratios": ratios}


if __name__ == "__main__":
    main()
