"""How RL's learner hands its weights to the rollout workers: the object store or a broadcast.

Two paths, chosen by `chat_rl --weight-sync auto|collective|object-store` (`resolve_weight_sync`):

- `object-store`: the learner's rank 0 puts a CPU copy of the state dict into the object store
  once per version and every worker fetches it and loads it (a copy into the store, one out of it
  per worker, one into the model). It works everywhere and is the choice on CPUs.
- `collective`: rank 0 broadcasts the tensors of its live model, in place, into the workers'
  models through a process group of its own: NCCL when the learner and the workers are on GPUs
  (GPU to GPU, no host copy, no object store), gloo on CPUs (what the tests run as a stand-in).
  `auto` picks it when both sides are on GPUs.

Why a group of our own rather than `ray.util.collective`: in Ray 2.60 its gloo backend
(`TorchGLOOGroup`) calls `torch.distributed.init_process_group` when the process has no default
group, and when it has one (rank 0 of the learner does: Ray Train's) it makes a subgroup of that
world, which has the learner's other ranks in it and none of the rollout workers; its NCCL backend
needs CuPy, which this project does not install. Nor can the group come from
`torch.distributed.new_group`: that is collective over the learner's world. So the group is
built directly: rank 0 of the learner runs a `TCPStore` (on its node's Ray address, a free port),
and each *generation* of the group is a `ProcessGroupGloo` / `ProcessGroupNCCL` constructed on a
`PrefixStore` of that store with its own rank, size and timeout; the learner's rank 0 is group
rank 0, the workers are ranks 1..N. Ray Train's default group, and the gloo group chat_rl shares
rollouts through, are never touched.

A generation is kept while its members stay the same, and a new one is built when they change (a
worker replaced, a worker catching up alone) or after a failure. Every member waits at most the
group's timeout for the rendezvous and for each broadcast; a member that fails drops the group and
says so, and rank 0 (RolloutFleet in chat_rl) replaces the dead and tries again with a new
generation, so a worker that dies during a broadcast costs one timeout, not the run.
"""

from datetime import timedelta

import ray
import torch
import torch.distributed as dist

WEIGHT_SYNC_CHOICES = ("auto", "collective", "object-store")


def resolve_weight_sync(choice: str, learner_on_gpu: bool, rollout_on_gpu: bool) -> str:
    """'collective' or 'object-store' for `--weight-sync choice`; ValueError for a choice that
    cannot work on these devices."""
    if choice not in WEIGHT_SYNC_CHOICES:
        raise ValueError(f"unknown weight sync {choice!r}: choose one of {', '.join(WEIGHT_SYNC_CHOICES)}")
    if choice == "auto":
        return "collective" if learner_on_gpu and rollout_on_gpu else "object-store"
    if choice == "collective" and learner_on_gpu != rollout_on_gpu:
        where = {True: "GPUs", False: "CPUs"}
        raise ValueError(f"--weight-sync collective needs the learner and the rollout workers on the same kind of "
                         f"device (NCCL between GPUs, gloo between CPUs), but the learner is on "
                         f"{where[learner_on_gpu]} and the rollout workers on {where[rollout_on_gpu]}: pass "
                         "--weight-sync object-store (or auto), or change --use-gpu / --rollout-gpus")
    return choice


def collective_backend(on_gpu: bool) -> str:
    return "nccl" if on_gpu else "gloo"


def state_layout(state_dict: dict) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype) of every tensor, in order: both ends of a broadcast must agree on it."""
    return [(name, tuple(tensor.shape), str(tensor.dtype)) for name, tensor in state_dict.items()]


def open_store(address: tuple[str, int], timeout_s: float) -> dist.TCPStore:
    """A client of the learner's store at `address` (host, port)."""
    return dist.TCPStore(address[0], address[1], is_master=False, timeout=timedelta(seconds=timeout_s))


class WeightStore:
    """The learner's side of the rendezvous: a TCPStore on this node's Ray address and a free port."""

    def __init__(self, timeout_s: float):
        host = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=timeout_s))
        self.address = (host, self.store.port)


def join_group(store: dist.Store, generation: int, rank: int, size: int, backend: str, timeout_s: float):
    """This process's member of generation `generation` of the weight group. gloo connects to every
    member here (waiting at most `timeout_s` for them); NCCL connects at the first broadcast."""
    prefixed = dist.PrefixStore(f"weights/{generation}/", store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=ray.util.get_node_ip_address())]
        return dist.ProcessGroupGloo(prefixed, rank, size, options)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, options)
    raise ValueError(f"unknown collective backend {backend!r}: gloo or nccl")


def broadcast_tensors(group, tensors: list[torch.Tensor]) -> list:
    """Broadcast every tensor from group rank 0, in place on the other ranks; returns the works."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    return [group.broadcast([tensor], options) for tensor in tensors]


def receive_tensors(group, tensors: list[torch.Tensor]) -> None:
    """A member's side of broadcast_tensors: every tensor received, or an error (RuntimeError) once
    a transfer waits past the group's timeout."""
    for work in broadcast_tensors(group, tensors):
        work.wait()
    if tensors and tensors[0].is_cuda:
        torch.cuda.synchronize()
