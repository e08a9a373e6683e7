"""Benchmark: the seconds of one RL weight sync (chat_rl's RolloutFleet.publish + sync), through the
object store and through the collective broadcast, for a model of a given depth (d20 by default:
896.5 M parameters, 3.6 GB of fp32 weights) on this machine's CPUs, with gloo for the collective.

    python -m ray_jobs.bench_weight_sync                  # d20, 2 rollout workers: up to ~22 GB of memory
    python -m ray_jobs.bench_weight_sync --depth 4 --repeats 2

A local Ray with the given number of RolloutWorker actors; this process stands in for the
learner's rank 0 and publishes a model's state dict (built on the meta device and given memory
without an initialisation: the values do not matter to the timing) as a new version each time.
Each path first syncs once untimed (the workers' first load; the collective builds its group
then), then `--repeats` syncs are timed and their median reported:
- object store: a CPU copy put into the store, fetched by each worker and loaded into its model
  (the store is sized for two copies of the state, so the next version is put while the last is
  still held without spilling);
- collective: the tensors broadcast in place from the learner's model into the workers' models.
Memory at d20: the learner's 3.6 GB and each worker's 3.6 GB; on the object-store path also up to
two copies in the store (the next version is put before the last is let go) and one on its way
into each worker: about 22 GB at the peak with 2 workers (`--workers 1`: about 15 GB). The
collective path needs no more than the models. Run it on a quiet machine. On GPUs the
collective runs over NCCL and skips the host memory altogether; this measures the CPU stand-in.

It ends with `RESULT <name> <value> target <op> <number> PASS|FAIL` (ray_jobs.bench_results): the
collective's sync seconds at most the object store's at the same depth.
"""

import argparse
import statistics
import time

import ray
import torch

from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import Tokenizer
from ray_jobs.bench_results import result_line
from ray_jobs.chat_rl import RolloutFleet

# The tokenizer a worker's Engine needs (nothing is sampled here): the smallest one there is.
TOKENIZER_TEXT = ["weights go from the learner to the rollout workers " * 8]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=20, help="model depth (the single complexity dial)")
    p.add_argument("--vocab-size", type=int, default=32768, help="the model's vocabulary (the project's: 32768)")
    p.add_argument("--workers", type=int, default=2, help="rollout workers")
    p.add_argument("--repeats", type=int, default=3, help="timed syncs per path")
    p.add_argument("--timeout-s", type=float, default=600.0, help="the collective's timeout")
    args = p.parse_args(argv)
    for name in ("depth", "vocab_size", "workers", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def build_learner_model(depth: int, vocab_size: int) -> GPT:
    with torch.device("meta"):
        model = GPT(config_from_depth(depth, vocab_size=vocab_size, sequence_len=256))
    return model.to_empty(device="cpu")


def time_syncs(fleet: RolloutFleet, model: GPT, repeats: int) -> tuple[float, list[float]]:
    """(untimed-first sync seconds, timed sync seconds): publish + sync of versions 1..repeats+1."""
    seconds = []
    for version in range(1, repeats + 2):
        started = time.perf_counter()
        fleet.publish(model.state_dict(), version)
        fleet.sync()
        seconds.append(time.perf_counter() - started)
    versions = ray.get([slot.actor.held_version.remote() for slot in fleet.slots])
    if versions != [repeats + 1] * len(fleet.slots):
        raise RuntimeError(f"the workers hold versions {versions} after the syncs, not {repeats + 1}")
    return seconds[0], seconds[1:]


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = build_learner_model(args.depth, args.vocab_size)
    parameters = sum(p.numel() for p in model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"d{args.depth}: {parameters / 1e6:,.1f} M parameters, {state_bytes / 2**30:.2f} GiB of weights, "
          f"{args.workers} rollout workers", flush=True)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=args.workers, object_store_memory=max(2 * state_bytes + 2**28, 2**29),
                 include_dashboard=False, log_to_driver=False)
    shared = ray.put({"tokenizer": Tokenizer.train_from_iterator(iter(TOKENIZER_TEXT), 300), "tasks": {}})
    worker_args = (model.config_dict(), shared, {"max_new_tokens": 1, "temperature": 1.0, "top_k": None})
    results = {}
    try:
        for path in ("object-store", "collective"):
            fleet = RolloutFleet(args.workers, worker_args, num_cpus=1.0 / args.workers, num_gpus=0,
                                 weight_sync=path, sync_timeout_s=args.timeout_s)
            try:
                first, timed = time_syncs(fleet, model, args.repeats)
            finally:
                fleet.stop()
                del fleet  # the workers' models and the published copy go before the next path's
            results[path] = {"first_seconds": first, "sync_seconds": statistics.median(timed)}
    finally:
        if started_ray:
            ray.shutdown()

    print(f"\n{'path':<14} {'first sync s':>12} {'sync s (median)':>16} {'GB/s per worker':>16}")
    print("-" * 61)
    for path, figures in results.items():
        print(f"{path:<14} {figures['first_seconds']:>12.2f} {figures['sync_seconds']:>16.2f} "
              f"{state_bytes / 1e9 / figures['sync_seconds']:>16.2f}")
    print(result_line(f"weight_sync_collective_seconds_d{args.depth}", results["collective"]["sync_seconds"], "<=",
                      round(results["object-store"]["sync_seconds"], 3)))
    return {"parameters": parameters, "state_bytes": state_bytes, **results}


if __name__ == "__main__":
    main()
