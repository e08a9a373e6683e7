"""`make demo`: the offline tiny pipeline on a local Ray cluster, then the chat service.

1. Start a local Ray head (with its dashboard) unless one is already running.
2. Submit `ray_jobs.speedrun --preset tiny` as a Ray job and follow its logs; the speedrun submits
   every stage as a job of its own, so the dashboard lists them all.
3. Start the Serve chat app on the result and print the URLs of the chat UI and the dashboard.

A second `make demo` reuses the running cluster and every stage's output (data, tokenizer,
checkpoints); `make demo ARGS=--fresh` starts the pipeline over.
"""

import argparse
import importlib.util
import os
import shlex
import socket
import subprocess
import sys
import time

from ray_jobs.speedrun import Stage, run_as_job

DASHBOARD = "http://127.0.0.1:8265"
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ray jobs run their entrypoint through a shell on the head: put this venv first on its PATH so
# that `python` there is the interpreter this project is installed in. The demo cluster listens on
# 127.0.0.1 only, so it runs without Ray's token authentication (which otherwise switches on when
# a token file exists in ~/.ray, and then refuses drivers that do not carry it).
VENV_ENV = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
            "RAY_AUTH_MODE": "disabled"}


def cluster_is_up(address: str) -> bool:
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(address).list_jobs()
        return True
    except Exception:  # any failure to talk to the dashboard means: no usable cluster there
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_local_head() -> None:
    print("[demo] starting a local Ray head (ray start --head)", flush=True)
    # The job agent's default port (52365) is taken by any other Ray on the machine (a test
    # session, a notebook); without its agent the head cannot run jobs, so give it a free port.
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--dashboard-host=127.0.0.1",
                    "--dashboard-port=8265", f"--dashboard-agent-listen-port={free_port()}",
                    "--disable-usage-stats"], check=True, env=VENV_ENV)
    for _ in range(60):
        if cluster_is_up(DASHBOARD):
            return
        time.sleep(1)
    raise SystemExit("[demo] the Ray dashboard did not come up on 127.0.0.1:8265; see /tmp/ray/session_latest/logs")


def main(argv=None) -> int:
    os.environ.update(RAY_AUTH_MODE="disabled")  # this process talks to the dashboard too
    p = argparse.ArgumentParser(description="Run the offline tiny pipeline on a local Ray and serve the result")
    p.add_argument("--fresh", action="store_true", help="redo every stage even when its output exists")
    p.add_argument("--no-serve", action="store_true", help="stop after the pipeline")
    args = p.parse_args(argv)

    if not cluster_is_up(DASHBOARD):
        start_local_head()
    else:
        print(f"[demo] using the Ray cluster already running at {DASHBOARD}", flush=True)

    flags = ["--preset", "tiny", "--address", DASHBOARD] + (["--fresh"] if args.fresh else [])
    print(f"[demo] ray job submit --address {DASHBOARD} --working-dir . -- "
          f"{shlex.join(['python', '-m', 'ray_jobs.speedrun', *flags])}", flush=True)
    try:
        run_as_job(Stage("speedrun", "ray_jobs.speedrun", flags), DASHBOARD, REPO_DIR)
    except RuntimeError as exc:
        print(f"[demo] the pipeline failed: {exc}\n[demo] its logs are above and in the dashboard", flush=True)
        return 1

    if args.no_serve:
        print(f"[demo] done. Ray dashboard: {DASHBOARD}", flush=True)
        return 0
    if importlib.util.find_spec("serve.app") is None:
        print(f"[demo] pipeline done. The Serve chat app is not part of this version yet. "
              f"Ray dashboard: {DASHBOARD}", flush=True)
        return 0
    print(f"[demo] starting the chat service (python -m serve); Ray dashboard: {DASHBOARD}", flush=True)
    # python -m serve joins the cluster started above, prints the chat URL and serves until Ctrl-C.
    return subprocess.run([sys.executable, "-m", "serve"], env=VENV_ENV).returncode


if __name__ == "__main__":
    sys.exit(main())
