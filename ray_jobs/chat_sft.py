"""Supervised fine-tuning on Ray Train: a base checkpoint learns to chat (and to use its tool).

    ray job submit --working-dir . -- python -m ray_jobs.chat_sft --model-tag d20 --mixture real

Each worker loads the base weights, renders its share of a task mixture into (ids, mask) with
the checkpoint's tokenizer (mask 1 only on what the assistant writes), packs the conversations
into rows best-fit without cropping (padding masked out: nanochat.chat_packing), and trains with
the distributed MuonAdamW. The recipe is nanochat's: batch size and learning rates default to
the base run's flags (its base rates, without base_train's sqrt(batch / 2**19) scaling: a tiny
base model is fine-tuned at the rates it was given), the rates start at --init-lr-frac of them
and decay to zero over the last --warmdown-ratio of the steps, Muon's momentum rises from 0.85 to
0.95 over the first 300 steps, and the optimizer starts from the base run's state (momentum
buffers and Adam moments; --load-optimizer) when the base checkpoint has its shards for this
many workers, else fresh with a line that says why. It shares base_train's
machinery (ray_jobs.train_common): checkpoints through ray.train.report, --resume, failure
restarts, metrics gauges and the one-line-per-step progress. Validation loss (mean cross-entropy
per assistant token of the mixture's validation split, packed once on the driver) is measured
every --eval-every steps. The final model goes to <base>/chatsft_checkpoints/<model_tag>/ and the
stage is recorded in the report card.

`--mixture real` is nanochat's (SmolTalk, the MMLU auxiliary train set 3 times, GSM8K 4 times;
validated on SmolTalk's test split, the first 5200 MMLU test questions and the first 420 GSM8K
test problems); `--mixture seed` is the seed's own (SmolTalk, MMLU once, GSM8K twice, 80K
SpellingBee words, identity twice), which also teaches spelling and who the model is;
`--mixture offline` needs no network (arithmetic word problems, SpellingBee, identity, and
conversations of several of those in a row, so that the model holds a chat of many turns).
A resumed or restarted run replays the (deterministic) stream of its rank up to the checkpoint's
step, so it sees the same batches an uninterrupted run would.
"""

import argparse
import itertools
import math
import os
import sys
import time

import numpy as np
import ray
import ray.train
import torch

from nanochat.chat_packing import pack_conversations
from nanochat.checkpoint import CheckpointError, checkpoint_dir, find_largest_model, find_last_step, load_checkpoint
from nanochat.common import print0
from nanochat.files import get_base_dir
from nanochat.report import Report
from nanochat.tasks import TaskMixture, get_task
from nanochat.tokenizer import Tokenizer
from nanochat.training import lr_multiplier, muon_momentum
from ray_jobs.gpus import resolve_use_gpu
from ray_jobs.train_common import (Checkpointer, ProgressLine, Stopwatch, TrainMetrics, add_run_flags, all_reduce,
                                   build_model, device_peak_flops, export_final_model, fit_trainer,
                                   latest_run_checkpoint_meta, maybe_compile, previous_run, report_step,
                                   restore_from_checkpoint, start_worker)

