"""RL on Ray: rollout actors holding Engine replicas sample and score, a Ray Train learner updates.

    ray job submit --working-dir . -- python -m ray_jobs.chat_rl --model-tag d20 --task gsm8k

The recipe (nanochat.rl) is nanochat's on-policy "GRPO": rewards minus the group mean as
advantages, no KL, no ratio, no clip, and nanochat's normalisation: each pass of
--device-batch-size completions of a prompt is divided by its own sampled tokens, then by passes
x prompts. The way it runs:

    learner rank 0 --publish(weights, version)--> object store --load--> RolloutWorker actors
                   (or, --weight-sync collective)--> broadcast over a group of their own (NCCL / gloo)
    RolloutWorker actors --(tokens, masks, rewards, version)--> learner rank 0 --share--> all ranks

- `RolloutWorker` actors each hold an Engine replica (1 GPU each on a GPU cluster, a CPU share
  otherwise) in a SPREAD placement group, so they spread over the nodes. They are created and
  driven by `RolloutFleet`, which lives in the learner's rank 0.
- Each step rank 0 hands the step's prompts to all workers at once (a queue, two prompts in
  flight per worker); a worker samples `--num-samples` completions of a prompt with tool use,
  scores them with the task's reward and returns them with the weights version it used. The
  reward is 1 when the task's evaluation calls the answer right, with the task's default answer
  matching: nanochat's exact "####" comparison, the one chat_eval uses by default (and nanochat's
  RL), so a reward and an eval score mean the same; the config records it for the report.
- The learner is a TorchTrainer (data parallel): rank 0 shares the groups out over the ranks,
  every rank turns its groups into inputs, targets (-1 where the mask is 0) and advantages, and
  the distributed MuonAdamW steps (it averages the gradients itself).
- The other ranks wait for that share while rank 0 samples the step's rollouts (and, on
  evaluation steps, pass@k first): minutes on a GPU cluster, longer than the training process
  group's timeout allows (Ray Train's TorchConfig.timeout_s, 30 min; NCCL's watchdog kills a
  collective that waits past it). So the share goes through a gloo group of its own, over the
  CPUs, whose timeout is `--rollout-wait-s` (3 h by default: the worst case of one step's
  rollouts plus an evaluation, with room). No NCCL collective is ever left waiting on rank 0's
  sampling; the gradient all-reduces start when every rank is ready.
- After the step rank 0 publishes its weights as version step+1, one of two ways
  (ray_jobs.weight_sync, `--weight-sync`): into the object store once, a CPU copy every worker
  loads before its next prompt (the choice on CPUs), or broadcast from the live model in place into
  the workers' models over a process group of rank 0 (group rank 0) and the workers (ranks 1..N),
  built beside Ray Train's (the choice on GPUs: NCCL, GPU to GPU, no copy through host memory).
  The group keeps its generation while its members stay; a replaced worker is caught up by a
  broadcast over a new generation once it is up, and a worker that dies in a broadcast costs
  `--weight-sync-timeout-s` at most, then the living get the weights again. A worker reports
  the version it holds; a rollout whose version is not the learner's is rejected and sampled
  again with the current weights: an update never sees a stale rollout.
- A worker that dies (or whose node dies) is replaced in its placement-group bundle, its prompts
  go to the other workers, and the step completes; a sampled group depends only on the seed of
  (step, prompt), so it comes out the same whichever worker samples it.
- A learner rank that dies fails the learner: Ray Train restarts it (`--max-failures`) from the
  newest checkpoint, or the run stops for a `--resume`. Rank 0 owns the fleet, so its workers die
  with it; the new rank 0 starts a fleet of its own, first removing the placement group that a
  killed rank 0 left (a placement group outlives the actor that made it). The seeds make the
  resumed steps sample what an uninterrupted run samples.
- pass@k on the task's test split every `--eval-every` steps, sampled on the rollout workers.
- Checkpoints and `--resume` as in the other trainers (ray_jobs.train_common); metrics gauges for
  mean reward, pass@k, rollout tokens/s, sync seconds and version lag. The final model goes to
  <base>/chatrl_checkpoints/<model_tag>/ and the stage is recorded in the report.
"""

import argparse
import os
import sys
import time
from collections import Counter, deque
from datetime import timedelta

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.exceptions import RayError, RayTaskError
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nanochat.checkpoint import (PHASE_DIRS, CheckpointError, checkpoint_dir, find_largest_model, find_last_step,
                                 load_checkpoint)
from nanochat.common import print0
from nanochat.engine import Engine
from nanochat.files import get_base_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.report import Report
from nanochat.rl import group_seed, pass_at_k, policy_gradient_loss, rollout_rows, rows_to_batch, sample_group
from nanochat.tasks import get_task
from nanochat.tasks.common import DatasetDownloadError
from nanochat.tokenizer import Tokenizer
from ray_jobs.gpus import resolve_use_gpu
from ray_jobs.train_common import (Checkpointer, ProgressLine, TrainMetrics, add_run_flags, all_reduce, build_model,
                                   export_final_model, fit_trainer, latest_run_checkpoint_meta, previous_run,
                                   restore_from_checkpoint, start_worker)
