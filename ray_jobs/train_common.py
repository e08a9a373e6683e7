"""The Ray Train machinery every trainer shares (base_train, chat_sft, chat_rl).

- building the GPT on the worker's device, CPU threads per worker, and torch.compile when asked;
- the device's peak FLOP/s for MFU: the GPU's datasheet number, or on CPU the measured matmul rate;
- checkpoints through `ray.train.report(checkpoint=...)`: each rank writes its optimizer shard,
  rank 0 the weights, the meta record and the tokenizer copy, in nanochat.checkpoint's layout,
  and Ray merges the ranks' folders into one checkpoint in the run's storage path;
- restoring from the newest complete checkpoint of the run (after `--resume` or a worker failure):
  a step counts only when every rank's optimizer shard arrived (nanochat.checkpoint.check_step_files),
  and exporting a run's final checkpoint to the base dir for the next stage;
- the Ray Train settings that keep per-step reports cheap and a worker's output to one line
  per print;
- metrics: `ray.util.metrics` gauges for the Ray dashboard / Prometheus, plus optional wandb;
- the one-line-per-step progress report.
"""

import base64
import logging
import math
import argparse
import os
import re
import shutil
import sys
import tempfile
import time

import pyarrow.fs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util import metrics as ray_metrics

from nanochat.checkpoint import (RESERVED_META_KEYS, CheckpointError, check_step_files, checkpoint_dir,
                                 find_last_step, load_checkpoint, save_checkpoint)
from nanochat.common import peak_flops, print0
from nanochat.gpt import GPT, GPTConfig
from ray_jobs.gpus import GPUsUnavailableError, add_gpu_flags, reserve_gpus

# Settings Ray Train 2.60 reads from the environment of its controller and workers; the driver's
# values are handed on to both (ray.train.v2's ENV_VARS_TO_PROPAGATE), so setting them in the driver
# before fit() is enough, under `ray job submit` too.
RAY_TRAIN_ENV = {
    # The controller takes a worker's report off the worker's one-slot queue once per poll, every
    # 2 s by default, and the worker's next report waits for the slot: a report less than one poll
    # after the previous one stalls training until the poll. Steps report every REPORT_EVERY_STEPS
    # (report_step), so a poll of 0.25 s never stalls a run whose steps take 25 ms or more, and
    # costs the controller a quarter of what the 0.1 s poll did (measured: 2.5% of a core at
    # 0.1 s, taken from the training threads on a 2-CPU node).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # Ray Train replaces print() in its workers by a version that prints AND logs through the root
    # logger, so every line a worker prints shows twice in the driver's output.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


# Steps between two per-step reports to Ray Train (evaluations and checkpoints report when they happen).
REPORT_EVERY_STEPS = 10


def set_ray_train_env() -> None:
    """Apply RAY_TRAIN_ENV in this (driver) process, keeping any value the user set."""
    for name, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)


def quiet_worker_logs() -> None:
    """Keep a train worker's output to the trainer's own lines: Ray Train 2.60 logs every report
    ("Reporting training result ...") at INFO through a logger that its LoggingConfig does not
    reach, and it propagates to the root logger, so raise the root logger to WARNING."""
    logging.getLogger().setLevel(logging.WARNING)


def add_run_flags(p: argparse.ArgumentParser, stage: str, save_every: int = -1) -> None:
    """The flags every trainer takes for its Ray Train run: where checkpoints go and how many stay,
    resume and restarts, and the optional wandb run. The run name defaults to <stage>_<model-tag>."""
    p.add_argument("--storage-path", default=None, help="checkpoint storage: folder or URI (s3://...)")
    p.add_argument("--run-name", default=None, help=f"Ray Train run name (default {stage}_<model-tag>)")
    p.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps (-1 = only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept in storage")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures survived by restarting")
    p.add_argument("--run", default=None, help="wandb run name (off by default)")
    add_gpu_flags(p, "train workers")


