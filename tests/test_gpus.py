"""Tests of ray_jobs.gpus: --use-gpu auto, the GPU reservation that makes a run ask the
autoscaler for GPUs and fail with a clear message, never fall back to CPUs, when it cannot have them,
and the eval actor pool that uses only the actors that started.

A Ray of its own with one *logical* GPU (scheduling only, no CUDA) runs in a subprocess, beside the
session's CPU-only Ray.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import ray

from ray_jobs.gpus import actor_pool, resolve_use_gpu

LOGICAL_GPU_CHECKS = textwrap.dedent("""
    import argparse, sys
    import ray
    from ray_jobs import gpus
    from ray_jobs.train_common import fit_trainer

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    print("auto", gpus.resolve_use_gpu("auto"), "off", gpus.resolve_use_gpu("off"))
    gpus.reserve_gpus([{"GPU": 1, "CPU": 1}], timeout_s=30, what="one_worker")
    print("one GPU reserved")
    # the reservation is released: the same GPU can be reserved again at once
    gpus.reserve_gpus([{"GPU": 1}], timeout_s=30, what="again")
    print("reserved again")
    try:
        gpus.reserve_gpus([{"GPU": 1, "CPU": 1}] * 2, timeout_s=2, what="two_workers")
    except gpus.GPUsUnavailableError as exc:
        print("refused:", exc)
    args = argparse.Namespace(num_workers=2, gpu_wait_s=2.0)
    try:
        fit_trainer("base_train", lambda config: None, {}, {"use_gpu": True}, args, None)
    except SystemExit as exc:
        print("fit_trainer exit", exc.code)
""")


@ray.remote
class FirstOnly:
    """Starts only where it is the first to claim `path`, as if the other nodes could not load the model."""

    def __init__(self, path: str):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL))

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()


def test_the_pool_keeps_the_actors_that_answered(ray_local, tmp_path):
    claim = str(tmp_path / "claimed")
    with actor_pool(FirstOnly, (claim,), 2, num_cpus=1, num_gpus=0, wait_s=10, what="test") as actors:
        assert len(actors) == 1
        assert ray.get(actors[0].pid.remote()) > 0
    # when no actor starts, the pool raises the constructor's error instead of running with none
    with pytest.raises(ray.exceptions.RayActorError, match="File exists"):
        with actor_pool(FirstOnly, (claim,), 2, num_cpus=1, num_gpus=0, wait_s=10, what="test"):
            pass


def test_auto_is_cpu_on_a_cluster_without_gpus(ray_local):
    assert resolve_use_gpu("auto") is False
    assert resolve_use_gpu("on") is True
    with pytest.raises(ValueError, match="auto, on or off"):
        resolve_use_gpu("yes")


def test_gpu_runs_reserve_their_gpus_and_fail_clearly_without_them(tmp_path):
    run = subprocess.run([sys.executable, "-c", LOGICAL_GPU_CHECKS], capture_output=True, text=True, timeout=180,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = run.stdout
    assert run.returncode == 0, run.stderr[-3000:]
    assert "auto True off False" in out
    assert "one GPU reserved" in out and "reserved again" in out
    refusal = next(line for line in out.splitlines() if line.startswith("refused:"))
    assert "two_workers asked for 2 GPU(s) (2 worker(s))" in refusal
    assert "within 2 s: it has 1 GPU(s) now" in refusal and "--use-gpu off" in refusal
    # a trainer that cannot have its GPUs stops with exit 1 and says why, before any worker starts
    assert "fit_trainer exit 1" in out
    assert "base_train: base_train asked for 2 GPU(s)" in run.stderr
