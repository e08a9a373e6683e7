"""Pretraining the base model on Ray Train.

    ray job submit --working-dir . -- python -m ray_jobs.base_train --depth=4 --num-workers=2

The driver resolves the config from the single `--depth` dial (and prints it), builds the packed
Ray Data stream (ray_jobs.pretrain_data) and runs a `TorchTrainer`: every worker builds the GPT,
reads its own lane of the stream (read, tokenized and packed for it alone) with
`get_dataset_shard('train_<rank>')`, and steps the distributed
MuonAdamW (which averages the gradients itself: no DDP). Every step is reported to
`ray.train.report` and to Ray metrics gauges; rank 0 prints one line per step. On schedule the
workers evaluate validation bits per byte together, and CORE (each rank scoring a share of the
examples on its in-memory model), and rank 0 prints greedy samples. Checkpoints go to `--storage-path` every
`--save-every` steps, keeping the last K; `--resume` continues a run from its newest checkpoint,
and `FailureConfig(max_failures)` replaces a dead worker (or those of a lost node) and continues
from the last checkpoint with nobody acting. Either way the train stream starts at the
checkpoint's shard: the trainer is given a factory of each lane (TrainStreamFactory), which Ray
Train calls at every start of the worker group, so a restart does not read, tokenize and pack
again every shard before it. `--placement-strategy` says how the workers spread over the nodes,
and every start of the worker group records the node of each rank in the history. At the
end the final model is exported to <base>/base_checkpoints/<model_tag>/ for the later stages,
and the run's metrics history (kept in every checkpoint) is returned.

Validation rows are packed once, on the driver, from the validation shard (ray_jobs.base_eval's
packed_batches: the same best-fit packing as the training stream) and handed to the workers
through the object store. They are a few MB, and a Ray Data execution per evaluation would cost
more than the evaluation itself (seconds of task and actor start-up for a single small shard).
"""

import argparse
import itertools
import json
import os
import sys
import threading
import time

import numpy as np
import ray
import ray.train
import torch

from nanochat.common import COMPUTE_DTYPE, print0
from nanochat.dataset import SOURCES, resolve_source
from nanochat.files import get_base_dir
from nanochat.fp8 import enable_fp8, fp8_unavailable_reason
from nanochat.gpt import EMBEDDING_DTYPES, GPT, config_from_depth
from nanochat.core_eval import core_score, count_correct
from nanochat.loss_eval import evaluate_bpb, unigram_bpb
from nanochat.report import Report, stage_history
from nanochat.tokenizer import Tokenizer, compute_token_bytes, get_tokenizer_dir
from nanochat.training import lr_multiplier, muon_momentum, resolve_horizon, weight_decay_at
from ray_jobs import pretrain_data
from ray_jobs.base_eval import packed_batches
from ray_jobs.gpus import resolve_use_gpu
from ray_jobs.train_common import (PLACEMENT_STRATEGIES, Checkpointer, ProgressLine, Stopwatch, TrainMetrics,
                                   add_run_flags, all_reduce, build_model, device_peak_flops, export_final_model,
                                   fit_trainer, latest_run_checkpoint, latest_run_checkpoint_meta, maybe_compile,
                                   previous_run, report_step, restore_from_checkpoint, restore_rng_state, rng_state,
                                   start_worker, worker_nodes)