def previous_run(cfg: dict, args: argparse.Namespace) -> dict | None:
    """The meta record of the newest checkpoint of this run, or None for a new run (the workers
    look storage up again themselves: restore_from_checkpoint). A run that already has
    checkpoints must be asked for with --resume (ValueError otherwise), so that a forgotten
    --run-name never mixes two runs."""
    found = latest_run_checkpoint(cfg["storage_path"], cfg["run_name"])
    previous = found[1] if found else None
    if previous is not None and not args.resume:
        raise ValueError(f"a run named {cfg['run_name']!r} already has checkpoints in {cfg['storage_path']} "
                         f"(step {previous['step']}): pass --resume to continue it, or --run-name NEW to start over")
    if previous is None and args.resume:
        print0(f"--resume: run {cfg['run_name']!r} has no checkpoint in {cfg['storage_path']} yet, starting it")
    return previous


def fit_trainer(stage: str, train_loop, loop_config: dict, cfg: dict, args: argparse.Namespace,
                resources_per_worker: dict | None, extra_gpu_bundles: tuple[dict, ...] = (),
                **trainer_kwargs) -> ray.train.Result:
    """Run a trainer's `TorchTrainer` with the settings all trainers share (RAY_TRAIN_ENV, the run's
    name and storage, keep the last --keep-last checkpoints, --max-failures restarts, quiet logs);
    `trainer_kwargs` go to the TorchTrainer (datasets). A GPU run first reserves its workers' GPUs
    and `extra_gpu_bundles` (ray_jobs.gpus.reserve_gpus: the autoscaler is asked for them, and a
    run that cannot have them within --gpu-wait-s stops with a message instead of waiting forever
    or falling back to CPUs). A run that fails beyond its restarts ends the process with one line
    that says where its checkpoints are and how to resume."""
    if cfg["use_gpu"]:
        worker = resources_per_worker or {"CPU": 1, "GPU": 1}  # Ray Train's default for a GPU worker
        try:
            reserve_gpus([worker] * args.num_workers + list(extra_gpu_bundles), args.gpu_wait_s, stage)
        except GPUsUnavailableError as exc:
            print(f"{stage}: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
    set_ray_train_env()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=cfg["use_gpu"],
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(name=cfg["run_name"], storage_path=cfg["storage_path"],
                             checkpoint_config=CheckpointConfig(num_to_keep=args.keep_last),
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             logging_config=LoggingConfig(log_level="WARNING")),
        **trainer_kwargs,
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        print(f"{stage}: training failed after {args.max_failures} restart(s) ({exc}). Its checkpoints are in "
              f"{cfg['storage_path']}/{cfg['run_name']}: rerun with --resume to continue from the newest one",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def start_worker(label: str = "workers") -> tuple[int, int, torch.device]:
    """The start of every train_loop_per_worker: quiet logs, this worker's (rank, world size) and
    device; on CUDA the device is made current, on CPU the torch threads are set (and said once)."""
    quiet_worker_logs()
    rank, world = world_info()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        print0(f"CPU {label}: {configure_cpu_threads()} torch threads each")
    return rank, world, device


def build_model(model_config: dict, device: torch.device, seed: int) -> GPT:
    """A freshly initialised GPT on `device`; every rank passes the same seed, so every rank
    starts from the same weights."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(model_config))
    model.to_empty(device=device)
    model.init_weights()
    return model


def maybe_compile(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """torch.compile per --compile ('on', 'off', or 'auto').

    'auto' compiles on CUDA, and on CPU when a C++ compiler is installed (Inductor generates C++
    there): bench_train measured the compiled d2 model 1.9x faster per step than eager on 2 CPUs,
    for about 20 s of compilation on a cold cache (a few seconds once Inductor's cache holds it),
    so it pays from about 100 steps. Evaluation and sampling use the eager model (their shapes vary)."""
    compiler_found = any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "c++", "clang++"))
    if mode == "on" or (mode == "auto" and (device.type == "cuda" or compiler_found)):
        return torch.compile(model, dynamic=False)  # GPT() has chosen its attention kernel already
    return model


def world_info() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def configure_cpu_threads() -> int:
    """Give each CPU train worker its share of its node's cores; returns the thread count.

    Ray starts a worker that asked for a fraction of a CPU with OMP_NUM_THREADS=1, so torch would
    use one core however many the node has. Logical CPUs in Ray only schedule work; the cores are
    shared by the workers on the node (the light Ray Data stages run between their matmuls)."""
    node_id = ray.get_runtime_context().get_node_id()
    node_cpus = next((node["Resources"].get("CPU", 1) for node in ray.nodes() if node["NodeID"] == node_id), 1)
    threads = max(1, int(node_cpus) // ray.train.get_context().get_local_world_size())
    torch.set_num_threads(threads)
    return threads


def measure_matmul_flops(device: torch.device, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a square fp32 matmul on `device` with the current thread count: the practical
    peak a CPU reaches, against which its MFU is reported (CPUs have no datasheet number here).
    The fastest of the matmuls timed over `seconds` counts, not their mean: on a shared machine
    the mean takes in whatever else ran meanwhile, and a peak measured low puts MFU above 100%."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up: thread pool start, page faults
    fastest, started = math.inf, time.perf_counter()
    while time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        fastest = min(fastest, time.perf_counter() - begin)
    return 2 * size ** 3 / fastest


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) of one device, for MFU."""
    peak = peak_flops(device)
    if peak > 0:
        return peak, "datasheet bf16"
    if device.type == "cpu":
        return measure_matmul_flops(device), "measured fp32 matmul"
    return 0.0, "unknown GPU"


def all_reduce(value: float, device: torch.device, op=None) -> float:
    """A scalar reduced over the ranks (SUM by default); the value itself outside a process group."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return float(tensor.item())


def rng_state() -> str:
    """torch's CPU generator state as text, for a checkpoint's JSON meta."""
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")


def restore_rng_state(state: str) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))


def report_with_checkpoint(metrics: dict, step: int, model: GPT, optimizer, meta: dict,
                           tokenizer_dir: str | None) -> None:
    """Every rank calls this at the same step: it writes its part to a local folder and reports it
    to Ray Train, which merges the parts into the run's checkpoint `step_<step>` in storage and
    keeps the last K.

    Only the local write stalls training: the upload to storage (a copy to the shared folder, or
    S3) runs in Ray Train's background thread (CheckpointUploadMode.ASYNC), which deletes the local
    folder when it is done and registers the checkpoint with the controller after that. Until
    then the step is incomplete in storage, and a resume never picks it (complete_run_steps);
    the worker's end waits for the last upload."""
    rank, world = world_info()
    local = tempfile.mkdtemp(prefix="nanochat_ckpt_")
    save_checkpoint(local, step, model.state_dict() if rank == 0 else None, meta if rank == 0 else None,
                    optimizer_state=optimizer.state_dict(), rank=rank,
                    tokenizer_dir=tokenizer_dir if rank == 0 else None, world_size=world)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                     checkpoint_dir_name=f"step_{step:06d}", checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True)


def restore_from_checkpoint(model: GPT, optimizer, device: torch.device, cfg: dict) -> dict | None:
    """Load weights and this rank's optimizer shard from the newest complete checkpoint of the
    run, and return its meta; None on a fresh start.

    The run's folder in storage (cfg's storage_path and run_name) is scanned when the workers
    start, not Ray Train's record of the run taken as it is: Ray registers a checkpoint only when
    its controller takes the report, so a worker that dies soon after reporting leaves a newer
    checkpoint in storage that Ray's record lacks (per-step reports no longer come every step to
    push it through: see report_step), and a rank that dies during its upload leaves a registered
    checkpoint without that rank's shard. So rank 0 looks for the newest step whose every file
    arrived (complete_run_steps) and tells the other ranks, which then all load the same step even
    if storage changes while they look."""
    rank, _ = world_info()
    found = [latest_run_checkpoint(cfg["storage_path"], cfg["run_name"]) if rank == 0 else None]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(found, src=0, device=device)
    if found[0] is None:
        if ray.train.get_checkpoint() is not None:
            print0(f"no complete checkpoint of run {cfg['run_name']!r} in {cfg['storage_path']}: starting it from scratch")
        return None
    checkpoint = ray.train.Checkpoint(found[0][0])
    with checkpoint.as_directory() as folder:
        step = find_last_step(folder)
        model_state, optimizer_state, meta = load_checkpoint(folder, step, device, load_optimizer=True, rank=rank)
    model.load_state_dict(model_state, strict=True)
    optimizer.load_state_dict(optimizer_state)
    print0(f"resumed from checkpoint step {step} ({checkpoint.path})")
    return meta


def export_final_model(result: ray.train.Result, cfg: dict) -> str:
    """Copy a run's final checkpoint into <base>/<phase dir>/<model_tag>/ (nanochat.checkpoint's
    layout, phase cfg['phase'], 'base' by default), where the later stages look for it; returns
    that folder. The optimizer shards stay in the run's storage: later stages start their own."""
    with result.checkpoint.as_directory() as folder:
        step = find_last_step(folder)
        model_state, _, meta = load_checkpoint(folder, step, "cpu")
    target = checkpoint_dir(cfg.get("phase", "base"), cfg["model_tag"])
    keep = {k: v for k, v in meta.items() if k not in RESERVED_META_KEYS}
    save_checkpoint(target, step, model_state, keep, tokenizer_dir=cfg["tokenizer_dir"])
    return target


_STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_run_steps(filesystem: pyarrow.fs.FileSystem, run_dir: str):
    """(folder name, meta record) of each complete `step_*` checkpoint in a run's folder on
    `filesystem`, newest first. A step is complete when nanochat.checkpoint.check_step_files
    accepts it: meta, model file, tokenizer copy, and every rank's optimizer shard with its
    recorded size. An incomplete step (a crash or an upload cut short) is skipped with a line
    naming what is missing, so that a resume falls back to the step before instead of failing at
    every retry."""
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True))
    steps = sorted((int(match.group(1)), info.base_name) for info in infos
                   if info.type == pyarrow.fs.FileType.Directory and (match := _STEP_DIR.match(info.base_name)))
    for step, name in reversed(steps):
        try:
            meta = check_step_files(f"{run_dir}/{name}", step, filesystem)
        except CheckpointError as exc:
            print0(f"skipping incomplete checkpoint {name}: {exc}")
            continue
        yield name, meta