from ray_jobs.weight_sync import (WEIGHT_SYNC_CHOICES, WeightStore, broadcast_tensors, collective_backend, join_group,
                                  open_store, receive_tensors, resolve_weight_sync, state_layout)

RL_TASKS = ("gsm8k", "arithmetic")
# Sizes of the generated task's splits (the real sets are used whole).
TASK_OPTIONS = {"arithmetic": {"train": {"size": 4000}, "test": {"size": 256}}}
# Prompts a worker holds at once: one sampling, one waiting, so it never idles on the dispatch.
IN_FLIGHT_PER_WORKER = 2
# Tries of one prompt within a step (worker deaths, stale weights) before the step gives up.
TRIES_PER_PROMPT = 4
# A broadcast member that has not answered for this many sync timeouts is taken as stuck and replaced.
STUCK_AFTER_TIMEOUTS = 2


def rl_tasks(name: str) -> dict:
    """{'train': Task, 'test': Task} of an RL task (one with a reward)."""
    if name not in RL_TASKS:
        raise ValueError(f"unknown RL task {name!r}: choose one of {', '.join(RL_TASKS)}")
    options = TASK_OPTIONS.get(name, {})
    return {split: get_task(name, split, **options.get(split, {})) for split in ("train", "test")}


# ----------------------------------------------------------------------------------------------
# Rollout workers


@ray.remote
class RolloutWorker:
    """One Engine replica. It samples with the weights it last loaded and says which version those are."""

    def __init__(self, model_config: dict, shared: dict, sampling: dict):
        # Ray hides the GPUs an actor did not ask for, so this is its own GPU or the CPU.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with torch.device("meta"):
            model = GPT(GPTConfig.from_dict(model_config))
        model.to_empty(device=device)  # every weight is replaced by load_weights before any sampling
        self.model = model.eval()
        self.engine = Engine(self.model, shared["tokenizer"])
        self.tasks = shared["tasks"]
        self.sampling = sampling
        self.version = None
        self.weight_store, self.weight_group, self.weight_generation = None, None, None

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def held_version(self) -> int | None:
        """The weights version it samples with (None before its first load or after a failed broadcast)."""
        return self.version

    def load_weights(self, version: int, weights: list) -> int:
        """Load published weights (`weights` is [ObjectRef], fetched only when the version is new)."""
        if version != self.version:
            self.model.load_state_dict(ray.get(weights[0]), strict=True)
            self.version = version
        return self.version

    def receive_weights(self, address: tuple, generation: int, rank: int, size: int, version: int, layout: list,
                        backend: str, timeout_s: float) -> int | None:
        """Receive `version` by broadcast from the learner as rank `rank` of generation `generation` of
        the weight group (ray_jobs.weight_sync), joining it first when it is a new one. Returns the
        version it then holds: `version`, or None when the broadcast failed (a member died, a
        timeout); its weights are a mix then, so it holds no version, and it drops the group."""
        state = self.model.state_dict()
        if state_layout(state) != layout:
            raise ValueError("the learner's weights differ from this rollout worker's model in names, shapes or dtypes")
        self.version = None
        try:
            if generation != self.weight_generation:
                self.weight_group = self.weight_generation = None
                if self.weight_store is None:
                    self.weight_store = open_store(address, timeout_s)
                self.weight_group = join_group(self.weight_store, generation, rank, size, backend, timeout_s)
                self.weight_generation = generation
            receive_tensors(self.weight_group, list(state.values()))
        except RuntimeError as exc:
            print(f"rollout worker: the broadcast of version {version} (group generation {generation}) failed, "
                  f"leaving the group: {exc}", flush=True)
            self.weight_group = self.weight_generation = None
            return None
        self.version = version
        return version

    def rollout(self, split: str, index: int, num_samples: int, seed: int) -> dict:
        group = sample_group(self.engine, self.tasks[split], index, num_samples, self.sampling["max_new_tokens"],
                             self.sampling["temperature"], self.sampling["top_k"], seed)
        return {**group, "version": self.version}

    def state_dict(self) -> dict:
        """The weights it samples with, on the CPU."""
        return {name: tensor.cpu() for name, tensor in self.model.state_dict().items()}


def _remove_left_placement_group(name: str) -> None:
    """Remove this job's placement group `name`, if there is one: the fleet of an earlier attempt
    of the run whose owner (the learner's rank 0) was killed before its `stop`. Its workers died
    with their owner, but a placement group lives as long as the job that made it, holding its
    resources."""
    try:
        left = get_placement_group(name)
    except ValueError:
        return  # none (a placement group that was removed is not found either)
    print0(f"removing the rollout placement group {name!r} that an earlier attempt of the run left")
    remove_placement_group(left)


# What RolloutFleet._answer returns for a call whose worker died.
_LOST = object()


