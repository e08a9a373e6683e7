"""Pretraining the base model on Ray Train.

    ray job submit --working-dir . -- python -m ray_jobs.base_train --depth=4 --num-workers=2

The driver resolves the config from the single `--depth` dial (and prints it), builds the packed
Ray Data streams (ray_jobs.pretrain_data) and runs a `TorchTrainer`: every worker builds the GPT,
reads its shard of the stream with `get_dataset_shard('train')`, and steps the distributed
MuonAdamW (which averages the gradients itself: no DDP). Rank 0 evaluates bits per byte, samples
and CORE on schedule; metrics go to `ray.train.report` every step and to Ray metrics gauges;
checkpoints go to `--storage-path` every `--save-every` steps, keeping the last K. `--resume`
continues a run from its newest checkpoint, and `FailureConfig(max_failures)` replaces a dead
worker and continues from the last checkpoint with nobody acting. At the end the final model is
exported to <base>/base_checkpoints/<model_tag>/ for the later stages.
"""

import argparse
import json
import os
import time

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from nanochat.checkpoint import checkpoint_dir, save_checkpoint
from nanochat.dataset import SOURCES
from nanochat.common import COMPUTE_DTYPE, get_base_dir, peak_flops, print0
from nanochat.gpt import GPT, config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import Tokenizer, get_token_bytes, get_tokenizer_dir
from nanochat.training import lr_multiplier, muon_momentum, resolve_horizon, weight_decay_at
from ray_jobs import pretrain_data
from ray_jobs.train_common import (ProgressLine, Stopwatch, TrainMetrics, all_reduce_min, build_model,
                                   latest_run_checkpoint_meta, maybe_compile, report_with_checkpoint,
                                   restore_from_checkpoint, world_info)

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain a nanochat base model with Ray Train")
    # model
    p.add_argument("--depth", type=int, default=20, help="the one complexity dial: number of layers")
    p.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth * aspect ratio")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length")
    p.add_argument("--window-pattern", default="SSSL", help="sliding windows per layer: S = T/4, L = full")
    # horizon (precedence: num-iterations, target-flops, target-param-data-ratio)
    p.add_argument("--num-iterations", type=int, default=-1)
    p.add_argument("--target-flops", type=float, default=-1.0)
    p.add_argument("--target-param-data-ratio", type=float, default=20.0)
    # batch
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per worker per micro-step")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per step; -1 = derived from depth")
    # optimisation
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=0.2)
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--warmdown-ratio", type=float, default=0.4)
    p.add_argument("--final-lr-frac", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=42)
    # evaluation
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1 = only at the end)")
    p.add_argument("--eval-tokens", type=int, default=10 * 524288, help="val tokens per bpb evaluation")
    p.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps (-1 = off)")
    p.add_argument("--core-metric-every", type=int, default=-1, help="CORE every N steps (-1 = off)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500)
    # data
    p.add_argument("--source", default="fineweb-edu", choices=SOURCES,
                   help="pretraining shards: a Hugging Face set (downloaded by ray_jobs.download_data), local or sample")
    p.add_argument("--data-dir", default=None, help="folder or glob of parquet shards (local source)")
    p.add_argument("--pack-buffer-docs", type=int, default=1000, help="documents the best-fit packer chooses from")
    # Ray
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (one per GPU)")
    p.add_argument("--use-gpu", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--cpus-per-worker", type=float, default=-1.0,
                   help="CPUs per CPU-only train worker; -1 = share the CPUs, leaving 1.5 for Ray Data")
    p.add_argument("--storage-path", default=None, help="checkpoint storage: folder or URI (s3://...)")
    p.add_argument("--run-name", default=None, help="Ray Train run name (default base_<model-tag>)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept in storage")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures survived by restarting")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    # output
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default d<depth>)")
    p.add_argument("--run", default=None, help="wandb run name (off by default)")
    p.add_argument("--fail-at-step", type=int, default=-1, help=argparse.SUPPRESS)  # fault injection for tests
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict:
    """Everything the workers need, derived on the driver, as one JSON-able dict."""
    if args.use_gpu == "auto":
        use_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= args.num_workers
    else:
        use_gpu = args.use_gpu == "on"
    tokenizer = Tokenizer.from_directory(get_tokenizer_dir())
    model_config = config_from_depth(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                                     sequence_len=args.max_seq_len, vocab_size=tokenizer.get_vocab_size(),
                                     window_pattern=args.window_pattern)
    with torch.device("meta"):
        model = GPT(model_config)
        reference = GPT(config_from_depth(12, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                                          sequence_len=args.max_seq_len, vocab_size=tokenizer.get_vocab_size()))
    horizon = resolve_horizon(
        scaling_params=model.num_scaling_params(), flops_per_token=model.estimate_flops(),
        reference_scaling_params=reference.num_scaling_params(), device_batch_size=args.device_batch_size,
        sequence_len=args.max_seq_len, num_workers=args.num_workers, total_batch_size=args.total_batch_size,
        num_iterations=args.num_iterations, target_flops=args.target_flops,
        target_param_data_ratio=args.target_param_data_ratio)
    model_tag = args.model_tag or f"d{args.depth}"
    return {
        "args": vars(args),
        "model_tag": model_tag,
        "run_name": args.run_name or f"base_{model_tag}",
        "storage_path": os.path.abspath(args.storage_path) if args.storage_path and "://" not in args.storage_path
        else (args.storage_path or os.path.join(get_base_dir(), "ray_runs")),
        "use_gpu": use_gpu,
        "model_config": model.config_dict(),
        "param_counts": model.param_counts(),
        "flops_per_token": model.estimate_flops(),
        "horizon": horizon.as_dict(),
        "tokenizer_dir": get_tokenizer_dir(),
        "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
    }