# Micro-batches taken off a worker's Ray Data stream in one pull (see _micro_batches).
FETCH_MICRO_BATCHES = 8
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
    p.add_argument("--fp8", action="store_true",
                   help="train the large linear layers' matmuls in fp8 (tensorwise scaling, nanochat's --fp8); "
                        "needs a CUDA GPU of compute capability 8.9+ (H100): elsewhere the run says why and trains "
                        "without it")
    p.add_argument("--embedding-dtype", default="float32", choices=EMBEDDING_DTYPES,
                   help="dtype the token and value embedding tables are stored and updated in; nanochat keeps "
                        "them in bfloat16 on GPUs (the gpt2 preset does too)")
    # horizon (precedence: num-iterations, target-flops, target-param-data-ratio)
    p.add_argument("--num-iterations", type=int, default=-1)
    p.add_argument("--target-flops", type=float, default=-1.0)
    p.add_argument("--target-param-data-ratio", type=float, default=12.0)
    # batch
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per worker per micro-step")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per step; -1 = derived from depth")
    # optimisation (learning rates are the values at 2**19 tokens per step; they are scaled by
    # sqrt(total batch / 2**19), and the AdamW ones also by 1/sqrt(width / 768))
    p.add_argument("--embedding-lr", type=float, default=0.3)
    p.add_argument("--unembedding-lr", type=float, default=0.008)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=0.28,
                   help="Muon weight decay at depth 12 and 2**19 tokens per step; rescaled for this run's batch and horizon")
    p.add_argument("--warmup-steps", type=int, default=40, help="LR warmup steps")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="LR warmup as a fraction of the run (overrides --warmup-steps)")
    p.add_argument("--warmdown-ratio", type=float, default=0.65)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    # evaluation
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1 = only at the end)")
    p.add_argument("--eval-tokens", type=int, default=10 * 524288, help="val tokens per bpb evaluation")
    p.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps (-1 = off)")
    p.add_argument("--core-metric-every", type=int, default=-1, help="CORE every N steps and at the end (-1 = off)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500, help="CORE examples per task (-1 = all)")
    # data
    p.add_argument("--source", default="fineweb-edu", choices=SOURCES,
                   help="pretraining shards: a Hugging Face set (downloaded by ray_jobs.download_data), local or sample")
    p.add_argument("--data-dir", default=None, help="folder or glob of parquet shards (local source)")
    p.add_argument("--pack-buffer-docs", type=int, default=1000, help="documents the best-fit packer chooses from")
    # Ray
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (one per GPU)")
    p.add_argument("--placement-strategy", default="PACK", choices=PLACEMENT_STRATEGIES,
                   help="how the workers spread over the nodes (Ray placement group strategy): PACK fills a "
                        "node's GPUs first; STRICT_SPREAD puts each worker on a node of its own")
    p.add_argument("--cpus-per-worker", type=float, default=-1.0,
                   help="CPUs per CPU-only train worker; -1 = share the CPUs, leaving Ray Data a quarter per packer and 1 more")
    add_run_flags(p, "base")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the model (auto = on CUDA, and on CPU when a C++ compiler is installed)")
    # output
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default d<depth>)")
    p.add_argument("--fail-at-step", type=int, default=-1, help=argparse.SUPPRESS)  # fault injection for tests
    p.add_argument("--stand-in-step-ms", type=float, default=0.0,
                   help="benchmarks only: a sleep of this many ms replaces the model's forward, backward and "
                        "optimizer step, so that what Ray adds per step can be measured (bench_train --stand-in)")
    args = p.parse_args(argv)
    positive = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "eval_tokens",
                "pack_buffer_docs", "num_workers", "keep_last")
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_failures < 0:
        p.error(f"--max-failures must be 0 or more, got {args.max_failures}")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    if args.core_metric_max_per_task == 0 or args.core_metric_max_per_task < -1:
        p.error(f"--core-metric-max-per-task must be a positive number of examples or -1 for all, "
                f"got {args.core_metric_max_per_task}")
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}")
    return args


def resolve_config(args: argparse.Namespace) -> dict:
    """Everything the workers need, derived on the driver, as one JSON-able dict."""
    use_gpu = resolve_use_gpu(args.use_gpu)
    tokenizer_dir = get_tokenizer_dir()
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
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
    if args.storage_path and "://" in args.storage_path:
        storage_path = args.storage_path
    else:
        storage_path = os.path.abspath(args.storage_path or os.path.join(get_base_dir(), "ray_runs"))
    # Every worker evaluates the same number of batches, together about --eval-tokens tokens.
    val_batches_per_worker = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * args.num_workers))
    return {
        "args": vars(args),
        "model_tag": model_tag,
        "run_name": args.run_name or f"base_{model_tag}",
        "storage_path": storage_path,
        "use_gpu": use_gpu,
        "model_config": model.config_dict(),
        "param_counts": model.param_counts(),
        "flops_per_token": model.estimate_flops(),
        "horizon": horizon.as_dict(),
        "val_batches_per_worker": val_batches_per_worker,
        "tokenizer_dir": tokenizer_dir,
        "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
    }


