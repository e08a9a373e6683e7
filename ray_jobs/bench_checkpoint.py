"""Benchmark: how long a checkpoint stalls the training step, for a model of a given depth (d20 by
default: 896.5 M parameters) with its MuonAdamW state, on this machine's CPU and disk.

    python -m ray_jobs.bench_checkpoint                  # d20: about 9 GB of state, ~18 GB of memory
    python -m ray_jobs.bench_checkpoint --depth 12

Two ways of saving the same state, in nanochat.checkpoint's layout (meta last, atomic files):
- `in the step`: save_checkpoint from the live state, as trainers saved before the Checkpointer;
  the step waits for the whole write (torch.save, sha256 of every file, fsync);
- `background`: what ray_jobs.train_common.Checkpointer does: the step waits only for a copy of
  the state into host memory (host_copy), and a thread (BackgroundSave) writes the copy. The
  first save allocates the host copy; every later one fills it again (no page faults), and its
  stall is the one a run pays at each checkpoint. The table gives the stall and the seconds
  until the files are durable.

Ray Train's upload of the folder to storage runs in its own thread in both cases and is not
timed. The model is built on the meta device and given memory without an initialisation, and
one optimizer step on zero gradients creates the optimizer state, so building costs little; the
values do not matter to the timing. One rank saves the whole state here, as a single worker
does; on more ranks the one that writes the weights has the most to copy. On a GPU the copy to
host memory runs at the rate of the host link rather than memcpy's. It ends with
`RESULT <name> <value> target <op> <number> PASS|FAIL` (ray_jobs.bench_results): the stall of a
later background save at most STALL_TARGET_SECONDS.
"""

import argparse
import os
import shutil
import tempfile
import time

import torch

from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, config_from_depth
from ray_jobs.bench_results import result_line
from ray_jobs.train_common import BackgroundSave, host_copy

# The bar: more than a second or two of stall per checkpoint is worth taking off the step.
STALL_TARGET_SECONDS = 2.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=20, help="model depth (the single complexity dial)")
    p.add_argument("--folder", default=None, help="where to write (default: a temp dir, removed at the end)")
    args = p.parse_args(argv)
    if args.depth < 1:
        p.error("--depth must be at least 1")
    return args


def build_state(depth: int) -> tuple[GPT, torch.optim.Optimizer]:
    """A model of `depth` on the CPU with its optimizer state created (one step on zero grads)."""
    with torch.device("meta"):
        model = GPT(config_from_depth(depth))
    model.to_empty(device="cpu")
    optimizer = model.setup_optimizer()
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return model, optimizer


def state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value) for value in state)
    return 0


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    model, optimizer = build_state(args.depth)
    parameters = sum(p.numel() for p in model.parameters())
    total = state_bytes(model.state_dict()) + state_bytes(optimizer.state_dict())
    print(f"d{args.depth}: {parameters / 1e6:,.1f} M parameters, {total / 2**30:.2f} GiB of model and optimizer "
          f"state, built in {time.perf_counter() - started:.0f}s", flush=True)
    meta = {"model_config": model.config_dict()}
    root = args.folder or tempfile.mkdtemp(prefix="bench_checkpoint_")
    try:
        in_step = os.path.join(root, "in_step")
        started = time.perf_counter()
        save_checkpoint(in_step, 1, model.state_dict(), meta, optimizer_state=optimizer.state_dict())
        sync_seconds = time.perf_counter() - started
        shutil.rmtree(in_step)

        background = []  # (stall, durable after) of the first save, then of one that reuses its copies
        copies = (None, None)
        for step in (2, 3):
            started = time.perf_counter()
            copies = (host_copy(model.state_dict(), copies[0]), host_copy(optimizer.state_dict(), copies[1]))
            write = BackgroundSave(step, *copies, dict(meta), rank=0, world=1, tokenizer_dir=None)
            stall = time.perf_counter() - started
            shutil.rmtree(write.wait())
            background.append((stall, time.perf_counter() - started))
    finally:
        if not args.folder:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'save':<30} {'step stall s':>12} {'durable after s':>15}")
    print("-" * 59)
    print(f"{'in the step':<30} {sync_seconds:>12.2f} {sync_seconds:>15.2f}")
    print(f"{'background, first save':<30} {background[0][0]:>12.2f} {background[0][1]:>15.2f}")
    print(f"{'background, every later save':<30} {background[1][0]:>12.2f} {background[1][1]:>15.2f}")
    print(result_line(f"checkpoint_stall_seconds_d{args.depth}", background[1][0], "<=", STALL_TARGET_SECONDS))
    return {"parameters": parameters, "state_bytes": total, "in_step_seconds": sync_seconds,
            "first_stall_seconds": background[0][0], "first_durable_seconds": background[0][1],
            "background_stall_seconds": background[1][0], "background_durable_seconds": background[1][1]}


if __name__ == "__main__":
    main()