def print_config(cfg: dict) -> None:
    print0("resolved config:")
    print0(json.dumps({k: v for k, v in cfg.items() if k != "args"}, indent=2))
    print0("flags: " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in cfg["args"].items()))


def _train_batches(shard, batch_size: int, device: torch.device, stream: dict, resume: dict | None):
    """Endless (x, y, position) batches from this worker's shard, epoch after epoch.

    A position is how far the stream has got: the offset of the newest shard in the (rotated)
    file order of this run. After a worker failure the trainer restarts the stream from its
    beginning, so rows before the checkpoint's shard are skipped in the first epoch."""
    num_files, start_file = stream["num_train_files"], stream["start_file"]
    epoch = resume["epoch"] if resume else 0
    skip_below = (resume["file_index"] - start_file) % num_files if resume else 0
    while True:
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              dtypes=torch.long):
            offset = int(((batch["file_index"] - start_file) % num_files).max())
            if offset < skip_below:
                continue
            rows = batch["tokens"].to(device, non_blocking=True)
            yield rows[:, :-1], rows[:, 1:], {"epoch": epoch, "offset": offset}
        epoch += 1
        skip_below = 0


def _val_batches(shard, batch_size: int, device: torch.device, rank: int, world: int):
    """The validation rows, the same on every run: every worker sees the whole (unsplit) val
    stream and takes every world-th batch, so the evaluated set does not depend on the order in
    which workers consume it."""
    for index, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                                           dtypes=torch.long)):
        if index % world == rank:
            rows = batch["tokens"].to(device)
            yield rows[:, :-1], rows[:, 1:]