def print_config(cfg: dict) -> None:
    print0("resolved config:")
    print0(json.dumps({k: v for k, v in cfg.items() if k != "args"}, indent=2))
    print0("flags: " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in cfg["args"].items()))


def validation_rows(val_files: list[str], tokenizer_dir: str, batch_size: int, sequence_len: int,
                    num_batches: int) -> np.ndarray:
    """The first `num_batches` batches of packed validation rows, int32 (num_batches * batch_size, T + 1).

    Packed by base_eval.packed_batches (the training stream's best-fit packing, over the validation
    shard in order), so base_eval's val bpb at the same batch size and token count is this one."""
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    batches = itertools.chain.from_iterable(packed_batches(path, tokenizer, batch_size, sequence_len)
                                            for path in val_files)
    rows = [torch.cat([x, y[:, -1:]], dim=1) for x, y in itertools.islice(batches, num_batches)]
    if not rows:
        raise ValueError(f"the validation shard {val_files} holds less than one batch of {batch_size} rows of "
                         f"{sequence_len + 1} tokens: lower --device-batch-size or --max-seq-len")
    return torch.cat(rows).to(torch.int32).numpy()


def worker_val_batches(rows: np.ndarray, batch_size: int, rank: int, world: int, device: torch.device):
    """This rank's (x, y) validation batches: every world-th batch of the rows, so the ranks
    together evaluate each batch once, whatever the number of workers."""
    batches = torch.tensor(rows, dtype=torch.long).split(batch_size)
    usable = len(batches) - len(batches) % world  # every rank evaluates the same number of batches
    return [(b[:, :-1].to(device), b[:, 1:].to(device)) for b in batches[rank:usable:world]]


class TrainStreamFactory:
    """One worker's lane of the train stream for Ray Train, built when called: Ray Train V2 calls a
    callable dataset at every start of the worker group (the first, and each restart after a
    worker failure), and the lane then starts at the shard of the run's newest complete checkpoint
    in storage, the one the restarted workers restore (restore_from_checkpoint), or at shard 0
    when there is none. Given the dataset itself, a restart would read, tokenize and pack again
    every shard before it."""

    def __init__(self, cfg: dict, args: argparse.Namespace, lane: int):
        self.storage_path, self.run_name = cfg["storage_path"], cfg["run_name"]
        self.stream_args = {"source": args.source, "data_dir": args.data_dir, "tokenizer_dir": cfg["tokenizer_dir"],
                            "sequence_len": args.max_seq_len, "buffer_docs": args.pack_buffer_docs,
                            "lane": lane, "num_lanes": args.num_workers}

    def __call__(self) -> ray.data.Dataset:
        found = latest_run_checkpoint(self.storage_path, self.run_name)
        start_file = found[1]["data_position"]["file_index"] if found else 0
        return pretrain_data.train_dataset(**self.stream_args, start_file=start_file)


