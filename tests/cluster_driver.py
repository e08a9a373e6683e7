"""A test's own Ray cluster, driven from a subprocess.

`ray.cluster_utils.Cluster` needs a driver of its own, and the test process may already be
connected to the session's `ray_local`; so a test module runs its cluster code as
`python -m <module> OUT.json ARGS...`, which writes what it saw to OUT.json, and asserts on that.
The subprocess leads a process group of its own, with the cluster's processes in it, so that a
driver past its time is killed together with its cluster.
"""

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ClusterDriver:
    proc: subprocess.Popen
    out: Path
    log: Path

    def report(self, timeout_s: float) -> dict:
        """The JSON the driver wrote, once it has ended; fails with the end of its log otherwise."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        assert self.proc.returncode == 0 and self.out.exists(), \
            f"cluster driver failed:\n{self.log.read_text()[-8000:]}"
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_driver(module: str, folder: Path, *args: str, env: dict | None = None) -> ClusterDriver:
    """Start `python -m module folder/report.json *args` in the repository, logging to folder/driver.log."""
    out, log = folder / "report.json", folder / "driver.log"
    env = {**os.environ, "RAY_DEDUP_LOGS": "1", "PYTHONPATH": REPO, **(env or {})}
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", module, str(out), *args], cwd=REPO, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return ClusterDriver(proc, out, log)
