"""Fetch pretraining shards as Ray tasks, or build the offline sample.

    python -m ray_jobs.download_data --source fineweb-edu -n 240 [--data-dir PATH] [--num-workers N]
    python -m ray_jobs.download_data --source climbmix -n 170
    python -m ray_jobs.download_data --source sample [--max-bytes 4000000]

Each shard is one Ray task, spread over the cluster's nodes, so on a cluster every node fetches
its share. The data dir must therefore be a path that all nodes see (an NFS mount under
NANOCHAT_BASE_DIR); on one machine any folder works. Shards already present are skipped, and
an interrupted run resumes each unfinished shard where it stopped (see
nanochat.dataset.download_shard). Besides the first -n training shards, the dataset's last shard
is always fetched too: it is the validation split, the same one every run evaluates on.
"""

import argparse
import os
import time

import ray

from nanochat.dataset import (HF_DATASETS, build_sample_shards, default_data_dir, download_shard,
                              shard_filename)
from nanochat.report import Report

DEFAULT_NUM_TRAIN_SHARDS = 8


@ray.remote(num_cpus=0.1, max_retries=3, scheduling_strategy="SPREAD")
def download_shard_task(index: int, dataset: str, dest_dir: str, base_url: str | None,
                        retries: int) -> tuple[int, str, int, str]:
    """One shard on whichever node Ray picks. download_shard retries network errors itself;
    max_retries covers a worker or node that dies mid-download (the retry resumes the .part).
    Returns (index, path, bytes, node ip) for the progress line."""
    path = download_shard(index, dataset, dest_dir, base_url=base_url, retries=retries)
    return index, path, os.path.getsize(path), ray.util.get_node_ip_address()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download pretraining shards from Hugging Face as Ray tasks, or build the offline "
                    "sample. The dataset's last shard (the validation split) is always downloaded "
                    "in addition to the -n training shards.")
    parser.add_argument("--source", choices=[*HF_DATASETS, "sample"], default="fineweb-edu",
                        help="fineweb-edu (FineWeb-Edu-100B shuffle), climbmix (ClimbMix-400B) or "
                             "sample (built offline from docstrings) (default: fineweb-edu)")
    parser.add_argument("-n", "--num-shards", type=int, default=DEFAULT_NUM_TRAIN_SHARDS,
                        help="number of training shards, counted from shard 0; -1 for all; the "
                             f"validation shard comes on top (default: {DEFAULT_NUM_TRAIN_SHARDS})")
    parser.add_argument("--data-dir", default=None,
                        help="destination folder, visible to every node on a cluster "
                             "(default: <NANOCHAT_BASE_DIR>/base_data/<source>)")
    parser.add_argument("--num-workers", type=int, default=8,
                        help="downloads in flight at once across the cluster (default: 8)")
    parser.add_argument("--retries", type=int, default=5,
                        help="retries per shard after a failed attempt, with exponential backoff (default: 5)")
    parser.add_argument("--base-url", default=None,
                        help="fetch from this URL instead of Hugging Face (a mirror); shard files are "
                             "<base-url>/shard_00000.parquet ...")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="--source sample only: cap on the sample's text in bytes (default: all)")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error(f"--num-workers must be at least 1, not {args.num_workers}")
    if args.num_shards == 0 or args.num_shards < -1:
        parser.error(f"-n/--num-shards must be a positive number of shards or -1 for all, not {args.num_shards}")
    if args.retries < 0:
        parser.error(f"--retries must be 0 or more, not {args.retries}")
    if args.max_bytes is not None and args.source != "sample":
        parser.error("--max-bytes applies to --source sample only")
    return args


def shard_indices(dataset_name: str, num_train_shards: int) -> list[int]:
    """The first num_train_shards (-1: all) training shards plus the validation shard."""
    dataset = HF_DATASETS[dataset_name]
    available = dataset.val_index  # shards 0 .. val_index-1 are training shards
    count = available if num_train_shards == -1 else min(num_train_shards, available)
    return [*range(count), dataset.val_index]


def download_all(indices: list[int], dataset: str, dest_dir: str, base_url: str | None,
                 num_workers: int, retries: int) -> tuple[list[str], list[str]]:
    """Run the downloads with at most num_workers in flight; returns (paths, failure messages)."""
    pending = list(indices)
    in_flight: dict[ray.ObjectRef, int] = {}
    paths, failures = [], []
    started, done, total_bytes = time.time(), 0, 0
    while pending or in_flight:
        while pending and len(in_flight) < num_workers:
            index = pending.pop(0)
            ref = download_shard_task.remote(index, dataset, dest_dir, base_url, retries)
            in_flight[ref] = index
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        index = in_flight.pop(ready[0])
        done += 1
        try:
            _, path, size, node = ray.get(ready[0])
        except Exception as e:  # one failed shard must not stop the others; all are listed at the end
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None else e
            failures.append(f"{shard_filename(index)}: {cause}")
            print(f"[{done}/{len(indices)}] {shard_filename(index)} FAILED: {cause}", flush=True)
            continue
        paths.append(path)
        total_bytes += size
        elapsed = time.time() - started
        print(f"[{done}/{len(indices)}] {os.path.basename(path)} {size / 1e6:.1f} MB on {node} | "
              f"{total_bytes / 1e6 / max(elapsed, 1e-9):.1f} MB/s | {elapsed:.0f}s", flush=True)
    return sorted(paths), failures


def main(argv: list[str] | None = None) -> list[str]:
    """Run the job; returns the paths of the shards now present (for tests)."""
    args = parse_args(argv)
    dest_dir = os.path.abspath(args.data_dir or default_data_dir(args.source))
    print("download_data config:")
    for key, value in {**vars(args), "data_dir": dest_dir}.items():
        print(f"  {key}: {value}")

    if args.source == "sample":
        paths = build_sample_shards(dest_dir, args.max_bytes)
        log_report(args, dest_dir, paths)
        return paths

    indices = shard_indices(args.source, args.num_shards)
    present = {i for i in indices if os.path.exists(os.path.join(dest_dir, shard_filename(i)))}
    missing = [i for i in indices if i not in present]
    print(f"{len(indices)} shards wanted ({len(indices) - 1} train + validation shard "
          f"{shard_filename(indices[-1])}), {len(present)} already present, {len(missing)} to download",
          flush=True)
    os.makedirs(dest_dir, exist_ok=True)
    if not ray.is_initialized():
        ray.init()
    fetched, failures = download_all(missing, args.source, dest_dir, args.base_url,
                                     args.num_workers, args.retries)
    if failures:
        raise SystemExit(f"{len(failures)} of {len(missing)} shards failed (run again to resume):\n  "
                         + "\n  ".join(failures))
    paths = sorted(fetched + [os.path.join(dest_dir, shard_filename(i)) for i in sorted(present)])
    print(f"done: {len(paths)} shards in {dest_dir}", flush=True)
    log_report(args, dest_dir, paths)
    return paths


def log_report(args: argparse.Namespace, dest_dir: str, paths: list[str]) -> None:
    """The data section of the report card: what was fetched and how much of it is on disk."""
    Report().log_stage("data", config={**vars(args), "data_dir": dest_dir},
                       metrics={"shards": len(paths), "bytes_on_disk": sum(os.path.getsize(p) for p in paths)})


if __name__ == "__main__":
    main()