class StartedStream:
    """The first epoch of this worker's shard, its first fetch pulled in a background thread from
    the moment the worker starts: Ray Data's pipeline (read and tokenize tasks, the packer actor
    and its process) starts while the model is built and the checkpoint restored, not after them.
    Measured on a tiny run on 2 CPUs, that start was 4-8 s before the first batch. The stream is
    read in the training thread after that first fetch, as before."""

    def __init__(self, shard, batch_size: int):
        self.shard, self.batch_size = shard, batch_size
        self.fetches = self.epoch_fetches()
        self.first: list = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._pull_first, name="first-fetch", daemon=True)
        self.thread.start()

    def epoch_fetches(self):
        """One epoch of the shard, FETCH_MICRO_BATCHES micro-batches a fetch (see _micro_batches), as
        numpy arrays: the training thread makes the tensors. Ray Data's torch conversion (int32 to
        int64) ran in its own threads, over enough rows to be split across threads: each such
        thread then held an OpenMP team of its own, and with more OpenMP threads than cores libgomp
        stops spinning at its barriers, so the training thread's team slept and woke at every one
        (1,000 times a second measured; that alone made a d4 step 12% slower on 2 CPUs)."""
        return iter(self.shard.iter_batches(batch_size=self.batch_size * FETCH_MICRO_BATCHES, batch_format="numpy",
                                            drop_last=False))

    def _pull_first(self) -> None:
        try:
            self.first = [next(self.fetches)]
        except StopIteration:
            pass
        except BaseException as error:  # raised in the training thread, where it is read
            self.error = error

    def first_epoch(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        yield from self.first
        yield from self.fetches


def _train_batches(stream: StartedStream, device: torch.device, num_files: int, resume: dict | None):
    """Endless (x, y, position) batches from this worker's shard, epoch after epoch.

    A position is how far the stream has got: {'epoch', 'offset' (of the newest shard in the
    stream's rotated file order), 'stream_start' (the shard the stream started at, which every row
    carries), 'skipped_rows'}. A stream that starts before the checkpoint's shard (none does:
    TrainStreamFactory starts it there) has the rows before that shard skipped in its first
    epoch; 'skipped_rows' counts them, the rows read again for nothing."""
    epoch = resume["epoch"] if resume else 0
    first_epoch, skipped_rows = True, 0
    while True:
        fetches = stream.first_epoch() if first_epoch else stream.epoch_fetches()
        for batch in _micro_batches(fetches, stream.batch_size):
            stream_start = int(batch["stream_start"][0])
            offset = int(((batch["file_index"] - stream_start) % num_files).max())
            if first_epoch and resume and offset < (resume["file_index"] - stream_start) % num_files:
                skipped_rows += len(batch["tokens"])
                continue
            rows = batch["tokens"].to(device, non_blocking=True)
            yield rows[:, :-1], rows[:, 1:], {"epoch": epoch, "offset": offset, "stream_start": stream_start,
                                              "skipped_rows": skipped_rows}
        epoch += 1
        first_epoch = False


def _micro_batches(fetches, batch_size: int):
    """One epoch's fetches in batches of `batch_size` rows, in stream order, the last partial batch
    dropped. The rows come off the stream FETCH_MICRO_BATCHES batches at a time: each pull from Ray
    Data costs about a millisecond whatever its size (measured with bench_train --stand-in), which
    a step with gradient accumulation would otherwise pay once per micro-batch."""
    for batch in fetches:
        for start in range(0, len(batch["tokens"]) - batch_size + 1, batch_size):
            yield {name: torch.from_numpy(column[start:start + batch_size]).long() for name, column in batch.items()}


def rows_checksum(rows: torch.Tensor) -> int:
    """A fingerprint of a batch of token rows: the token ids weighted by their place in the batch,
    summed, modulo 2**40 (so that the sum over thousands of ranks stays exact in a float64)."""
    places = torch.arange(1, rows.numel() + 1, dtype=torch.int64, device=rows.device).view(rows.shape)
    return int((rows.to(torch.int64) * places).sum()) % (1 << 40)


@torch.no_grad()
def _core_metric(model: GPT, tokenizer: Tokenizer, core_tasks: list, device: torch.device, rank: int,
                 world: int) -> float:
    """CORE of the current weights, scored on the training ranks themselves: each rank takes every
    world-th example of every task on its in-memory model, and the counts of correct answers are
    summed over the ranks. Few-shot prompts are drawn from a task's whole data, so the split
    changes no prompt and the score equals a single process's. Nothing is copied and no
    accelerator waits (scoring on separate CPU actors kept a GPU cluster idle for the whole eval)."""
    model.eval()
    counts = torch.tensor([float(count_correct(model, tokenizer, task.data, device, task.meta,
                                               range(rank, len(task.data), world))) for task in core_tasks],
                          dtype=torch.float64, device=device)
    model.train()
    if world > 1:
        torch.distributed.all_reduce(counts)
    accuracies = {task.label: count / len(task.data) for task, count in zip(core_tasks, counts.tolist())}
    return core_score(core_tasks, accuracies)["core_metric"]


def _print_samples(model: GPT, tokenizer: Tokenizer) -> None:
    from nanochat.engine import Engine

    engine = Engine(model, tokenizer)
    model.eval()
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        sequences, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
        print0(f"sample | {tokenizer.decode(sequences[0])!r}")
    model.train()


def fp8_setup(model: GPT, device: torch.device) -> dict:
    """Turn on fp8 training of the model's eligible linear layers when `device` can run it, and
    say what happened (printed, and returned for the run's history): the layers in fp8, or why
    the run trains without fp8, as nanochat ignores --fp8 off CUDA."""
    reason = fp8_unavailable_reason(device)
    compute_dtype = str(COMPUTE_DTYPE).removeprefix("torch.")
    if reason is not None:
        print0(f"--fp8 ignored: {reason}; the linear layers train in {compute_dtype}")
        return {"fp8_layers": 0, "fp8_unavailable": reason}
    layers = enable_fp8(model)
    print0(f"fp8 training (tensorwise scaling) in {len(layers)} linear layers; the narrower ones stay in "
           f"{compute_dtype}, and evaluation runs without fp8")
    return {"fp8_layers": len(layers)}


def train_loop_per_worker(config: dict) -> None:
    cfg, refs = config["cfg"], config["refs"]
    args = argparse.Namespace(**cfg["args"])
    horizon = cfg["horizon"]
    rank, world, device = start_worker()
    stream = StartedStream(ray.train.get_dataset_shard(f"train_{rank}"), args.device_batch_size)
    torch.set_float32_matmul_precision("high")

    model = build_model(cfg["model_config"], device, seed=args.seed)
    model.store_embeddings_in(EMBEDDING_DTYPES[args.embedding_dtype])
    scale = horizon["lr_batch_scale"]
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * scale, embedding_lr=args.embedding_lr * scale,
                                      matrix_lr=args.matrix_lr * scale, scalar_lr=args.scalar_lr * scale,
                                      weight_decay=args.weight_decay)
    meta = restore_from_checkpoint(model, optimizer, device, cfg)
    start_step = meta["step"] if meta else 0
    history = meta["history"] if meta else []  # every report of the run so far (rank 0 keeps it)
    # one record per start of the worker group: the node of every rank, and what a restart restored
    history.append({"step": start_step, "worker_nodes": worker_nodes()})
    if meta:
        restore_rng_state(meta["rng_state"])
        history[-1].update(restored_from_checkpoint=True, model_verifications=meta["model_verifications"])
    if args.fp8:
        history[-1].update(fp8_setup(model, device))
    train_model = maybe_compile(model, optimizer, args.compile, device)

    num_steps = horizon["num_iterations"]
    grad_accum = horizon["grad_accum_steps"]
    tokens_per_step = horizon["total_batch_size"]
    tokenizer = Tokenizer.from_directory(cfg["tokenizer_dir"])
    token_bytes = compute_token_bytes(tokenizer).to(device)
    val_batches = worker_val_batches(ray.get(refs["val_rows"]), args.device_batch_size, rank, world, device)
    peak, peak_source = device_peak_flops(device) if rank == 0 else (0.0, "")
    if rank == 0:
        print0(f"MFU against {peak / 1e12:.3g} TFLOP/s per worker ({peak_source})" if peak > 0 else "MFU: n/a")
    metrics = TrainMetrics(cfg["run_name"], "nanochat_base", args.run, cfg) if rank == 0 else None
    progress = ProgressLine(num_steps, start_step)
    checkpointer = Checkpointer(cfg["tokenizer_dir"], device)

    num_files = cfg["stream"]["num_train_files"]
    train_iter = _train_batches(stream, device, num_files, meta["data_position"] if meta else None)
    data_wait = Stopwatch()
    x, y, position = next(train_iter)  # the first batch waits for the pipeline to start: not counted
    if meta:  # the checkpoint's shard, where the restored stream started, the rows read again before it,
        # and which rows came first (their checksums summed over the ranks: tests rebuild them)
        first_rows = torch.cat([x, y[:, -1:]], dim=1)
        history[-1].update(data_position=meta["data_position"], stream_start=position["stream_start"],
                           skipped_rows=int(all_reduce(position["skipped_rows"], device)),
                           first_rows_checksum=int(all_reduce(rows_checksum(first_rows), device)))
    val_bpb = meta.get("val_bpb") if meta else None
    core_tasks = None  # fetched from the object store at the first CORE evaluation

    for step in range(start_step, num_steps + 1):
        last_step = step == num_steps
        # Every rank takes the same decisions: each report is a barrier across the workers.
        eval_now = last_step or (args.eval_every > 0 and step % args.eval_every == 0)
        core_now = args.core_metric_every > 0 and step > 0 and (last_step or step % args.core_metric_every == 0)
        save_now = last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0)
        evals = {}
        if eval_now:
            model.eval()
            val_bpb = evaluate_bpb(model, val_batches, len(val_batches), token_bytes)
            model.train()
            evals["val_bpb"] = val_bpb
            print0(f"step {step:5d} | val bpb {val_bpb:.4f}")
        if core_now:
            core_tasks = core_tasks if core_tasks is not None else ray.get(refs["core_tasks"])
            evals["core_metric"] = _core_metric(model, tokenizer, core_tasks, device, rank, world)
            print0(f"step {step:5d} | CORE {evals['core_metric']:.4f}")
        if rank == 0 and args.sample_every > 0 and step > 0 and (last_step or step % args.sample_every == 0):
            _print_samples(model, tokenizer)

        if eval_now or core_now or save_now:
            record = {"step": step, **evals}
            history.append(record)
            if metrics is not None:
                metrics.publish(step, record)
        if save_now:
            # the lanes' epochs end at different steps: the slowest is the smallest (epoch, offset)
            stream_progress = position["epoch"] * num_files + position["offset"]
            slowest = int(all_reduce(stream_progress, device, op=torch.distributed.ReduceOp.MIN))
            data_position = {"epoch": slowest // num_files,
                             "file_index": (position["stream_start"] + slowest) % num_files}
            checkpoint_meta = {"model_config": cfg["model_config"], "data_position": data_position,
                               "user_config": cfg["args"], "val_bpb": val_bpb, "rng_state": rng_state(),
                               "horizon": horizon, "history": history}
            saving = time.perf_counter()
            checkpointer.save(record, step, model, optimizer, checkpoint_meta, wait=last_step)
            record["checkpoint_seconds"] = time.perf_counter() - saving  # the stall, kept in later checkpoints
        elif eval_now or core_now:
            ray.train.report(record)
        if last_step:
            break

        # --- one optimizer step over grad_accum micro-batches
        if args.fail_at_step == step and not meta:  # injected worker death (tests): FailureConfig must bring the run back
            checkpointer.crash_after_stored(cfg, rank, world)
        t0 = time.perf_counter()
        lrm = lr_multiplier(step, num_steps, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac,
                            args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step, num_steps, args.warmdown_ratio)
                group["weight_decay"] = weight_decay_at(step, num_steps,
                                                        args.weight_decay * horizon["weight_decay_scale"])
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            if args.stand_in_step_ms > 0:
                time.sleep(args.stand_in_step_ms / 1000 / grad_accum)
            else:
                loss = train_model(x, y)
                (loss / grad_accum).backward()
                loss_sum += loss.detach()
            with data_wait:
                x, y, position = next(train_iter)
        if args.stand_in_step_ms <= 0:
            optimizer.step()
            model.zero_grad(set_to_none=True)
        # the loss of the whole global batch: the mean over the ranks of their micro-batch means
        train_loss = all_reduce(float(loss_sum) / grad_accum, device) / world
        dt = time.perf_counter() - t0
        tokens_per_second = tokens_per_step / dt
        waited = data_wait.take()
        mfu = cfg["flops_per_token"] * tokens_per_second / (peak * world) if peak > 0 else None
        record = {"step": step + 1, "loss": train_loss, "lr_multiplier": lrm, "tokens_per_second": tokens_per_second,
                  "step_seconds": dt, "data_wait_seconds": waited, "epoch": position["epoch"],
                  "time": time.time()}
        if mfu is not None:
            record["mfu"] = mfu
        record.update(report_step(record, history, metrics, progress, checkpointer))
    if metrics is not None:
        metrics.close()


