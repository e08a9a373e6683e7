"""Shared pytest fixtures: an isolated NANOCHAT_BASE_DIR per test session and one local Ray
cluster for the whole session (starting Ray costs seconds, so tests share it)."""

import os

import pytest
import torch

# Tiny test models gain nothing from a second intra-op thread, and on 2 busy CPUs its spin-waits
# make every small matmul many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def nanochat_base_dir(tmp_path_factory):
    """Every test session writes into its own base dir, never into ~/.cache/nanochat."""
    base = tmp_path_factory.mktemp("nanochat_base")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    return base


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session: 2 CPUs, no dashboard, quiet logs."""
    import ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not ray.is_initialized():
        # address="local": always a new cluster of our own, never one that happens to run here
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"NANOCHAT_BASE_DIR": os.environ["NANOCHAT_BASE_DIR"]}})
    yield ray
    ray.shutdown()
