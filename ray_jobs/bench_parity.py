"""Benchmark: model quality against the reference nanochat. Our base_train (on Ray Train, 1 worker)
and karpathy/nanochat's scripts.base_train train the same model config on the same shards and
tokenizer, with the same steps, batch and schedule, once per seed; both report val bpb on the same
validation shard at the end.

    python -m ray_jobs.bench_parity --reference /path/to/karpathy-nanochat --reference-python /venv/bin/python
    python -m ray_jobs.bench_parity --reference DIR --depths 4,8 --seeds 1,2,3 --steps 300,150

Both sides run fp32 on CPU, compiled, one after the other. The reference seeds its RNG with a
fixed 42; to give it the same seeds as ours, it runs under a launcher that makes its one
`torch.manual_seed` call use the seed asked for (nothing else of the reference changes). The
shards are the `sample` source by default (or --source/--data-dir), linked into a base directory
of the reference's layout with our tokenizer in its format (bench_train.reference_base_dir).

It prints a table of val bpb per depth and seed, and the ratio of the means (ours / reference);
the run ends with one `RESULT <name> <value> target <op> <number> PASS|FAIL` line per depth:
the mean val bpb ratio must be at most 1.00 (ours no worse than the reference).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import ray

from nanochat.dataset import resolve_source
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
from ray_jobs import base_train
from ray_jobs.bench_results import result_line
from ray_jobs.bench_train import reference_base_dir

# Runs the reference's base_train as `python -m scripts.base_train`, with every torch.manual_seed
# call seeding the given seed instead of the reference's fixed 42.
REFERENCE_SEEDED_LAUNCHER = (
    "import runpy, sys, torch\n"
    "seed = int(sys.argv.pop(1))\n"
    "seed_torch = torch.manual_seed\n"
    "torch.manual_seed = lambda _ignored: seed_torch(seed)\n"
    "sys.argv[0] = 'scripts/base_train.py'\n"
    "runpy.run_module('scripts.base_train', run_name='__main__', alter_sys=True)\n"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="val bpb of our base_train against the reference nanochat's, "
                                            "same data, config, steps and seeds")
    p.add_argument("--reference", required=True, metavar="DIR", help="a checkout of karpathy/nanochat")
    p.add_argument("--reference-python", default=None, metavar="PYTHON",
                   help="the interpreter of the reference's environment (default: this one)")
    p.add_argument("--depths", default="4,8", help="comma-separated model depths")
    p.add_argument("--steps", default="300,150", help="optimizer steps per depth (one value, or one per depth)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds; each depth runs every seed on both sides")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--window-pattern", default="SSSL")
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument("--total-batch-size", type=int, default=4096)
    p.add_argument("--eval-tokens", type=int, default=64 * 16 * 256, help="validation tokens per evaluation")
    p.add_argument("--logs", default=None, metavar="DIR", help="keep the reference's output here, a file per run")
    p.add_argument("--source", default="sample")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    try:
        args.depths = [int(d) for d in args.depths.split(",")]
        args.seeds = [int(s) for s in args.seeds.split(",")]
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        p.error("--depths, --steps and --seeds take comma-separated integers, such as 4,8")
    if len(steps) == 1:
        steps *= len(args.depths)
    if len(steps) != len(args.depths):
        p.error(f"--steps gives {len(steps)} values for {len(args.depths)} depths: give one, or one per depth")
    args.steps = dict(zip(args.depths, steps))
    if min(args.depths) < 1 or min(steps) < 1:
        p.error("depths and steps must be positive")
    if args.total_batch_size % (args.device_batch_size * args.max_seq_len):
        p.error("--total-batch-size must be a multiple of --device-batch-size * --max-seq-len")
    if not os.path.isfile(os.path.join(args.reference, "scripts", "base_train.py")):
        p.error(f"--reference {args.reference} is not a nanochat checkout (no scripts/base_train.py in it)")
    return args


def shared_flags(args, depth: int) -> list[str]:
    """The settings both trainers take under the same names."""
    return ["--depth", str(depth), "--head-dim", str(args.head_dim), "--max-seq-len", str(args.max_seq_len),
            "--window-pattern", args.window_pattern, "--device-batch-size", str(args.device_batch_size),
            "--total-batch-size", str(args.total_batch_size), "--num-iterations", str(args.steps[depth]),
            "--eval-tokens", str(args.eval_tokens), "--core-metric-every", "-1", "--sample-every", "-1"]


def ours(args, depth: int, seed: int, storage: str) -> float:
    """Our base_train's final val bpb (1 Ray Train worker, compiled)."""
    flags = shared_flags(args, depth) + [
        "--eval-every", "-1", "--seed", str(seed), "--num-workers", "1", "--compile", "on", "--source", args.source,
        "--storage-path", storage, "--run-name", f"parity_d{depth}_s{seed}", "--model-tag", f"parity_d{depth}"]
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    history = base_train.main(flags)["history"]
    return [r["val_bpb"] for r in history if "val_bpb" in r][-1]