def main(argv=None) -> dict:
    """Train; returns {'checkpoint_dir', 'run_path', 'config', 'history', 'val_bpb', 'val_unigram_bpb'}."""
    args = parse_args(argv)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    try:
        cfg = resolve_config(args)
        print_config(cfg)
        previous_run(cfg, args)  # refuses a run with checkpoints unless --resume
        train_lanes = {f"train_{lane}": TrainStreamFactory(cfg, args, lane) for lane in range(args.num_workers)}
        # One lane built here as well (every lane reads the same footers and checks the same unit
        # count): unusable shards, or too few for the workers, stop the run with a message before
        # it starts, and building sets the ingest options (preserve_order) on this driver's
        # DataContext, which the trainer takes along to the lanes.
        train_lanes["train_0"]()
        cfg["stream"] = {"num_train_files": len(resolve_source(args.source, args.data_dir).train_files)}
        val_rows = validation_rows(resolve_source(args.source, args.data_dir).val_files, cfg["tokenizer_dir"],
                                   args.device_batch_size, args.max_seq_len,
                                   cfg["val_batches_per_worker"] * args.num_workers)
        if len(val_rows) // args.device_batch_size < args.num_workers:
            raise ValueError(f"the validation shard holds {len(val_rows) // args.device_batch_size} batch(es) of "
                             f"{args.device_batch_size} rows, fewer than the {args.num_workers} workers that share "
                             "them: lower --device-batch-size or --max-seq-len")
        val_unigram_bpb = unigram_bpb(torch.from_numpy(val_rows[:, 1:]).long(),
                                      compute_token_bytes(Tokenizer.from_directory(cfg["tokenizer_dir"])))
        print0(f"validation: {len(val_rows)} rows of {args.max_seq_len} tokens; a unigram model of them (token "
               f"frequencies) scores {val_unigram_bpb:.4f} bits/byte: the model's val bpb must get below it")
        core_tasks = None
        if args.core_metric_every > 0:
            from nanochat.core_eval import download_eval_bundle, load_core_tasks
            core_tasks = ray.put(load_core_tasks(download_eval_bundle(), args.core_metric_max_per_task))
    except (FileNotFoundError, ValueError) as exc:
        print(f"base_train: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None

    cpus_per_worker = args.cpus_per_worker
    if cpus_per_worker <= 0:
        # Logical CPUs only schedule work (each worker sets its torch threads from the node's
        # cores); leave each lane's packer its share, and one CPU for the read and tokenize tasks.
        data_cpus = 1.0 + pretrain_data.PACK_CPUS * args.num_workers
        cpus_per_worker = max(0.1, min(1.0, (ray.cluster_resources().get("CPU", 2) - data_cpus) / args.num_workers))
    result = fit_trainer("base_train", train_loop_per_worker,
                         {"cfg": cfg, "refs": {"val_rows": ray.put(val_rows), "core_tasks": core_tasks}}, cfg, args,
                         None if cfg["use_gpu"] else {"CPU": cpus_per_worker},
                         placement_strategy=args.placement_strategy, datasets=train_lanes,
                         dataset_config=ray.train.DataConfig(datasets_to_split=[]))
    exported = export_final_model(result, cfg)
    print0(f"final model exported to {exported}")
    meta = latest_run_checkpoint_meta(cfg["storage_path"], cfg["run_name"])  # the final checkpoint's
    history = stage_history(meta["history"])
    Report().log_stage("base_train", source="base", history=history,
                       config={**cfg["args"], "parameters": cfg["param_counts"]["total"], **cfg["horizon"]},
                       timings={"train_s": history[-1]["time"]} if history else {},
                       metrics={"val_bpb": meta["val_bpb"], "val_unigram_bpb": val_unigram_bpb})
    return {"checkpoint_dir": exported, "run_path": result.path, "config": cfg, "history": meta["history"],
            "val_bpb": meta["val_bpb"], "val_unigram_bpb": val_unigram_bpb}


if __name__ == "__main__":
    main()
