"""Shared pytest fixtures: an isolated NANOCHAT_BASE_DIR per test session, one local Ray cluster
for the whole session (starting Ray costs seconds, so tests share it), for each module whose tests
submit real Ray jobs a Ray head with its job server, and a headless Chromium for the web UI's tests."""

import os
import shutil
import tempfile

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


CHROMIUM = os.environ.get("NANOCHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (never Playwright's own browser download)."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium) "
                    "or set NANOCHAT_CHROMIUM to a Chromium binary")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def dashboard():
    """The job server (dashboard) address of a Ray head that the demo's own `start_local_head`
    starts on free ports, beside `ray_local`, with token authentication on; in a temp dir of its
    own (Ray's socket paths live there, so it is short). One per module: the modules that use it
    are far apart in the suite, and an idle head with its dashboard takes about a fifth of a core
    (measured), more than starting one costs."""
    from ray_jobs import demo

    ray_port, dashboard_port = demo.free_port(), demo.free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray_jobs_", dir="/tmp")
    try:
        demo.start_local_head(ray_port, dashboard_port, temp_dir)
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        demo.stop_head(ray_port)
        shutil.rmtree(temp_dir, ignore_errors=True)