# (task name, split, keyword arguments, copies): copies > 1 oversample small sets.
MIXTURES = {
    "offline": {
        "train": [("arithmetic", "train", {"size": 4000}, 1), ("spellingbee", "train", {"size": 2000}, 1),
                  ("identity", "train", {}, 4), ("multiturn", "train", {"size": 1000}, 1)],
        "val": [("arithmetic", "test", {"size": 200}, 1), ("spellingbee", "test", {"size": 200}, 1),
                ("multiturn", "test", {"size": 50}, 1)],
    },
    "real": {
        "train": [("smoltalk", "train", {}, 1), ("mmlu", "train", {}, 3), ("gsm8k", "train", {}, 4)],
        "val": [("smoltalk", "test", {}, 1), ("mmlu", "test", {"stop": 5200}, 1), ("gsm8k", "test", {"stop": 420}, 1)],
    },
    "seed": {
        "train": [("smoltalk", "train", {}, 1), ("mmlu", "train", {}, 1), ("gsm8k", "train", {}, 2),
                  ("spellingbee", "train", {"size": 80000}, 1), ("identity", "train", {}, 2)],
        "val": [("smoltalk", "test", {}, 1), ("mmlu", "test", {"stop": 2000}, 1), ("gsm8k", "test", {"stop": 500}, 1)],
    },
}
# The learning rates a flag left at None takes from the base run (its meta's user_config).
INHERITED_LRS = ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")
# Muon's momentum during SFT: from 0.85 (training.muon_momentum's start) to this over these steps.
SFT_MUON_MOMENTUM = 0.95
SFT_MUON_MOMENTUM_WARMUP_STEPS = 300


