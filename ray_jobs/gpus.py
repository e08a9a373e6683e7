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

Only Ray is imported here, so the Serve ingress can use it too.
"""

import ray
from ray.util.placement_group import placement_group, remove_placement_group

DEFAULT_GPU_WAIT_S = 600.0  # long enough for a cloud autoscaler to start GPU nodes


def cluster_can_have_gpus() -> bool:
    """Whether the cluster has GPUs, or its autoscaler may add nodes that have them."""
    if not ray.is_initialized():
        return False
    if ray.cluster_resources().get("GPU", 0) > 0:
        return True
    most = ray._private.state.state.get_max_resources_from_cluster_config()
    return bool(most and most.get("GPU", 0) > 0)


def resolve_use_gpu(flag: str) -> bool:
    """--use-gpu on / off / auto (auto: cluster_can_have_gpus)."""
    if flag not in ("auto", "on", "off"):
        raise ValueError(f"--use-gpu must be auto, on or off, not {flag!r}")
    return cluster_can_have_gpus() if flag == "auto" else flag == "on"


class GPUsUnavailableError(RuntimeError):
    """The GPUs a job asked for could not be had in time."""


def reserve_gpus(bundles: list[dict[str, float]], timeout_s: float, what: str) -> None:
    """Wait until the cluster can place all of `bundles` (resource dicts, e.g. one {"GPU": 1,
    "CPU": 1} per train worker) at once, asking the autoscaler for them; raise GPUsUnavailableError
    after `timeout_s` seconds. The reservation is released before returning (see the module note)."""
    group = placement_group([dict(bundle) for bundle in bundles], strategy="PACK",
                            name=f"nanochat-gpu-reservation-{what}")
    try:
        ready = group.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(group)
    if not ready:
        wanted = sum(bundle.get("GPU", 0) for bundle in bundles)
        have = ray.cluster_resources().get("GPU", 0)
        most = ray._private.state.state.get_max_resources_from_cluster_config() or {}
        raise GPUsUnavailableError(
            f"{what} asked for {wanted:g} GPU(s) ({len(bundles)} worker(s)) and the cluster could not provide them "
            f"within {timeout_s:g} s: it has {have:g} GPU(s) now"
            + (f", and its autoscaler can grow to {most['GPU']:g}" if most.get("GPU") else
               ", and no autoscaler config that adds GPU nodes")
            + ". Lower --num-workers, wait longer with --gpu-wait-s, or pass --use-gpu off to run on CPUs")
