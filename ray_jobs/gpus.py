"""Deciding whether a job runs on GPUs, and securing them before it starts.

On an autoscaling cluster, `ray.cluster_resources()` shows only the nodes that are up: with no GPU
node up yet (or one of the sixteen a run needs), a decision taken from it silently trains on CPUs,
and since nothing then asks for GPUs the autoscaler never adds the nodes. Two rules fix that:

- `--use-gpu auto` means GPUs when the cluster has them now OR its autoscaler can add nodes that
  have them (the autoscaler publishes the most of each resource its node types can provide);
  `on` and `off` are the user's word. The GPU presets of the speedrun pass `on`.
- A job that runs on GPUs first reserves them: a placement group of one {"GPU": n} bundle per
  worker, which the autoscaler sees as demand and scales up for. When the group is not placed
  within `--gpu-wait-s`, the job stops with a message that says how many GPUs it asked for and
  what the cluster has; it never falls back to CPUs. Once placed the group is released at once:
  the trainer's own worker group (Ray Train makes its own placement group) takes the nodes, which
  the autoscaler keeps while they are busy.
- An eval job's actor pool (base_eval, chat_eval) takes what can be reserved: Serve replicas or
  another job may hold some of the GPUs for hours, and actors asked for beyond the free ones would
  wait for them forever. `actor_pool` places one bundle per actor, halving the count when the
  group cannot be placed within POOL_TRY_WAIT_S, and gives the job only the actors that answered
  their readiness call. The group is kept while the actors live, and removed with them.

Only Ray is imported here, so the Serve ingress can use it too.
"""

from contextlib import contextmanager

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

DEFAULT_GPU_WAIT_S = 600.0  # long enough for a cloud autoscaler to start GPU nodes
# How long an actor pool waits for each size above one actor before halving: a group that fits in
# the free resources is placed in well under a second.
POOL_TRY_WAIT_S = 5.0


def cluster_can_have_gpus() -> bool:
    """Whether the cluster has GPUs, or its autoscaler may add nodes that have them."""
    if not ray.is_initialized():
        return False
    if ray.cluster_resources().get("GPU", 0) > 0:
        return True
    most = ray._private.state.state.get_max_resources_from_cluster_config()
    return bool(most and most.get("GPU", 0) > 0)


def add_gpu_flags(parser, what: str) -> None:
    """--use-gpu and --gpu-wait-s, as every job that can run on GPUs takes them; `what` names the
    job's GPU users in the help ("train workers", "eval actors")."""
    parser.add_argument("--use-gpu", choices=["auto", "on", "off"], default="auto",
                        help=f"GPU {what}: auto = when the cluster has GPUs or its autoscaler can add them")
    parser.add_argument("--gpu-wait-s", type=float, default=DEFAULT_GPU_WAIT_S,
                        help="how long to wait for the GPUs (autoscaling) before failing with a clear message")


def resolve_use_gpu(flag: str) -> bool:
    """--use-gpu on / off / auto (auto: cluster_can_have_gpus)."""
    if flag not in ("auto", "on", "off"):
        raise ValueError(f"--use-gpu must be auto, on or off, not {flag!r}")
    return cluster_can_have_gpus() if flag == "auto" else flag == "on"


class GPUsUnavailableError(RuntimeError):
    """The GPUs a job asked for could not be had in time."""


def reserve_gpus(bundles: list[dict[str, float]], timeout_s: float, what: str, strategy: str = "PACK") -> None:
    """Wait until the cluster can place all of `bundles` (resource dicts, e.g. one {"GPU": 1,
    "CPU": 1} per train worker) at once, placed by `strategy` as the trainer will place them,
    asking the autoscaler for them; raise GPUsUnavailableError after `timeout_s` seconds. The
    reservation is released before returning (see the module note)."""
    group = placement_group([dict(bundle) for bundle in bundles], strategy=strategy,
                            name=f"nanochat-gpu-reservation-{what}")
    try:
        ready = group.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(group)
    if not ready:
        raise GPUsUnavailableError(shortfall(what, bundles, "worker", timeout_s)
                                   + ". Lower --num-workers, wait longer with --gpu-wait-s, or pass --use-gpu off "
                                   "to run on CPUs")