def reference(args, base_dir: str, depth: int, seed: int) -> float:
    """The reference's final val bpb, from the `Validation bpb` line of its last step."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "NANOCHAT_DTYPE": "float32",
           "PYTHONPATH": os.path.abspath(args.reference)}
    command = [args.reference_python or sys.executable, "-c", REFERENCE_SEEDED_LAUNCHER, str(seed),
               "--device-type=cpu", "--eval-every", str(args.steps[depth]), "--model-tag", f"parity_d{depth}",
               *shared_flags(args, depth)]
    run = subprocess.run(command, cwd=args.reference, env=env, capture_output=True, text=True)
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
        with open(os.path.join(args.logs, f"reference_d{depth}_s{seed}.log"), "w") as f:
            f.write(run.stdout + run.stderr)
    if run.returncode != 0:
        raise RuntimeError(f"the reference's base_train failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    last = re.findall(rf"Step {args.steps[depth]:05d} \| Validation bpb: ([0-9.]+)", run.stdout)
    if not last:
        raise RuntimeError(f"the reference printed no val bpb for step {args.steps[depth]}; its output ends:\n"
                           f"{run.stdout[-2000:]}")
    return float(last[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    tokenizer = Tokenizer.from_directory(get_tokenizer_dir())
    shards = resolve_source(args.source, args.data_dir)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    results = {depth: {"ours": {}, "reference": {}} for depth in args.depths}
    with tempfile.TemporaryDirectory(prefix="bench_parity_") as folder:
        base_dir = reference_base_dir(os.path.join(folder, "reference"), tokenizer, shards.train_files,
                                      shards.val_files)
        for depth in args.depths:
            for seed in args.seeds:
                for side in ("ours", "reference"):
                    started = time.time()
                    bpb = (ours(args, depth, seed, os.path.join(folder, "storage")) if side == "ours"
                           else reference(args, base_dir, depth, seed))
                    results[depth][side][seed] = bpb
                    print(f"d{depth} seed {seed} {side}: val bpb {bpb:.6f} ({time.time() - started:.0f} s)", flush=True)
    print(f"\n{'depth':<7}{'steps':>6}{'seed':>6}{'ours':>11}{'reference':>11}{'ratio':>8}")
    ratios = {}
    for depth in args.depths:
        for seed in args.seeds:
            a, b = results[depth]["ours"][seed], results[depth]["reference"][seed]
            print(f"d{depth:<6}{args.steps[depth]:>6}{seed:>6}{a:>11.4f}{b:>11.4f}{a / b:>8.4f}")
        mean_ours = statistics.mean(results[depth]["ours"].values())
        mean_reference = statistics.mean(results[depth]["reference"].values())
        ratios[depth] = mean_ours / mean_reference
        print(f"d{depth:<6}{args.steps[depth]:>6}{'mean':>6}{mean_ours:>11.4f}{mean_reference:>11.4f}{ratios[depth]:>8.4f}")
    for depth in args.depths:
        print(result_line(f"parity_d{depth}_val_bpb_ratio", ratios[depth], "<=", 1.00))
    return {"results": results, "ratios": ratios}


if __name__ == "__main__":
    main()
