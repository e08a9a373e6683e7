"""The Ray Train machinery every trainer shares (base_train, chat_sft, chat_rl).

- building the GPT on the worker's device, CPU threads per worker, and torch.compile when asked;
- the device's peak FLOP/s for MFU: the GPU's datasheet number, or on CPU the measured matmul rate;
- checkpoints through `ray.train.report(checkpoint=...)`: each rank writes its optimizer shard,
  rank 0 the weights, the meta record and the tokenizer copy, in nanochat.checkpoint's layout,
  from a copy in host memory in a background thread (Checkpointer), and Ray merges the ranks'
  folders into one checkpoint in the run's storage path;
- restoring from the newest complete checkpoint of the run (after `--resume` or a worker failure):
  a step counts only when every rank's optimizer shard arrived (nanochat.checkpoint.check_step_files),
  and exporting a run's final checkpoint to the base dir for the next stage;
- the Ray Train settings that keep per-step reports cheap and a worker's output to one line
  per print;
- metrics: `ray.util.metrics` gauges for the Ray dashboard / Prometheus, plus optional wandb;
- the one-line-per-step progress report.
"""

import base64
import copy
import hashlib
import logging
import math
import argparse
import os
import re
import shutil
import sys
import tempfile
import threading
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
                                 find_last_step, load_checkpoint, load_optimizer_shard, optimizer_shard_rank,
                                 save_checkpoint, verify_model_file)
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


# Ray placement group strategies for a trainer's workers (ScalingConfig(placement_strategy)).
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

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
    # The optimizer state is sharded over the ranks that saved it (nanochat.optim refuses it at
    # another world size): without this check every worker would fail at its load, and each of
    # the --max-failures restarts again, before the run stopped.
    shards = previous.get("optimizer_shards", 0) if previous is not None else 0
    if shards and shards != args.num_workers:
        raise ValueError(f"run {cfg['run_name']!r} was trained by {shards} workers, whose optimizer state is sharded "
                         f"over them (step {previous['step']}): resume it with --num-workers {shards}, or start "
                         f"a new run with --run-name NEW")
    return previous


def fit_trainer(stage: str, train_loop, loop_config: dict, cfg: dict, args: argparse.Namespace,
                resources_per_worker: dict | None, extra_gpu_bundles: tuple[dict, ...] = (),
                placement_strategy: str = "PACK", **trainer_kwargs) -> ray.train.Result:
    """Run a trainer's `TorchTrainer` with the settings all trainers share (RAY_TRAIN_ENV, the run's
    name and storage, keep the last --keep-last checkpoints, --max-failures restarts, quiet logs);
    the workers are placed by `placement_strategy` (PLACEMENT_STRATEGIES), and `trainer_kwargs` go
    to the TorchTrainer (datasets). A GPU run first reserves its workers' GPUs
    and `extra_gpu_bundles` (ray_jobs.gpus.reserve_gpus: the autoscaler is asked for them, and a
    run that cannot have them within --gpu-wait-s stops with a message instead of waiting forever
    or falling back to CPUs). A run that fails beyond its restarts ends the process with one line
    that says where its checkpoints are and how to resume."""
    if cfg["use_gpu"]:
        worker = resources_per_worker or {"CPU": 1, "GPU": 1}  # Ray Train's default for a GPU worker
        try:
            reserve_gpus([worker] * args.num_workers + list(extra_gpu_bundles), args.gpu_wait_s, stage,
                         strategy=placement_strategy)
        except GPUsUnavailableError as exc:
            print(f"{stage}: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
    set_ray_train_env()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=cfg["use_gpu"],
                                     resources_per_worker=resources_per_worker, placement_strategy=placement_strategy),
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


def maybe_compile(model: torch.nn.Module, optimizer: torch.optim.Optimizer, mode: str,
                  device: torch.device) -> torch.nn.Module:
    """torch.compile per --compile ('on', 'off', or 'auto'): the model returned, and the optimizer's
    update math (MuonAdamW.compile_step) in place.

    'auto' compiles on CUDA, and on CPU when a C++ compiler is installed (Inductor generates C++
    there): bench_train measured the compiled d2 model 1.9x faster per step than eager on 2 CPUs,
    for about 20 s of compilation on a cold cache (a few seconds once Inductor's cache holds it),
    so it pays from about 100 steps. Evaluation and sampling use the eager model (their shapes vary)."""
    compiler_found = any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "c++", "clang++"))
    if mode == "on" or (mode == "auto" and (device.type == "cuda" or compiler_found)):
        optimizer.compile_step()
        return torch.compile(model, dynamic=False)  # GPT() has chosen its attention kernel already
    return model