class _Slot:
    """A placement-group bundle and the worker in it."""

    def __init__(self, bundle: int, actor):
        self.bundle, self.actor = bundle, actor
        self.version = None  # the weights version it holds
        self.loading = None  # its load_weights call in flight
        self.up = False  # it has started (a replacement takes no work before its first load)
        self.busy = 0  # prompts in flight on it

    def ready(self, version: int) -> bool:
        return self.up and self.loading is None and self.version == version


class RolloutFleet:
    """The rollout workers of a run: their placement group, the weights they sample with (through
    the object store or a broadcast, see ray_jobs.weight_sync), the dispatch of prompts, and the
    replacement of workers that die. A fleet with a `name` gives it to its placement group, and
    first removes one of that name that a fleet whose owner was killed left behind."""

    def __init__(self, num_workers: int, worker_args: tuple, num_cpus: float, num_gpus: float,
                 start_timeout_s: float = 300.0, stall_timeout_s: float = 900.0, weight_sync: str = "object-store",
                 sync_timeout_s: float = 300.0, name: str = ""):
        if weight_sync not in ("object-store", "collective"):
            raise ValueError(f"a fleet's weight sync is 'object-store' or 'collective', not {weight_sync!r}")
        self.worker_args, self.num_cpus, self.num_gpus = worker_args, num_cpus, num_gpus
        self.stall_timeout_s = stall_timeout_s
        self.weight_sync, self.sync_timeout_s = weight_sync, sync_timeout_s
        if name:
            _remove_left_placement_group(name)
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.placement_group = placement_group([dict(bundle) for _ in range(num_workers)], strategy="SPREAD",
                                               name=name)
        ready, _ = ray.wait([self.placement_group.ready()], timeout=start_timeout_s)
        if not ready:
            remove_placement_group(self.placement_group)
            raise RuntimeError(f"the cluster found no room for {num_workers} rollout workers of {bundle} each within "
                               f"{start_timeout_s:.0f}s (it has {ray.available_resources()} free): lower "
                               "--num-rollout-workers or --rollout-cpus/--rollout-gpus, or add nodes")
        self.slots = [_Slot(i, self._start(i)) for i in range(num_workers)]
        self.nodes = ray.get([slot.actor.node_id.remote() for slot in self.slots], timeout=start_timeout_s)
        for slot in self.slots:
            slot.up = True
        self.version = None
        self._weights = None  # object store: the published state dict
        # collective: the published tensors, the rendezvous store, the group and its members
        self._tensors, self._layout = [], []
        self._store = WeightStore(sync_timeout_s) if weight_sync == "collective" else None
        self.backend = collective_backend(num_gpus > 0)
        self.generation = 0  # of the weight group
        self._group, self._group_actors = None, []
        self._failed_rounds = 0
        self._loads: dict = {}  # ref -> (slot, actor)
        self._jobs: dict = {}  # ref -> (slot, actor, job index)
        self._queue: deque = deque()
        self._job_args: list = []
        self._results: dict = {}
        self._tries: Counter = Counter()
        self.stats = Counter()  # replaced, stale_rejected, failed_broadcasts

    def _start(self, bundle: int):
        strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=bundle)
        return RolloutWorker.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0,
                                     scheduling_strategy=strategy).remote(*self.worker_args)

    # -- weights

    def publish(self, state_dict: dict, version: int) -> None:
        """Make `state_dict` the weights of `version`. Object store: one CPU copy put into it.
        Collective: the tensors themselves, broadcast by the syncs (no copy), so the caller leaves
        them unchanged until it publishes the next version."""
        if self.weight_sync == "collective":
            if any(tensor.is_cuda != (self.backend == "nccl") for tensor in state_dict.values()):
                raise ValueError(f"a {self.backend} weight broadcast needs the learner's weights on "
                                 f"{'the GPU' if self.backend == 'nccl' else 'the CPU'}, like the rollout workers'")
            self._tensors = [tensor.detach() for tensor in state_dict.values()]
            self._layout = state_layout(state_dict)
        else:
            self._weights = ray.put({name: tensor.detach().cpu() for name, tensor in state_dict.items()})
        self.version = version

    def sync(self) -> None:
        """Have every running worker load the newest weights, and wait for them. A replacement that
        is still starting loads them as soon as it is up (collective: a broadcast of its own)."""
        if self.weight_sync == "collective":
            self._broadcast_to_behind()
            return
        for slot in self.slots:
            self._load_if_behind(slot)
        while any(slot.up and slot.loading is not None for slot in self.slots):
            self._pump()

    def _load_if_behind(self, slot: _Slot) -> None:
        if slot.loading is not None or slot.version == self.version:
            return
        if self.weight_sync == "object-store":
            slot.loading = slot.actor.load_weights.remote(self.version, [self._weights])
        elif not slot.up:
            slot.loading = slot.actor.held_version.remote()  # up when it answers; a broadcast catches it up
        else:
            return
        self._loads[slot.loading] = (slot, slot.actor)

    def _broadcast_to_behind(self) -> None:
        """Broadcast the weights to the idle workers that are up and behind, round after round: a
        round that fails (a member died or timed out) costs the dead their place, and the living
        are sent the weights again over a new generation of the group."""
        while True:
            behind = [slot for slot in self.slots
                      if slot.up and slot.loading is None and slot.busy == 0 and slot.version != self.version]
            if not behind:
                return
            self._broadcast_round(behind)

    def _broadcast_round(self, slots: list[_Slot]) -> None:
        """One broadcast to `slots`, over the current generation of the weight group when they are
        its members, else over a new generation."""
        actors = [slot.actor for slot in slots]
        if self._group is None or actors != self._group_actors:
            self._close_group(abort=False)
            self.generation += 1
            self._group_actors = actors
        size = len(slots) + 1
        refs = {slot.actor.receive_weights.remote(self._store.address, self.generation, rank, size, self.version,
                                                  self._layout, self.backend, self.sync_timeout_s): (slot, slot.actor)
                for rank, slot in enumerate(slots, start=1)}
        works, failure = [], None
        try:
            if self._group is None:
                self._group = join_group(self._store.store, self.generation, 0, size, self.backend,
                                         self.sync_timeout_s)
            works = broadcast_tensors(self._group, self._tensors)
        except RuntimeError as exc:
            failure = str(exc)
        failure = self._await_members(refs, works) or failure
        if failure is None:
            try:
                for work in works:
                    work.wait()
            except RuntimeError as exc:
                failure = str(exc)
        if failure is None:
            self._failed_rounds = 0
            return
        self._close_group(abort=True)
        self.stats["failed_broadcasts"] += 1
        self._failed_rounds += 1
        if self._failed_rounds >= TRIES_PER_PROMPT:
            raise RuntimeError(f"the weight broadcast failed {self._failed_rounds} times in a row (last: {failure}); "
                               "check that the nodes reach each other over TCP, or pass --weight-sync object-store")
        print0(f"weight broadcast of version {self.version} (group generation {self.generation}) failed: {failure}; "
               "trying again with a new generation")

    def _await_members(self, refs: dict, works: list) -> str | None:
        """Wait for the members of a broadcast; what went wrong, or None. A dead member is replaced;
        members that make no progress for STUCK_AFTER_TIMEOUTS sync timeouts are replaced as well
        (a living member's own collective times out after one and answers, so a cut-off of exactly
        one raced it and replaced healthy workers on a loaded machine)."""
        pending, failure = list(refs), None
        answered, progress, last = 0, -1, time.monotonic()
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                answered += 1
                slot, actor = refs[ref]
                version = self._answer(ref, slot, actor)
                if version is _LOST:
                    failure = failure or f"the rollout worker of bundle {slot.bundle} died"
                    continue
                if actor is slot.actor:
                    slot.version = version
                if version != self.version:
                    failure = failure or f"the rollout worker of bundle {slot.bundle} did not receive it (see its log)"
            completed = answered + sum(work.is_completed() for work in works)
            if completed > progress:
                progress, last = completed, time.monotonic()
            elif time.monotonic() - last > STUCK_AFTER_TIMEOUTS * self.sync_timeout_s:
                for ref in pending:
                    self._lost(*refs[ref])
                return (f"{len(pending)} rollout worker(s) made no progress for "
                        f"{STUCK_AFTER_TIMEOUTS * self.sync_timeout_s:.0f}s (replaced)")
        return failure

    def _close_group(self, abort: bool) -> None:
        """Drop the learner's member of the weight group; `abort` ends its transfers in flight."""
        if self._group is not None and abort:
            self._group.abort()
        self._group, self._group_actors = None, []

    # -- rollouts

    def run(self, jobs: list[tuple[str, int, int, int]]) -> list[dict]:
        """Sample every job (split, index, num_samples, seed) on the workers; returns the groups
        in job order, every one of them made with the weights of `self.version`."""
        if self.version is None:
            raise RuntimeError("publish weights before asking for rollouts")
        self._job_args, self._results, self._tries = list(jobs), {}, Counter()
        self._queue = deque(range(len(jobs)))
        while len(self._results) < len(jobs):
            self._dispatch()
            self._pump()
        return [self._results[i] for i in range(len(jobs))]

    def _dispatch(self) -> None:
        for slot in self.slots:
            self._load_if_behind(slot)
        if self.weight_sync == "collective":
            self._broadcast_to_behind()
        # Round by round, one prompt per ready worker, so that every worker gets work at once.
        while self._queue:
            ready = [slot for slot in self.slots if slot.ready(self.version) and slot.busy < IN_FLIGHT_PER_WORKER]
            if not ready:
                return
            for slot in ready:
                if not self._queue:
                    return
                job = self._queue.popleft()
                ref = slot.actor.rollout.remote(*self._job_args[job])
                self._jobs[ref] = (slot, slot.actor, job)
                slot.busy += 1

    def _pump(self) -> None:
        """Wait for the next answer of any worker and act on it."""
        pending = [*self._loads, *self._jobs]
        done, _ = ray.wait(pending, num_returns=1, timeout=self.stall_timeout_s)
        if not done:
            raise RuntimeError(f"no rollout worker answered for {self.stall_timeout_s:.0f}s (workers: "
                               f"{sum(slot.up for slot in self.slots)} up of {len(self.slots)}): a replacement "
                               "worker may not fit on the remaining nodes; check `ray status`")
        ref = done[0]
        if ref in self._loads:
            slot, actor = self._loads.pop(ref)
            version = self._answer(ref, slot, actor)
            if version is _LOST:
                return
            if actor is slot.actor:
                slot.loading, slot.version, slot.up = None, version, True
            return
        slot, actor, job = self._jobs.pop(ref)
        if actor is slot.actor:
            slot.busy -= 1
        group = self._answer(ref, slot, actor)
        if group is _LOST:
            self._retry(job)
            return
        if group["version"] != self.version:
            # Never train on it: the worker holds other weights; it reloads before its next prompt.
            self.stats["stale_rejected"] += 1
            if actor is slot.actor:
                slot.version = group["version"]
            self._retry(job)
            return
        self._results[job] = group

    def _answer(self, ref, slot: _Slot, actor):
        """What a worker's call returned, or _LOST when the worker died (it is replaced); an error
        raised by the call itself is raised here."""
        try:
            return ray.get(ref)
        except RayTaskError:
            raise
        except RayError:
            self._lost(slot, actor)
            return _LOST

    def _retry(self, job: int) -> None:
        self._tries[job] += 1
        if self._tries[job] >= TRIES_PER_PROMPT:
            raise RuntimeError(f"prompt {self._job_args[job][:2]} failed {self._tries[job]} times on rollout "
                               "workers (dead workers or stale weights); see the worker logs")
        self._queue.appendleft(job)

    def _lost(self, slot: _Slot, actor) -> None:
        """A worker died (or its node did): start a new one in its bundle; Ray moves the bundle of
        a dead node to a live one when there is room."""
        if actor is not slot.actor:
            return  # already replaced
        try:
            ray.kill(actor)
        except RayError:
            pass  # it is gone already
        slot.actor = self._start(slot.bundle)
        slot.version, slot.loading, slot.up, slot.busy = None, None, False, 0
        self.stats["replaced"] += 1
        self._load_if_behind(slot)

    def stop(self) -> None:
        self._close_group(abort=False)
        for slot in self.slots:
            ray.kill(slot.actor)
        remove_placement_group(self.placement_group)