def build_mixture(name: str, split: str) -> TaskMixture:
    if name not in MIXTURES:
        raise ValueError(f"unknown mixture {name!r}: choose one of {', '.join(MIXTURES)}")
    tasks = []
    for task_name, task_split, kwargs, copies in MIXTURES[name][split]:
        tasks.extend([get_task(task_name, task_split, **kwargs)] * copies)
    return TaskMixture(tasks)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Supervised fine-tuning of a base checkpoint with Ray Train")
    p.add_argument("--model-tag", default=None, help="base model to start from (default: the largest)")
    p.add_argument("--step", type=int, default=None, help="base checkpoint step (default: the last)")
    p.add_argument("--mixture", choices=sorted(MIXTURES), default="real")
    # horizon and batch (-1 = inherit from the base run)
    p.add_argument("--num-epochs", type=float, default=1.0, help="passes over the mixture (sets the horizon)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps; overrides --num-epochs")
    p.add_argument("--max-seq-len", type=int, default=-1, help="row length; -1 = the base model's context")
    p.add_argument("--device-batch-size", type=int, default=-1, help="rows per worker per micro-step; -1 = base run's")
    p.add_argument("--total-batch-size", type=int, default=-1,
                   help="tokens per step (a multiple of rows x row length x workers); -1 = base run's")
    # optimisation (None = the base run's flag, unscaled by the batch as in nanochat; the AdamW
    # rates are scaled by 1/sqrt(width / 768) in setup_optimizer)
    p.add_argument("--embedding-lr", type=float, default=None)
    p.add_argument("--unembedding-lr", type=float, default=None)
    p.add_argument("--matrix-lr", type=float, default=None)
    p.add_argument("--scalar-lr", type=float, default=None)
    p.add_argument("--init-lr-frac", type=float, default=0.8, help="start at this fraction of the learning rates")
    p.add_argument("--warmdown-ratio", type=float, default=0.5, help="share of the steps that decay the LR to 0")
    p.add_argument("--load-optimizer", type=int, choices=[0, 1], default=1,
                   help="1: start from the base checkpoint's optimizer state (momentum buffers, Adam moments) "
                        "when it has one for this many workers; 0: a fresh optimizer")
    p.add_argument("--seed", type=int, default=42)
    # evaluation
    p.add_argument("--eval-every", type=int, default=100, help="val loss every N steps (-1 = only at the end)")
    p.add_argument("--eval-tokens", type=int, default=2 ** 20, help="tokens (rows x row length) per val loss")
    # Ray
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (one per GPU)")
    p.add_argument("--cpus-per-worker", type=float, default=-1.0,
                   help="CPUs per CPU-only train worker; -1 = the cluster's CPUs shared out, at most 1 each")
    add_run_flags(p, "sft")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the model (auto = on CUDA, and on CPU when a C++ compiler is installed)")
    p.add_argument("--fail-at-step", type=int, default=-1, help=argparse.SUPPRESS)  # fault injection for tests
    args = p.parse_args(argv)
    for name in ("num_workers", "keep_last", "eval_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.num_epochs <= 0:
        p.error(f"--num-epochs must be positive, got {args.num_epochs}")
    for name in ("init_lr_frac", "warmdown_ratio"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}")
    return args


def _render(task, tokenizer: Tokenizer, max_tokens: int, indices):
    for index in indices:
        yield tokenizer.render_conversation(task[index], max_tokens=max_tokens)


def _train_batches(task, tokenizer: Tokenizer, row_len: int, batch_size: int, rank: int, world: int,
                   device: torch.device):
    """Endless (inputs, targets) batches of this rank's conversations (every world-th one),
    packed into rows, epoch after epoch in the mixture's fixed order."""
    pad = tokenizer.get_bos_token_id()
    while True:
        rows = pack_conversations(_render(task, tokenizer, row_len, range(rank, len(task), world)), row_len, pad)
        for batch_index in itertools.count():
            batch = [row for _, row in zip(range(batch_size), rows)]
            if len(batch) < batch_size:  # the epoch's last, partial batch is dropped
                if batch_index == 0:
                    raise ValueError(f"rank {rank}'s share of the mixture packs into {len(batch)} rows, fewer than "
                                     f"one batch of {batch_size}: lower --device-batch-size")
                break
            inputs, targets = zip(*batch)
            yield (torch.from_numpy(np.stack(inputs)).to(device), torch.from_numpy(np.stack(targets)).to(device))


def validation_rows(task, tokenizer: Tokenizer, row_len: int, max_rows: int) -> np.ndarray:
    """The packed validation split, at most `max_rows` rows: int64 (rows, 2, row_len - 1), inputs
    then targets. Packed once on the driver and shared with the workers through the object store."""
    rows = pack_conversations(_render(task, tokenizer, row_len, range(len(task))), row_len,
                              tokenizer.get_bos_token_id())
    packed = [np.stack(row) for _, row in zip(range(max_rows), rows)]
    if not packed:
        raise ValueError("the mixture's validation split holds no conversation")
    return np.stack(packed)


@torch.no_grad()
def _val_loss(model, val_batches, device: torch.device) -> float:
    """Mean cross-entropy per assistant token over the validation rows, summed over the ranks."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in val_batches:
        loss = model(x, y, loss_reduction="sum")
        total += torch.stack([loss.double(), (y >= 0).sum().double()])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def warm_start_optimizer(optimizer, state: dict) -> None:
    """Load a base run's optimizer state (its momentum buffers and Adam moments) into the SFT
    optimizer, keeping the SFT optimizer's own hyperparameters: the base run's learning rates have
    decayed by its last step, and its momentum and weight decay are its own."""
    hyperparameters = [{key: value for key, value in group.items() if key != "params"}
                       for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, hyperparameters):
        group.update(own)


def optimizer_warm_start(base_meta: dict, load_optimizer: bool, num_workers: int) -> tuple[bool, str]:
    """(whether the workers load the base checkpoint's optimizer shards, the line that says so).
    The shards fit only as many workers as saved them (DistMuonAdamW shards its state per rank)."""
    shards = base_meta.get("optimizer_shards", 0)
    if not load_optimizer:
        return False, "optimizer: fresh (--load-optimizer 0)"
    if shards == 0:
        return False, ("WARNING optimizer: fresh, because the base checkpoint has no optimizer shards (a model "
                       "imported without them, or exported before base_train kept them); nanochat finds SFT "
                       "slightly worse that way")
    if shards != num_workers:
        return False, (f"WARNING optimizer: fresh, because the base checkpoint's optimizer state is sharded over "
                       f"{shards} rank(s) and this run has {num_workers} worker(s); run with --num-workers "
                       f"{shards} to start from it")
    return True, (f"optimizer: starts from the base checkpoint's state ({shards} shard(s): momentum buffers and "
                  "Adam moments), with SFT's learning rates, momentum and weight decay")


def train_loop_per_worker(config: dict) -> None:
    cfg, refs = config["cfg"], config["refs"]
    args = argparse.Namespace(**cfg["args"])
    rank, world, device = start_worker()
    torch.set_float32_matmul_precision("high")

    model = build_model(cfg["model_config"], device, seed=args.seed)
    base_state, base_optimizer_state, _ = load_checkpoint(cfg["base_checkpoint_dir"], cfg["base_step"], device,
                                                          load_optimizer=cfg["warm_start_optimizer"], rank=rank)
    model.load_state_dict(base_state)
    del base_state
    lrs = {name: cfg["lrs"][name] * args.init_lr_frac for name in INHERITED_LRS}
    optimizer = model.setup_optimizer(**lrs, weight_decay=0.0)
    warm_started = base_optimizer_state is not None
    if warm_started:
        warm_start_optimizer(optimizer, base_optimizer_state)
        del base_optimizer_state
    meta = restore_from_checkpoint(model, optimizer, device, cfg)
    start_step = meta["step"] if meta else 0
    history = meta["history"] if meta else []  # every record of the run so far (rank 0 keeps it)
    if meta:
        history.append({"step": start_step, "restored_from_checkpoint": True, "time": time.time()})
    train_model = maybe_compile(model, optimizer, args.compile, device)

    num_steps, grad_accum = cfg["num_iterations"], cfg["grad_accum_steps"]
    tokenizer = Tokenizer.from_directory(cfg["tokenizer_dir"])
    train_task = build_mixture(args.mixture, "train")
    val_rows = torch.tensor(ray.get(refs["val_rows"]))  # a copy: the object store's array is read-only
    batch_size = cfg["device_batch_size"]
    val_batches = [(b[:, 0].to(device), b[:, 1].to(device))
                   for b in val_rows.split(batch_size)[rank:cfg["val_batches"] * world:world]]
    flops_per_token = model.estimate_flops()
    peak, peak_source = device_peak_flops(device) if rank == 0 else (0.0, "")
    if rank == 0:
        print0(f"MFU against {peak / 1e12:.3g} TFLOP/s per worker ({peak_source})" if peak > 0 else "MFU: n/a")
    metrics = TrainMetrics(cfg["run_name"], "nanochat_sft", args.run, cfg) if rank == 0 else None
    progress = ProgressLine(num_steps, start_step)
    checkpointer = Checkpointer(cfg["tokenizer_dir"], device)
    batches = _train_batches(train_task, tokenizer, cfg["row_len"], batch_size, rank, world, device)
    for _ in range(start_step * grad_accum):  # a resumed run continues where the data stopped
        next(batches)
    data_wait = Stopwatch()
    val_loss = meta.get("val_loss") if meta else None

    model.train()
    for step in range(start_step, num_steps + 1):
        last_step = step == num_steps
        eval_now = step == 0 or last_step or (args.eval_every > 0 and step % args.eval_every == 0)
        save_now = last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0)
        record = {"step": step}
        if step == 0:  # the run's first record says where its optimizer state came from
            record["optimizer_from_base"] = warm_started
        if eval_now:
            model.eval()
            val_loss = _val_loss(model, val_batches, device)
            model.train()
            record.update(val_loss=val_loss, time=time.time())
            print0(f"step {step:5d} | val loss {val_loss:.4f}")
            history.append(record)
            if metrics is not None:
                metrics.publish(step, {"val_loss": val_loss})
        if save_now:
            checkpoint_meta = {"model_config": cfg["model_config"], "user_config": cfg["args"], "val_loss": val_loss,
                               "base_model": cfg["base_checkpoint_dir"], "base_step": cfg["base_step"],
                               "history": history}
            checkpointer.save(record, step, model, optimizer, checkpoint_meta, wait=last_step)
        elif eval_now:
            ray.train.report(record)
        if last_step:
            break

        if args.fail_at_step == step and not meta:  # injected worker death (tests): a restart or --resume continues from the checkpoint
            checkpointer.crash_after_stored(cfg, rank, world)
        t0 = time.perf_counter()
        lrm = lr_multiplier(step, num_steps, 0.0, args.warmdown_ratio, 0.0)
        momentum = muon_momentum(step, warmup_steps=SFT_MUON_MOMENTUM_WARMUP_STEPS, peak=SFT_MUON_MOMENTUM)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
        loss_sum = torch.zeros((), device=device)
        tokens = 0
        for _ in range(grad_accum):
            with data_wait:
                x, y = next(batches)
            loss = train_model(x, y)
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
            tokens += int((y >= 0).sum())
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss = all_reduce(float(loss_sum) / grad_accum, device) / world
        dt = time.perf_counter() - t0
        tokens_per_second = cfg["total_batch_size"] / dt
        waited = data_wait.take()
        mfu = flops_per_token * tokens_per_second / (peak * world) if peak > 0 else None
        record = {"step": step + 1, "loss": train_loss, "lr_multiplier": lrm, "muon_momentum": momentum,
                  "tokens_per_second": tokens_per_second,
                  "assistant_tokens": tokens, "step_seconds": dt, "data_wait_seconds": waited, "time": time.time()}
        if mfu is not None:
            record["mfu"] = mfu
        report_step(record, history, metrics, progress, checkpointer)
    if metrics is not None:
        metrics.close()


def resolve_config(args: argparse.Namespace) -> dict:
    """Everything the workers need, derived on the driver from the flags and the base checkpoint."""
    phase_dir = os.path.join(get_base_dir(), "base_checkpoints")
    model_tag = args.model_tag or find_largest_model(phase_dir)
    base_dir = checkpoint_dir("base", model_tag)
    base_step = args.step if args.step is not None else find_last_step(base_dir)
    _, _, meta = load_checkpoint(base_dir, base_step, "cpu")
    tokenizer_dir = os.path.join(base_dir, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise CheckpointError(f"the base checkpoint in {base_dir} carries no tokenizer: retrain it with "
                              "python -m ray_jobs.base_train")
    base_args = meta.get("user_config", {})
    model_config = meta["model_config"]
    seq_len = args.max_seq_len if args.max_seq_len > 0 else model_config["sequence_len"]
    row_len = seq_len + 1
    device_batch_size = args.device_batch_size if args.device_batch_size > 0 else base_args.get("device_batch_size", 4)
    rows_per_micro_step = device_batch_size * args.num_workers
    total_batch_size = args.total_batch_size
    if total_batch_size <= 0:  # the base run's tokens per step, rounded to whole micro-steps
        base_total = meta.get("horizon", {}).get("total_batch_size", rows_per_micro_step * seq_len)
        total_batch_size = max(1, round(base_total / (rows_per_micro_step * seq_len))) * rows_per_micro_step * seq_len
    if total_batch_size % (rows_per_micro_step * seq_len):
        raise ValueError(f"--total-batch-size {total_batch_size} is not a multiple of {device_batch_size} rows x "
                         f"{seq_len} tokens x {args.num_workers} workers = {rows_per_micro_step * seq_len}")
    grad_accum_steps = total_batch_size // (rows_per_micro_step * seq_len)
    warm_start, warm_start_note = optimizer_warm_start(meta, bool(args.load_optimizer), args.num_workers)
    print0(warm_start_note)
    lrs = {name: getattr(args, name) if getattr(args, name) is not None else base_args.get(name)
           for name in INHERITED_LRS}
    missing = [name for name, value in lrs.items() if value is None]
    if missing:
        raise ValueError(f"the base checkpoint does not record its {', '.join(missing)}: pass "
                         + " ".join(f"--{name.replace('_', '-')}" for name in missing))

    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:
        # One epoch in rows: measure how many rows a sample of the mixture packs into.
        mixture = build_mixture(args.mixture, "train")
        sample = range(0, len(mixture), max(1, len(mixture) // 500))
        rows = sum(1 for _ in pack_conversations(_render(mixture, tokenizer, row_len, sample), row_len,
                                                 tokenizer.get_bos_token_id()))
        rows_per_epoch = rows * len(mixture) / len(sample)
        num_iterations = max(1, int(args.num_epochs * rows_per_epoch / (rows_per_micro_step * grad_accum_steps)))
    val_batches = max(1, math.ceil(args.eval_tokens / (device_batch_size * seq_len * args.num_workers)))
    val_rows = validation_rows(build_mixture(args.mixture, "val"), tokenizer, row_len,
                               val_batches * args.num_workers * device_batch_size)
    val_batches = min(val_batches, len(val_rows) // (device_batch_size * args.num_workers))
    if val_batches < 1:
        raise ValueError(f"the validation split packs into {len(val_rows)} rows, fewer than {device_batch_size} rows "
                         f"x {args.num_workers} workers: lower --device-batch-size")
    use_gpu = resolve_use_gpu(args.use_gpu)
    if args.storage_path and "://" in args.storage_path:
        storage_path = args.storage_path
    else:
        storage_path = os.path.abspath(args.storage_path or os.path.join(get_base_dir(), "ray_runs"))
    cfg = {"args": vars(args), "model_tag": model_tag, "run_name": args.run_name or f"sft_{model_tag}",
           "storage_path": storage_path, "base_checkpoint_dir": base_dir, "base_step": base_step,
           "model_config": model_config, "tokenizer_dir": tokenizer_dir, "row_len": row_len,
           "device_batch_size": device_batch_size, "total_batch_size": total_batch_size,
           "grad_accum_steps": grad_accum_steps, "num_iterations": num_iterations, "lrs": lrs,
           "warm_start_optimizer": warm_start, "val_batches": val_batches, "use_gpu": use_gpu}
    return cfg, val_rows


def main(argv=None) -> dict:
    """Fine-tune; returns {'checkpoint_dir', 'run_path', 'config', 'history', 'val_loss', 'train_loss'}."""
    started = time.time()
    args = parse_args(argv)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    try:
        cfg, val_rows = resolve_config(args)
        print0("resolved config: " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("args", "model_config")))
        print0(f"validation: {len(val_rows)} packed rows, {cfg['val_batches']} batch(es) per worker per eval")
        previous_run(cfg, args)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"chat_sft: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None

    cpus_per_worker = args.cpus_per_worker
    if cpus_per_worker <= 0:
        cpus_per_worker = max(0.1, min(1.0, ray.cluster_resources().get("CPU", 1) / args.num_workers))
    result = fit_trainer("chat_sft", train_loop_per_worker, {"cfg": cfg, "refs": {"val_rows": ray.put(val_rows)}},
                         cfg, args, None if cfg["use_gpu"] else {"CPU": cpus_per_worker})
    exported = export_final_model(result, {**cfg, "phase": "sft"})
    print0(f"final model exported to {exported}")

    history = latest_run_checkpoint_meta(cfg["storage_path"], cfg["run_name"])["history"]
    origin = history[0]["time"]
    history = [{**record, "time": record["time"] - origin} for record in history]
    train_losses = [record["loss"] for record in history if "loss" in record]
    val_losses = [record["val_loss"] for record in history if "val_loss" in record]
    final = {"train_loss": train_losses[-1] if train_losses else None, "val_loss": val_losses[-1]}
    wall_s = time.time() - started
    Report().log_stage("chat_sft", source="sft",
                       config={k: v for k, v in cfg.items() if k != "model_config"},
                       timings={"wall_s": wall_s},
                       metrics={"val_loss_before": val_losses[0], **final, "steps": cfg["num_iterations"]},
                       history=history)
    print0(f"chat_sft: {cfg['num_iterations']} steps in {wall_s:.0f} s | val loss {val_losses[0]:.4f} -> "
           f"{final['val_loss']:.4f}")
    return {"checkpoint_dir": exported, "run_path": result.path, "config": cfg, "history": history, **final}


if __name__ == "__main__":
    main()