def train_loop_per_worker(cfg: dict) -> None:
    args = argparse.Namespace(**cfg["args"])
    horizon = cfg["horizon"]
    rank, world = world_info()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_float32_matmul_precision("high")

    model = build_model(cfg["model_config"], device, seed=args.seed)
    scale = horizon["lr_batch_scale"]
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * scale, embedding_lr=args.embedding_lr * scale,
                                      matrix_lr=args.matrix_lr * scale, scalar_lr=args.scalar_lr * scale,
                                      weight_decay=args.weight_decay)
    meta = restore_from_checkpoint(model, optimizer, device)
    start_step = meta["step"] if meta else 0
    if meta and "rng_state" in meta:
        torch.manual_seed(meta["rng_state"] + start_step)
    train_model = maybe_compile(model, args.compile, device)

    num_steps = horizon["num_iterations"]
    grad_accum = horizon["grad_accum_steps"]
    tokens_per_step = horizon["total_batch_size"]
    token_bytes = get_token_bytes(device)
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world))
    peak = peak_flops(device) * world
    metrics = TrainMetrics(cfg["run_name"], "nanochat_base", args.run if rank == 0 else None, cfg) if rank == 0 else None
    progress = ProgressLine(num_steps, start_step)

    stream = cfg["stream"]
    train_iter = _train_batches(ray.train.get_dataset_shard("train"), args.device_batch_size, device, stream,
                                meta["data_position"] if meta else None)
    data_wait = Stopwatch()
    x, y, position = next(train_iter)  # the first batch waits for the pipeline to start: not counted
    val_bpb = None
    total_training_time = meta.get("total_training_time", 0.0) if meta else 0.0

    for step in range(start_step, num_steps + 1):
        last_step = step == num_steps
        results = {}
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            val_bpb = evaluate_bpb(model, _val_batches(ray.train.get_dataset_shard("val"), args.device_batch_size,
                                                       device, rank, world), eval_steps, token_bytes)
            model.train()
            results["val_bpb"] = val_bpb
            print0(f"step {step:5d} | val bpb {val_bpb:.4f}")
        if rank == 0 and args.sample_every > 0 and (step % args.sample_every == 0 or last_step) and step > 0:
            _print_samples(model, cfg["tokenizer_dir"])

        save_now = last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0)
        if save_now:
            slowest = all_reduce_min(position["offset"], device)
            data_position = {"epoch": position["epoch"],
                             "file_index": (stream["start_file"] + slowest) % stream["num_train_files"]}
            checkpoint_meta = {"model_config": cfg["model_config"], "data_position": data_position,
                               "user_config": cfg["args"], "val_bpb": val_bpb, "rng_state": args.seed,
                               "total_training_time": total_training_time, "horizon": horizon}
            report_with_checkpoint({"step": step, **results}, step, model, optimizer, checkpoint_meta,
                                   cfg["tokenizer_dir"])
        if last_step:
            break

        # --- one optimizer step over grad_accum micro-batches
        if args.fail_at_step == step and not meta and rank == world - 1:
            os._exit(1)  # injected worker death (tests): FailureConfig must bring the run back
        t0 = time.perf_counter()
        lrm = lr_multiplier(step, num_steps, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
                group["weight_decay"] = weight_decay_at(step, num_steps, args.weight_decay)
        loss_sum = 0.0
        for _ in range(grad_accum):
            loss = train_model(x, y)
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
            with data_wait:
                x, y, position = next(train_iter)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss = float(loss_sum) / grad_accum
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step > start_step:  # the first step includes warm-up (compilation, first batches)
            total_training_time += dt
        tokens_per_second = tokens_per_step / dt
        mfu = cfg["flops_per_token"] * tokens_per_second / peak if peak > 0 else None
        waited = data_wait.take()
        line = progress.update(step, train_loss, dt, tokens_per_second, mfu, extra=f" | data wait {100 * waited / dt:.1f}%")
        print0(line)
        step_metrics = {"step": step + 1, "loss": train_loss, "lr_multiplier": lrm, "tokens_per_second": tokens_per_second,
                        "step_seconds": dt, "data_wait_seconds": waited, "epoch": position["epoch"], **results}
        if mfu is not None:
            step_metrics["mfu"] = mfu
        if metrics is not None:
            metrics.publish(step + 1, step_metrics)
        ray.train.report(step_metrics)
    if metrics is not None:
        metrics.close()


def _print_samples(model: GPT, tokenizer_dir: str) -> None:
    from nanochat.engine import Engine

    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    engine = Engine(model, tokenizer)
    model.eval()
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        sequences, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
        print0(f"sample | {tokenizer.decode(sequences[0])!r}")
    model.train()


def export_final_model(result: ray.train.Result, cfg: dict) -> str:
    """Copy the run's final checkpoint into <base>/base_checkpoints/<model_tag>/ for later stages."""
    from nanochat.checkpoint import find_last_step, load_checkpoint

    with result.checkpoint.as_directory() as folder:
        step = find_last_step(folder)
        model_state, _, meta = load_checkpoint(folder, step, "cpu")
    target = checkpoint_dir("base", cfg["model_tag"])
    keep = {k: v for k, v in meta.items() if k not in ("format", "step", "model_file", "tokenizer")}
    save_checkpoint(target, step, model_state, keep, tokenizer_dir=cfg["tokenizer_dir"])
    return target


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    cfg = resolve_config(args)
    print_config(cfg)

    previous = latest_run_checkpoint_meta(cfg["storage_path"], cfg["run_name"])
    if previous is not None and not args.resume:
        raise SystemExit(f"a run named {cfg['run_name']!r} already has checkpoints in {cfg['storage_path']} "
                         f"(step {previous['step']}): pass --resume to continue it, or --run-name NEW to start over")
    start_file = previous["data_position"]["file_index"] if (previous and args.resume) else 0
    datasets, cfg["stream"] = pretrain_data.build_datasets(
        source=args.source, data_dir=args.data_dir, tokenizer_dir=cfg["tokenizer_dir"],
        sequence_len=args.max_seq_len, buffer_docs=args.pack_buffer_docs, start_file=start_file)

    cpus_per_worker = args.cpus_per_worker
    if cpus_per_worker <= 0:
        # Logical CPUs only schedule work (torch uses the cores it finds); leave 1.5 for Ray Data,
        # whose file listing task asks for a whole CPU.
        cpus_per_worker = max(0.1, min(1.0, (ray.cluster_resources().get("CPU", 2) - 1.5) / args.num_workers))
    resources = {"CPU": cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=cfg["use_gpu"],
                                     resources_per_worker=None if cfg["use_gpu"] else resources),
        run_config=RunConfig(name=cfg["run_name"], storage_path=cfg["storage_path"],
                             checkpoint_config=CheckpointConfig(num_to_keep=args.keep_last),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    exported = export_final_model(result, cfg)
    print0(f"final model exported to {exported}")
    return {"checkpoint_dir": exported, "run_path": result.path, "config": cfg}


if __name__ == "__main__":
    main()