# ----------------------------------------------------------------------------------------------
# The learner


def _evaluate(fleet: RolloutFleet, args, num_test: int) -> dict:
    """pass@1 and pass@k on the first --eval-examples test problems, sampled on the rollout workers
    (problem i always with the same seed, so evaluations differ only by the weights)."""
    count = min(args.eval_examples, num_test)
    groups = fleet.run([("test", i, args.eval_k, group_seed(args.seed + 1, 0, i)) for i in range(count)])
    scores = pass_at_k(groups)
    return {"pass_at_1": scores["pass@1"], "pass_at_k": scores["pass@k"]}


def train_loop_per_worker(config: dict) -> None:
    cfg, shared = config["cfg"], config["shared"]
    args = argparse.Namespace(**cfg["args"])
    rank, world, device = start_worker('learner workers')

    model = build_model(cfg["model_config"], device, seed=args.seed)
    source_state, _, _ = load_checkpoint(cfg["source_checkpoint_dir"], cfg["source_step"], device)
    model.load_state_dict(source_state, strict=True)
    del source_state
    frac = args.init_lr_frac
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * frac, embedding_lr=args.embedding_lr * frac,
                                      matrix_lr=args.matrix_lr * frac, scalar_lr=args.scalar_lr * frac,
                                      weight_decay=args.weight_decay)
    meta = restore_from_checkpoint(model, optimizer, device, cfg)
    start_step = meta["step"] if meta else 0
    history = meta["history"] if meta else []
    if meta:
        history.append({"step": start_step, "restored_from_checkpoint": True})
    num_steps = cfg["num_steps"]
    pad_id = Tokenizer.from_directory(cfg["tokenizer_dir"]).encode_special("<|assistant_end|>")
    # Wall time of the stage, continued across restarts.
    clock_start = time.time() - max((entry.get("time", 0.0) for entry in history), default=0.0)

    # The rollout share's own group and timeout (see the module docstring); new_group is collective.
    share_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.rollout_wait_s)) if world > 1 else None
    fleet, metrics = None, None
    if rank == 0:
        metrics = TrainMetrics(cfg["run_name"], "nanochat_rl", args.run, cfg)
        fleet = RolloutFleet(cfg["num_rollout_workers"],
                             (cfg["model_config"], shared,
                              {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                               "top_k": args.top_k or None}),
                             num_cpus=cfg["rollout_cpus"], num_gpus=cfg["rollout_gpus"],
                             weight_sync=cfg["weight_sync"], sync_timeout_s=args.weight_sync_timeout_s,
                             name=f"chat_rl_rollouts_{cfg['run_name']}")
        print0(f"{len(fleet.slots)} rollout workers on {len(set(fleet.nodes))} node(s)")
        fleet.publish(model.state_dict(), start_step)
        fleet.sync()
    progress = ProgressLine(num_steps, start_step)
    checkpointer = Checkpointer(cfg["tokenizer_dir"], device)
    eval_scores = {}
    try:
        for step in range(start_step, num_steps + 1):
            last_step = step == num_steps
            save_now = last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0)
            record = {"step": step}
            # (a resumed run has evaluated its first step before the checkpoint)
            eval_now = last_step or (args.eval_every > 0 and step % args.eval_every == 0
                                     and not (meta and step == start_step))
            if rank == 0 and eval_now:
                eval_scores = _evaluate(fleet, args, cfg["num_test"])
                record.update(eval_scores, time=time.time() - clock_start)
                history.append(record)
                metrics.publish(step, eval_scores)
                print0(f"step {step:5d} | pass@1 {eval_scores['pass_at_1']:.4f} | pass@{args.eval_k} "
                       f"{eval_scores['pass_at_k']:.4f} on {min(args.eval_examples, cfg['num_test'])} test problems")
            if save_now:
                # written before the next step: RL steps do not report in between
                checkpointer.save(record, step, model, optimizer,
                                  {"model_config": cfg["model_config"], "user_config": cfg["args"],
                                   "source_model": cfg["source_checkpoint_dir"], "history": history, **eval_scores},
                                  wait=True)
            if last_step:
                break
            if args.fail_at_step == step and not meta:
                # injected learner death (tests): a restart or --resume continues from the checkpoint
                checkpointer.crash_after_stored(cfg, rank, world, dying_rank=args.fail_rank)

            # --- rollouts: rank 0 has them sampled, then shares the groups out over the ranks
            payload = [None]
            if rank == 0:
                t0 = time.perf_counter()
                before = Counter(fleet.stats)
                prompts = [(step * args.examples_per_step + j) % cfg["num_train"]
                           for j in range(args.examples_per_step)]
                groups = fleet.run([("train", i, args.num_samples, group_seed(args.seed, step, i)) for i in prompts])
                rollout_s = time.perf_counter() - t0
                generated = sum(group["generated_tokens"] for group in groups)
                rewards = [reward for group in groups for reward in group["rewards"]]
                stats = {"mean_reward": sum(rewards) / len(rewards), "rollout_seconds": rollout_s,
                         "rollout_tokens_per_second": generated / rollout_s,
                         "version_lag": max(fleet.version - group["version"] for group in groups),
                         **{key: fleet.stats[key] - before[key] for key in ("stale_rejected", "replaced")}}
                payload = [{"shares": [groups[r::world] for r in range(world)], "stats": stats}]
            if world > 1:
                dist.broadcast_object_list(payload, src=0, group=share_group)
            my_groups, stats = payload[0]["shares"][rank], payload[0]["stats"]

            # --- the policy-gradient step
            t0 = time.perf_counter()
            lrm = 1.0 - step / num_steps
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
            # nanochat's passes of --device-batch-size completions; the optimizer averages over ranks
            rows = rollout_rows(my_groups, args.device_batch_size, args.examples_per_step / world)
            loss_sum = 0.0
            for start in range(0, len(rows), args.device_batch_size):
                inputs, targets, weights = rows_to_batch(rows[start:start + args.device_batch_size], pad_id, device)
                loss = policy_gradient_loss(model, inputs, targets, weights)
                loss.backward()
                loss_sum += float(loss.detach())
            optimizer.step()
            model.zero_grad(set_to_none=True)
            loss_value = all_reduce(loss_sum, device) / world
            update_s = time.perf_counter() - t0

            # --- weight sync: publish once; every rollout worker loads it or is sent it (--weight-sync)
            if rank == 0:
                t0 = time.perf_counter()
                fleet.publish(model.state_dict(), step + 1)
                fleet.sync()
                sync_s = time.perf_counter() - t0
                step_s = stats["rollout_seconds"] + update_s + sync_s
                record = {"step": step, "time": time.time() - clock_start, "reward": stats["mean_reward"],
                          "loss": loss_value, "lr_multiplier": lrm, "update_seconds": update_s,
                          "sync_seconds": sync_s, **stats}
                history.append(record)
                metrics.publish(step + 1, {k: v for k, v in record.items() if k not in ("step", "time", "reward")})
                print0(progress.update(step, loss_value, step_s, stats["rollout_tokens_per_second"], None,
                                       extra=f" | reward {stats['mean_reward']:.3f}"
                                             f" | rollout {stats['rollout_seconds']:.1f}s update {update_s:.1f}s"
                                             f" sync {sync_s:.2f}s | lag {stats['version_lag']}"
                                             f" stale {stats['stale_rejected']} replaced {stats['replaced']}"))
            else:
                record = {"step": step, "loss": loss_value, "update_seconds": update_s}
            ray.train.report(record)
    finally:
        if fleet is not None:
            fleet.stop()
        if metrics is not None:
            metrics.close()