def shortfall(what: str, bundles: list[dict[str, float]], unit: str, timeout_s: float) -> str:
    """'<what> asked for ... and the cluster could not provide them within ... s: it has ...'."""
    wanted = sum(bundle.get("GPU", 0) for bundle in bundles)
    if not wanted:  # a CPU pool
        cpus = sum(bundle.get("CPU", 0) for bundle in bundles)
        return (f"{what} asked for {cpus:g} CPU(s) ({len(bundles)} {unit}(s)) and the cluster could not provide "
                f"them within {timeout_s:g} s: it has {ray.cluster_resources().get('CPU', 0):g} CPU(s), "
                f"{ray.available_resources().get('CPU', 0):g} free now")
    most = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    return (f"{what} asked for {wanted:g} GPU(s) ({len(bundles)} {unit}(s)) and the cluster could not provide them "
            f"within {timeout_s:g} s: it has {ray.cluster_resources().get('GPU', 0):g} GPU(s) now"
            + (f", and its autoscaler can grow to {most['GPU']:g}" if most.get("GPU") else
               ", and no autoscaler config that adds GPU nodes"))


def reserve_pool(bundle: dict[str, float], most: int, wait_s: float, what: str):
    """A placed placement group of up to `most` copies of `bundle`: all of them if they can be placed
    within POOL_TRY_WAIT_S, else half as many, and so on down to one, which gets `wait_s` (the
    autoscaler may have to start a node). Raises GPUsUnavailableError when not even one fits."""
    bundle = {name: amount for name, amount in bundle.items() if amount > 0}
    count = most
    while True:
        group = placement_group([dict(bundle) for _ in range(count)], strategy="PACK",
                                name=f"nanochat-pool-{what}-{count}")
        if group.wait(timeout_seconds=wait_s if count == 1 else POOL_TRY_WAIT_S):
            return group
        remove_placement_group(group)
        if count == 1:
            raise GPUsUnavailableError(
                shortfall(what, [bundle], "actor", wait_s)
                + ". Free them (Serve replicas and other jobs hold theirs until they end) or wait longer with "
                "--gpu-wait-s" + (", or pass --use-gpu off to evaluate on CPU actors" if bundle.get("GPU") else ""))
        count //= 2


@contextmanager
def actor_pool(actor_class, args: tuple, num_actors: int, num_cpus: float, num_gpus: float, wait_s: float,
               what: str, ready_timeout_s: float = DEFAULT_GPU_WAIT_S):
    """Up to `num_actors` actors `actor_class.remote(*args)`, each with num_cpus and num_gpus in a
    bundle of a placement group (reserve_pool), for the length of the `with` block.

    Yields the actors whose `ready()` call returned within `ready_timeout_s` (their constructor,
    which loads a model, ran); the others are killed. When none answered, the first error is raised.
    Every actor is killed and the group removed when the block ends."""
    if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
        raise ValueError(f"num_actors must be a positive int, got {num_actors!r}")
    group = reserve_pool({"CPU": num_cpus, "GPU": num_gpus}, num_actors, wait_s, what)
    actors = []
    try:
        for index in range(group.bundle_count):
            strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)
            actors.append(actor_class.options(num_cpus=num_cpus, num_gpus=num_gpus,
                                              scheduling_strategy=strategy).remote(*args))
        checks = {actor.ready.remote(): index for index, actor in enumerate(actors)}
        answered, _ = ray.wait(list(checks), num_returns=len(checks), timeout=ready_timeout_s)
        ready, errors = [], []
        for ref in answered:
            try:
                ray.get(ref)
                ready.append(checks[ref])
            except ray.exceptions.RayError as exc:
                errors.append(exc)
        if not ready:
            if errors:
                raise errors[0]
            raise TimeoutError(f"{what}: none of {len(actors)} actor(s) was ready within {ready_timeout_s:g} s")
        for index in set(range(len(actors))) - set(ready):
            ray.kill(actors[index])
        if len(ready) < num_actors:
            print(f"{what}: {len(ready)} of the {num_actors} actor(s) asked for are ready "
                  f"({group.bundle_count} could be placed)", flush=True)
        yield [actors[index] for index in sorted(ready)]
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)