def latest_run_checkpoint(storage_path: str, run_name: str) -> tuple[str, dict] | None:
    """(path, meta record) of the newest complete `step_*` checkpoint of a run in storage (local
    path or any URI pyarrow understands; complete_run_steps), or None; the path is a URI where
    the storage is one."""
    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path) if "://" in storage_path else (
        pyarrow.fs.LocalFileSystem(), os.path.abspath(storage_path))
    run_dir = f"{root}/{run_name}"
    found = next(complete_run_steps(filesystem, run_dir), None)
    if found is None:
        return None
    name, meta = found
    path = f"{storage_path.rstrip('/')}/{run_name}/{name}" if "://" in storage_path else f"{run_dir}/{name}"
    return path, meta


def latest_run_checkpoint_meta(storage_path: str, run_name: str) -> dict | None:
    """The meta record of the newest checkpoint of a run in storage (latest_run_checkpoint), or None."""
    found = latest_run_checkpoint(storage_path, run_name)
    return found[1] if found else None


class TrainMetrics:
    """The trainer's live metrics: Ray metrics gauges (dashboard, Prometheus) on rank 0 and,
    with --run NAME, wandb. Gauges are tagged with the run name so runs can be told apart."""

    def __init__(self, run_name: str, prefix: str, wandb_run: str | None, config: dict):
        self.tags = {"run": run_name}
        self.prefix = prefix
        self.gauges: dict[str, ray_metrics.Gauge] = {}
        self.wandb = None
        if wandb_run:
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError("--run asks for wandb logging but wandb is not installed: "
                                   "pip install wandb, or leave --run out") from exc
            self.wandb = wandb.init(project="nanochat", name=wandb_run, config=config)

    def publish(self, step: int, values: dict) -> None:
        for key, value in values.items():
            if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
                continue
            if key not in self.gauges:
                self.gauges[key] = ray_metrics.Gauge(f"{self.prefix}_{key}", description=f"{self.prefix} {key}",
                                                     tag_keys=("run",))
            self.gauges[key].set(value, tags=self.tags)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class ProgressLine:
    """One line per step: step/total, loss, tokens/s, MFU, ETA (from the recent step times; the
    first step of a started or restarted run, which compiles and waits for the data pipeline,
    counts only until there are others)."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total = total_steps
        self.start_step = start_step
        self.smooth_loss = None
        self.step_times: list[float] = []

    def update(self, step: int, loss: float, step_seconds: float, tokens_per_second: float,
               mfu: float | None, extra: str = "") -> str:
        beta = 0.9
        self.smooth_loss = loss if self.smooth_loss is None else beta * self.smooth_loss + (1 - beta) * loss
        if step == self.start_step + 1 and self.step_times:
            self.step_times = []  # drop the warm-up step
        self.step_times = (self.step_times + [step_seconds])[-20:]
        eta = (self.total - step - 1) * sum(self.step_times) / len(self.step_times)
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        return (f"step {step + 1:5d}/{self.total} | loss {loss:.4f} (avg {self.smooth_loss:.4f}) | "
                f"{step_seconds * 1000:.0f} ms | {tokens_per_second:,.0f} tok/s | MFU {mfu_text} | "
                f"ETA {format_seconds(eta)}{extra}")


def report_step(record: dict, history: list, metrics: TrainMetrics | None, progress: ProgressLine) -> dict:
    """The end of a training step on every rank. `record` holds step, loss, step_seconds,
    tokens_per_second, data_wait_seconds and, where known, mfu. Rank 0 (the rank that holds
    `metrics`) keeps it in the run's history (saved with every checkpoint), publishes it as gauges
    and prints the progress line, every step. Every REPORT_EVERY_STEPS steps every rank also
    reports it to Ray Train: a report is a barrier across the workers (an actor round trip) and
    wakes the controller, work that per step took a measurable share of a small node's CPUs, and
    nothing reads Ray Train's copy of the per-step metrics more often than that.

    Returns what this took, {'gauge_seconds' (gauges and progress line), 'report_seconds'}, for
    the caller to keep with the step (bench_train's account of what Ray adds to a step)."""
    started = time.perf_counter()
    if metrics is not None:
        history.append(record)
        metrics.publish(record["step"], {k: v for k, v in record.items() if k != "time"})
        wait_share = record["data_wait_seconds"] / record["step_seconds"]
        print0(progress.update(record["step"] - 1, record["loss"], record["step_seconds"], record["tokens_per_second"],
                               record.get("mfu"), extra=f" | data wait {100 * wait_share:.1f}%"))
    published = time.perf_counter()
    if record["step"] % REPORT_EVERY_STEPS == 0:  # the same steps on every rank: a report is collective
        ray.train.report(record)
    return {"gauge_seconds": published - started, "report_seconds": time.perf_counter() - published}


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Stopwatch:
    """Accumulates wall time of one kind of work (e.g. waiting for data) within a step."""

    def __init__(self):
        self.total = 0.0
        self._start = None

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self._start

    def take(self) -> float:
        value, self.total = self.total, 0.0
        return value