def world_info() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def local_rank() -> int:
    """This worker's rank among the workers of its node."""
    return ray.train.get_context().get_local_rank()


def worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (a collective: every rank calls it; on CUDA
    after start_worker has made the rank's device current, which NCCL's gather uses)."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [node]
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


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


def host_copy(state, into=None):
    """A copy of a (nested) state dict whose tensors live in host memory and share nothing with the
    live ones, so training can go on changing its weights while the copy is written. Given `into`,
    an earlier copy of a state of the same structure whose write has finished, its tensors are
    filled in place: fresh host memory costs a page fault per page on its first touch, which for a
    d20 state made the copy 4.5 s instead of 0.8 s (bench_checkpoint). Copies of CUDA tensors go to
    pinned memory, which the GPU copies into at the full rate of the link."""
    if isinstance(state, torch.Tensor):
        if isinstance(into, torch.Tensor) and into.shape == state.shape and into.dtype == state.dtype:
            return into.copy_(state.detach())
        return state.detach().to("cpu", copy=True).pin_memory() if state.is_cuda else state.detach().clone()
    if isinstance(state, dict):
        into = into if isinstance(into, dict) else {}
        return {key: host_copy(value, into.get(key)) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        into = into if isinstance(into, (list, tuple)) and len(into) == len(state) else [None] * len(state)
        return type(state)(host_copy(value, old) for value, old in zip(state, into))
    return copy.deepcopy(state)


class BackgroundSave:
    """One rank's part of a checkpoint, written to a fresh local folder by a thread from a copy in
    host memory: the caller stalls only for the copy. `done()` says whether the files are all on
    disk (meta last, atomic files: a folder whose write was cut short never loads), `wait()`
    joins the thread and raises what the write raised."""

    def __init__(self, step: int, model_state: dict | None, optimizer_state: dict, meta: dict | None, rank: int,
                 world: int, tokenizer_dir: str | None):
        self.step = step
        self.folder = tempfile.mkdtemp(prefix="nanochat_ckpt_")
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, name=f"checkpoint-{step}", daemon=True,
                                       args=(model_state, optimizer_state, meta, rank, world, tokenizer_dir))
        self.thread.start()

    def _write(self, model_state, optimizer_state, meta, rank, world, tokenizer_dir) -> None:
        try:
            save_checkpoint(self.folder, self.step, model_state, meta, optimizer_state=optimizer_state, rank=rank,
                            tokenizer_dir=tokenizer_dir, world_size=world)
        except BaseException as exc:  # handed to the training thread by wait()
            self.error = exc

    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self) -> str:
        """The folder, once written; re-raises the write's error in the caller's thread."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.folder


class Checkpointer:
    """Checkpoints through `ray.train.report(checkpoint=...)` that stall training only for a copy
    of the state to host memory. Every rank calls `save` at the same step: rank 0 snapshots the
    weights, the meta record and the tokenizer copy, every rank its optimizer shard, in
    nanochat.checkpoint's layout, and a thread writes them to a local folder. At the end of each
    later step (report_step) the ranks agree whether all their writes are done (one scalar
    all-reduce, only while a save is pending), and then report the folder to Ray Train, which
    uploads it to the run's storage in its own background thread
    (CheckpointUploadMode.ASYNC), deletes the local folder and registers the checkpoint; until
    then the step is incomplete in storage and a resume never picks it (complete_run_steps).

    At most one save is in flight: a save, and the end of the run (`finish`), first wait for the
    previous one and report it. With `wait=True` (the run's last step) the save is written and
    reported before `save` returns. The host copies are kept and filled again by the next save.
    bench_checkpoint measures the stall for a d20-sized state, against saving in the step."""

    def __init__(self, tokenizer_dir: str | None, device: torch.device):
        self.tokenizer_dir, self.device = tokenizer_dir, device
        self.pending: tuple[BackgroundSave, dict] | None = None
        self.reported_step: int | None = None
        self.host_states: tuple[dict | None, dict | None] = (None, None)

    def crash_after_stored(self, cfg: dict, rank: int, world: int, timeout_s: float = 120.0,
                           dying_rank: int = -1) -> None:
        """Fault injection (tests' --fail-at-step): every rank reports the pending save, then one
        rank (`dying_rank`, counted from the end when negative: the last by default) waits until
        the newest reported step is complete in storage (Ray Train uploads in the background) and
        dies, so that a restart has that checkpoint to go on from."""
        self.finish()
        if rank != dying_rank % world:
            return
        deadline = time.monotonic() + timeout_s
        while self.reported_step is not None and time.monotonic() < deadline:
            found = latest_run_checkpoint(cfg["storage_path"], cfg["run_name"])
            if found and found[1]["step"] >= self.reported_step:
                break
            time.sleep(0.05)
        os._exit(1)

    def save(self, metrics: dict, step: int, model: GPT, optimizer, meta: dict, wait: bool = False) -> None:
        self.finish()
        rank, world = world_info()
        # the previous save's host copies are written out by now: fill them again
        model_state, optimizer_state = self.host_states
        model_state = host_copy(model.state_dict(), model_state) if rank == 0 else None
        optimizer_state = host_copy(optimizer.state_dict(), optimizer_state)
        self.host_states = (model_state, optimizer_state)
        write = BackgroundSave(step, model_state, optimizer_state, copy.deepcopy(meta) if rank == 0 else None,
                               rank, world, self.tokenizer_dir if rank == 0 else None)
        self.pending = (write, dict(metrics))
        if wait:
            self.finish()

    def report_if_written(self) -> bool:
        """At a report step of every rank: report the pending save if every rank's write is done."""
        if self.pending is None or all_reduce(float(self.pending[0].done()), self.device, op=dist.ReduceOp.MIN) < 1:
            return False
        self.finish()
        return True

    def finish(self) -> None:
        """Wait for the pending save, if any, and report it (a collective: every rank calls it)."""
        if self.pending is None:
            return
        write, metrics = self.pending
        self.pending = None
        self.reported_step = write.step
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(write.wait()),
                         checkpoint_dir_name=f"step_{write.step:06d}",
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)


def restore_from_checkpoint(model: GPT, optimizer, device: torch.device, cfg: dict) -> dict | None:
    """Load weights and this rank's optimizer shard from the newest complete checkpoint of the
    run, and return its meta, with 'model_verifications': the number of ranks that hashed the
    model file (one per node); None on a fresh start.

    The run's folder in storage (cfg's storage_path and run_name) is scanned when the workers
    start, not Ray Train's record of the run taken as it is: Ray registers a checkpoint only when
    its controller takes the report, so a worker that dies soon after reporting leaves a newer
    checkpoint in storage that Ray's record lacks (per-step reports no longer come every step to
    push it through: see report_step), and a rank that dies during its upload leaves a registered
    checkpoint without that rank's shard. So rank 0 looks for the newest step whose every file
    arrived (complete_run_steps) and tells the other ranks, which then all load the same step even
    if storage changes while they look.

    Once per node, not once per rank: the first rank of each node copies the shared files (meta,
    model, tokenizer copy) from remote storage into a folder on the node (node_checkpoint_folder)
    and hashes the model file against its meta; every rank copies only its own optimizer shard.
    On a filesystem the node mounts (a local path, NFS) the files are read in place. For d20
    that is one read and one hash of a 2 GB model per node, where every rank used to download
    the whole checkpoint (9 GB with all the optimizer shards) and hash the model itself."""
    rank, _ = world_info()
    found = [latest_run_checkpoint(cfg["storage_path"], cfg["run_name"]) if rank == 0 else None]
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        dist.broadcast_object_list(found, src=0, device=device)
    if found[0] is None:
        if ray.train.get_checkpoint() is not None:
            print0(f"no complete checkpoint of run {cfg['run_name']!r} in {cfg['storage_path']}: starting it from scratch")
        return None
    path = found[0][0]
    node_leader = local_rank() == 0
    filesystem, storage_dir = storage_filesystem(path)
    folder, copied = node_checkpoint_folder(filesystem, storage_dir, rank, node_leader)
    step = find_last_step(folder)
    failure = None
    if node_leader:
        try:
            verify_model_file(folder, step)
        except CheckpointError as exc:
            failure = exc
    # Every rank learns whether a node's copy failed (and no rank reads the model before its node's
    # hash is checked): the reduction is also the barrier.
    failed, verifications = all_reduce(float(failure is not None), device), all_reduce(float(node_leader), device)
    if failed:
        raise failure or CheckpointError(f"the model file of {path} failed its check on another node")
    model_state, optimizer_state, meta = load_checkpoint(folder, step, device, load_optimizer=True, rank=rank,
                                                         model_verified=True)
    model.load_state_dict(model_state, strict=True)
    optimizer.load_state_dict(optimizer_state)
    if copied:
        if distributed:
            dist.barrier()  # the node's ranks have all read the shared files
        if node_leader:
            shutil.rmtree(folder, ignore_errors=True)
    print0(f"resumed from checkpoint step {step} ({path}); the model was hashed on {int(verifications)} node(s)")
    return {**meta, "model_verifications": int(verifications)}


def storage_filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path on it) of storage given as a local path or a URI pyarrow understands."""
    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)


def node_checkpoint_folder(filesystem: pyarrow.fs.FileSystem, storage_dir: str, rank: int,
                           node_leader: bool) -> tuple[str, bool]:
    """(a folder this node reads a checkpoint from, whether it is a copy to remove after loading).

    A local filesystem is read in place. From any other (S3, GCS, ...) the node's leader copies
    the files every rank reads, and each rank copies only its own optimizer shard and record,
    into one folder per checkpoint under the node's temp dir."""
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return storage_dir, False
    folder = os.path.join(tempfile.gettempdir(), "nanochat_restore",
                          hashlib.sha256(storage_dir.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(storage_dir)):
        directory = info.type == pyarrow.fs.FileType.Directory  # the tokenizer copy
        shard_rank = None if directory else optimizer_shard_rank(info.base_name)
        # what every rank reads (meta, model, tokenizer copy) comes through the node's leader
        if (node_leader if shard_rank is None else shard_rank == rank):
            target = os.path.join(folder, info.base_name)
            if directory:
                os.makedirs(target, exist_ok=True)
            pyarrow.fs.copy_files(info.path, target, source_filesystem=filesystem,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
    return folder, True


def export_final_model(result: ray.train.Result, cfg: dict) -> str:
    """Copy a run's final checkpoint into <base>/<phase dir>/<model_tag>/ (nanochat.checkpoint's
    layout, phase cfg['phase'], 'base' by default), where the later stages look for it; returns
    that folder. A base model keeps every rank's optimizer shard, as nanochat's base_train does:
    chat_sft warm-starts its optimizer from them (--load-optimizer). SFT and RL models leave
    theirs in the run's storage, since no later stage reads them."""
    phase = cfg.get("phase", "base")
    target = checkpoint_dir(phase, cfg["model_tag"])
    with result.checkpoint.as_directory() as folder:
        step = find_last_step(folder)
        model_state, _, meta = load_checkpoint(folder, step, "cpu")
        keep = {k: v for k, v in meta.items() if k not in RESERVED_META_KEYS}
        shards = meta.get("optimizer_shards", 0) if phase == "base" else 0
        # Rank 0 last: its save writes the meta, which makes the step visible with all its shards.
        for rank in reversed(range(shards)):
            save_checkpoint(target, step, model_state if rank == 0 else None, keep if rank == 0 else None,
                            optimizer_state=load_optimizer_shard(folder, step, rank, "cpu"), rank=rank,
                            tokenizer_dir=cfg["tokenizer_dir"], world_size=shards)
    if not shards:
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
    filesystem, root = storage_filesystem(storage_path)
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


def report_step(record: dict, history: list, metrics: TrainMetrics | None, progress: ProgressLine,
                checkpointer: Checkpointer | None = None) -> dict:
    """The end of a training step on every rank. `record` holds step, loss, step_seconds,
    tokens_per_second, data_wait_seconds and, where known, mfu. Rank 0 (the rank that holds
    `metrics`) keeps it in the run's history (saved with every checkpoint), publishes it as gauges
    and prints the progress line, every step. Every REPORT_EVERY_STEPS steps every rank also
    reports it to Ray Train: a report is a barrier across the workers (an actor round trip) and
    wakes the controller, work that per step took a measurable share of a small node's CPUs, and
    nothing reads Ray Train's copy of the per-step metrics more often than that. A checkpoint
    whose background write every rank has finished is reported at the first step after.

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
    if checkpointer is not None:
        checkpointer.report_if_written()
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