# ----------------------------------------------------------------------------------------------
# The job


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="RL of a chat checkpoint on a task with a reward, on Ray")
    p.add_argument("--source", choices=["sft", "base", "rl"], default="sft", help="checkpoints to start from")
    p.add_argument("--model-tag", default=None, help="model to start from (default: the largest); also the output tag")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to start from (default: the last)")
    p.add_argument("--task", choices=RL_TASKS, default="gsm8k", help="gsm8k (downloaded) or arithmetic (offline)")
    p.add_argument("--num-steps", type=int, default=-1, help="optimizer steps (-1 = one pass over the train split)")
    p.add_argument("--examples-per-step", type=int, default=16, help="prompts per step")
    p.add_argument("--num-samples", type=int, default=16, help="completions per prompt (the group)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50, help="0 = the whole vocabulary")
    p.add_argument("--device-batch-size", type=int, default=8,
                   help="completions per forward/backward of the learner, and nanochat's pass: the loss divides each "
                        "pass of this many completions of a prompt by its own sampled tokens")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="learning rates are this fraction of the base ones")
    p.add_argument("--eval-every", type=int, default=60,
                   help="pass@k every N steps and at the end (-1 = only at the end)")
    p.add_argument("--eval-examples", type=int, default=400, help="test problems per evaluation")
    p.add_argument("--eval-k", type=int, default=8, help="samples per test problem (the k of pass@k)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-workers", type=int, default=1, help="learner workers (Ray Train, one per GPU)")
    p.add_argument("--rollout-wait-s", type=float, default=3 * 3600.0,
                   help="how long the other learner ranks wait for rank 0's rollouts of a step (and its evaluation)")
    p.add_argument("--num-rollout-workers", type=int, default=-1,
                   help="rollout actors (-1 = one per GPU the learner leaves free, or 2 without GPUs)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per learner worker without GPUs")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="GPUs per learner worker")
    p.add_argument("--rollout-cpus", type=float, default=-1.0,
                   help="CPUs per rollout actor (-1 = 1 with GPUs, else a share of the CPUs the learner leaves)")
    p.add_argument("--rollout-gpus", type=float, default=-1.0, help="GPUs per rollout actor (-1 = 1 with GPUs, else 0)")
    p.add_argument("--weight-sync", choices=WEIGHT_SYNC_CHOICES, default="auto",
                   help="how the learner's weights reach the rollout actors: a broadcast over a process group of "
                        "their own (collective: NCCL on GPUs, gloo on CPUs) or the object store; auto = collective "
                        "when the learner and the rollout actors are on GPUs, else object-store")
    p.add_argument("--weight-sync-timeout-s", type=float, default=300.0,
                   help="how long a weight broadcast waits for a rollout actor before replacing it")
    add_run_flags(p, "rl", save_every=60)
    # fault injection for tests: the learner rank that dies (-1 the last, 0 the fleet's owner) and the step
    p.add_argument("--fail-at-step", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--fail-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("examples_per_step", "num_samples", "max_new_tokens", "device_batch_size", "eval_examples", "eval_k",
                 "num_workers", "keep_last"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.num_samples < 2:
        p.error("--num-samples must be at least 2: advantages are rewards minus the mean of a prompt's samples, "
                "so a single sample never teaches anything")
    if args.num_steps == 0 or args.num_steps < -1:
        p.error(f"--num-steps must be positive or -1, got {args.num_steps}")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0 (RL needs sampled completions), got {args.temperature}")
    if args.top_k < 0 or args.max_failures < 0 or args.init_lr_frac < 0:
        p.error("--top-k, --max-failures and --init-lr-frac must be 0 or more")
    if args.num_rollout_workers == 0 or args.num_rollout_workers < -1:
        p.error(f"--num-rollout-workers must be positive or -1, got {args.num_rollout_workers}")
    if args.rollout_wait_s <= 0:
        p.error(f"--rollout-wait-s must be a positive number of seconds, got {args.rollout_wait_s:g}")
    if args.weight_sync_timeout_s <= 0:
        p.error(f"--weight-sync-timeout-s must be a positive number of seconds, got {args.weight_sync_timeout_s:g}")
    return args


def resolve_config(args: argparse.Namespace) -> tuple[dict, dict]:
    """(config, shared): what the learner needs, as one JSON-able dict, and what every rollout
    worker gets through the object store (the tokenizer and the task splits)."""
    model_tag = args.model_tag or find_largest_model(os.path.join(get_base_dir(), PHASE_DIRS[args.source]))
    source_dir = checkpoint_dir(args.source, model_tag)
    source_step = args.step if args.step is not None else find_last_step(source_dir)
    _, _, meta = load_checkpoint(source_dir, source_step, "cpu")
    tokenizer_dir = os.path.join(source_dir, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise CheckpointError(f"the {args.source} checkpoint in {source_dir} carries no tokenizer: save it with one")
    tasks = rl_tasks(args.task)
    num_train = len(tasks["train"])
    num_steps = args.num_steps if args.num_steps > 0 else max(1, num_train // args.examples_per_step)

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = resolve_use_gpu(args.use_gpu)
    rollout_gpus = args.rollout_gpus if args.rollout_gpus >= 0 else (1.0 if use_gpu else 0.0)
    num_rollout = args.num_rollout_workers
    if num_rollout < 0:
        free_gpus = cluster_gpus - args.num_workers * args.gpus_per_worker if use_gpu else 0
        num_rollout = max(1, int(free_gpus // rollout_gpus)) if rollout_gpus > 0 else 2
    rollout_cpus = args.rollout_cpus
    if rollout_cpus <= 0:
        if rollout_gpus > 0:
            rollout_cpus = 1.0
        else:
            # Logical CPUs only schedule: rollouts and updates take turns on the same cores.
            learner_cpus = 0 if use_gpu else args.num_workers * args.cpus_per_worker
            left = ray.cluster_resources().get("CPU", 0) - learner_cpus
            if left <= 0:
                raise ValueError(f"the learner's {args.num_workers} worker(s) hold all {learner_cpus:g} CPUs of the "
                                 "cluster, none is left for rollout workers: lower --cpus-per-worker or pass "
                                 "--rollout-cpus")
            rollout_cpus = min(1.0, left / num_rollout)
    weight_sync = resolve_weight_sync(args.weight_sync, use_gpu, rollout_gpus > 0)
    cfg = {
        "args": vars(args), "model_tag": model_tag, "run_name": args.run_name or f"rl_{model_tag}",
        "storage_path": args.storage_path or os.path.join(get_base_dir(), "ray_runs"),
        "source_checkpoint_dir": source_dir, "source_step": source_step, "model_config": meta["model_config"],
        "tokenizer_dir": tokenizer_dir, "num_steps": num_steps, "num_train": num_train,
        "num_test": len(tasks["test"]), "use_gpu": use_gpu, "num_rollout_workers": num_rollout,
        "rollout_cpus": rollout_cpus, "rollout_gpus": rollout_gpus, "weight_sync": weight_sync,
        "answer_matching": getattr(tasks["train"], "answer_matching", None),  # None: a task without "####" answers
    }
    return cfg, {"tokenizer": Tokenizer.from_directory(tokenizer_dir), "tasks": tasks}


def main(argv=None) -> dict:
    """Train; returns {'checkpoint_dir', 'run_path', 'config', 'history', 'mean_reward', 'pass@k'}."""
    args = parse_args(argv)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    started = time.time()
    try:
        cfg, shared = resolve_config(args)
        print0("resolved config: " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("args", "model_config")))
        previous_run(cfg, args)
    except (CheckpointError, DatasetDownloadError, ValueError) as exc:
        print(f"chat_rl: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    rollout_bundles = tuple({"GPU": cfg["rollout_gpus"], "CPU": cfg["rollout_cpus"]}
                            for _ in range(cfg["num_rollout_workers"])) if cfg["rollout_gpus"] > 0 else ()
    result = fit_trainer("chat_rl", train_loop_per_worker, {"cfg": cfg, "shared": ray.put(shared)}, cfg, args,
                         {"GPU": args.gpus_per_worker} if cfg["use_gpu"] else {"CPU": args.cpus_per_worker},
                         extra_gpu_bundles=rollout_bundles)
    exported = export_final_model(result, {**cfg, "phase": "rl"})
    print0(f"final model exported to {exported}")
    meta = latest_run_checkpoint_meta(cfg["storage_path"], cfg["run_name"])
    history = meta["history"]
    steps = [entry for entry in history if "reward" in entry]
    totals = {f"{kind}_s": sum(entry[f"{kind}_seconds"] for entry in steps) for kind in ("rollout", "update", "sync")}
    # the reward of the last step's rollouts, and pass@1 / pass@k (k = --eval-k) of the final weights
    final = {"mean_reward": steps[-1]["reward"] if steps else None, "pass@1": meta.get("pass_at_1"),
             "pass@k": meta.get("pass_at_k")}
    print0(f"chat_rl: {len(steps)} steps | last step's mean reward {final['mean_reward']} | pass@1 "
           f"{final['pass@1']} pass@{args.eval_k} {final['pass@k']} | rollout {totals['rollout_s']:.0f}s update "
           f"{totals['update_s']:.0f}s sync {totals['sync_s']:.1f}s")
    Report().log_stage("chat_rl", source="rl",
                       config={k: v for k, v in cfg.items() if k != "model_config"},
                       timings={"wall_s": time.time() - started, **totals},
                       metrics={k: v for k, v in final.items() if v is not None}, history=history)
    return {"checkpoint_dir": exported, "run_path": result.path, "config": cfg, "history": history, **final}


if __name__ == "__main__":
    main()
