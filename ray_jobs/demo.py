"""`make demo`: the offline tiny pipeline on a local Ray cluster, then the chat service.

1. Start a local Ray head (with its dashboard) unless one already answers on the dashboard port.
2. Submit `ray_jobs.speedrun --preset tiny` as a Ray job and follow its logs; the speedrun submits
   every stage as a job of its own, so the dashboard lists them all.
3. Deploy the Serve chat app on the result and print the URLs of the chat UI, the API and the
   dashboard, and where the report card is. The app keeps running on the cluster after this
   script ends; `make demo ARGS=--stop` takes the app and the demo's head down again.

A second `make demo` reuses the running cluster and every stage's output (data, tokenizer,
checkpoints); `make demo ARGS=--fresh` starts the pipeline over. `--ray-port`, `--dashboard-port`
and `--serve-port` move the demo off the default ports (6379, 8265, 8000) when others use them.
The head keeps its sessions and logs in /tmp/ray_nanochat_demo (`--temp-dir`), not /tmp/ray.

Ray's token authentication stays on: the head starts with RAY_AUTH_MODE=token, and this process,
the speedrun job and every stage job send the token of ~/.ray/auth_token (made on the first run,
readable by this user only), so no other user of the machine can submit jobs to the demo's head.
The same token serves `ray job submit` and `serve` typed in a shell with RAY_AUTH_MODE=token.
"""

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil

from nanochat.files import get_base_dir
from nanochat.report import Report
from ray_jobs.ray_auth import use_token_auth
from ray_jobs.speedrun import Stage, run_as_job

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
# How long the head's processes get to exit after SIGTERM before they are killed. The workers and
# the dashboard exit within a second; the GCS server and the autoscaler's monitor ignore SIGTERM
# and the runtime-env agent takes 10 s (measured), so a longer wait only delays the same kill.
STOP_GRACE_S = 3.0
# The demo's workers (trainers, data tasks, the chat replica) are the work, so they run at nice 0,
# not at Ray's default 15. Measured beside two busy processes at nice 0 on 2 cores (README,
# Troubleshooting): at 15 a d4 base_train made no step in 10 minutes, its packer crawling at
# 5.5 k tokens/s; at 0 it stepped every 2.0 s.
DEMO_WORKER_NICENESS = 0


def cluster_is_up(dashboard: str) -> bool:
    """Whether a Ray cluster's job server answers at `dashboard`. One that answers but refuses
    this machine's Ray token is an error: the demo cannot use it, nor start a head in its place."""
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(dashboard).list_jobs()
        return True
    except Exception as exc:  # any other failure to talk to the dashboard means: no cluster there
        if "Authentication required" in str(exc) or "Authentication failed" in str(exc):
            raise SystemExit(f"[demo] the Ray cluster at {dashboard} refuses this machine's Ray token (`ray "
                             "get-auth-token` prints it): it was started with another one. Stop it, or run the "
                             "demo on other ports (--ray-port, --dashboard-port, --serve-port).") from None
        return False


def refuses_requests_without_token(dashboard: str) -> bool:
    """Whether the job server at `dashboard` has token authentication on (asks anonymous callers for the token)."""
    try:
        urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=30).close()
        return False
    except urllib.error.HTTPError as error:
        return error.code == 401


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_local_head(ray_port: int, dashboard_port: int, temp_dir: str) -> None:
    """`ray start --head` with the given GCS and dashboard ports (the dashboard on 127.0.0.1 only)
    and free ports for everything else: the defaults of the other ports (job agent 52365, client
    server 10001, ...) are taken by any other Ray on the machine, and a head without its job agent
    cannot run jobs.

    The head gets a temp dir of its own because a job's driver finds its cluster through the file
    `<temp dir>/ray_current_cluster`, which every `ray start` on the machine rewrites (a test
    session's cluster, say): in the shared /tmp/ray the demo's jobs would join whichever cluster
    started last."""
    use_token_auth(create=True)
    print(f"[demo] starting a local Ray head (ray start --head --port={ray_port} "
          f"--dashboard-port={dashboard_port})", flush=True)
    # Ray jobs run their entrypoint through a shell on the head: this venv goes first on its PATH so
    # that `python` there is the interpreter this project is installed in. RAY_AUTH_MODE=token
    # (set above) reaches the head, hence every job driver, with the rest of the environment.
    # RAY_worker_niceness: see DEMO_WORKER_NICENESS.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "RAY_worker_niceness": str(DEMO_WORKER_NICENESS)}
    ports = {name: free_port() for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "ray-client-server-port", "node-manager-port", "object-manager-port",
                                            "runtime-env-agent-port", "metrics-export-port")}
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={ray_port}", f"--dashboard-host={HOST}", f"--dashboard-port={dashboard_port}",
                    *(f"--{name}={port}" for name, port in ports.items()), f"--temp-dir={temp_dir}",
                    "--disable-usage-stats"],
                   check=True, env=env)
    dashboard = f"http://{HOST}:{dashboard_port}"
    for _ in range(60):
        if cluster_is_up(dashboard):
            return
        time.sleep(1)
    raise SystemExit(f"[demo] the Ray dashboard did not come up on {dashboard}; see {temp_dir}/session_latest/logs")


def head_processes(ray_port: int) -> list[psutil.Process]:
    """The processes of the Ray cluster whose GCS listens on ray_port: the GCS server (found by
    its port), every process that names its session folder or its GCS address on the command
    line (raylet, dashboard, agents, monitors, client server), and their children (the workers,
    which rename themselves ray::IDLE, ray::ChatModel, ...). A zombie, a process that has exited
    and waits for its parent (or init, once the parent is gone) to reap it, is not one of them."""
    processes = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()]
    marks = [f":{ray_port} ", f":{ray_port}'"]
    for process in processes:
        cmdline = process.info["cmdline"] or []
        if f"--gcs_server_port={ray_port}" in cmdline:
            log_dir = next((arg.split("=", 1)[1] for arg in cmdline if arg.startswith("--log_dir=")), None)
            if log_dir:
                marks.append(os.path.dirname(log_dir.rstrip("/")) + "/")
    if len(marks) == 2:
        return []  # no GCS server on that port: nothing of ours runs
    found = {}
    for process in processes:
        cmdline = " ".join(process.info["cmdline"] or []) + " "
        if any(mark in cmdline for mark in marks):
            try:
                for member in [process, *process.children(recursive=True)]:
                    found[member.pid] = member
            except psutil.NoSuchProcess:
                pass
    return [process for process in found.values() if _still_running(process)]


def _still_running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_head(ray_port: int) -> int:
    """Stop the demo's head (and with it the chat app) by signalling its own processes; other Ray
    clusters on the machine are left alone, unlike `ray stop`. Returns the number stopped."""
    processes = head_processes(ray_port)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    # A worker that has exited but whose parent (a raylet, exiting too) has not reaped it yet is a
    # zombie: psutil counts it as running, so waiting for it would always take the whole grace.
    deadline = time.monotonic() + STOP_GRACE_S
    alive = processes
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [process for process in alive if _still_running(process)]
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return len(processes)


def take_down_chat_app(ray_port: int) -> None:
    """Delete the chat app a previous demo left running on this cluster, if any: its replicas hold
    CPUs that the pipeline's stages would otherwise wait for forever on a small machine. The demo
    deploys it again once the pipeline is done."""
    import ray
    from ray import serve

    from serve.app import APP_NAME

    ray.init(address=f"{HOST}:{ray_port}", log_to_driver=False)
    try:
        if APP_NAME in serve.status().applications:
            print("[demo] taking the running chat app down while the pipeline runs", flush=True)
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def deploy_chat_app(ray_port: int, serve_port: int) -> str:
    """Deploy the Serve chat app of the newest SFT checkpoint on the cluster, wait until it
    answers, and return its URL. The app outlives this process (Serve runs detached)."""
    import ray
    from ray import serve

    from serve.app import APP_NAME, ChatAppArgs, build_app, resolve_checkpoint

    model_tag, step = resolve_checkpoint("sft", None, None)
    ray.init(address=f"{HOST}:{ray_port}", log_to_driver=False,
             runtime_env={"env_vars": {"NANOCHAT_BASE_DIR": get_base_dir()}})
    serve.start(http_options={"host": HOST, "port": serve_port})
    serve.run(build_app(ChatAppArgs(source="sft", model_tag=model_tag, step=step)), name=APP_NAME,
              route_prefix="/")
    url = f"http://{HOST}:{serve_port}/"
    with urllib.request.urlopen(url + "health", timeout=30) as response:
        response.read()
    ray.shutdown()
    return url


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run the offline tiny pipeline on a local Ray and serve the result")
    p.add_argument("--fresh", action="store_true", help="start over: redo every stage even when its output exists")
    p.add_argument("--no-serve", action="store_true", help="stop after the pipeline")
    p.add_argument("--stop", action="store_true", help="take the demo's Ray head and chat app down, then exit")
    p.add_argument("--ray-port", type=int, default=6379, help="GCS port of the demo's Ray head")
    p.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard (and job submission) port")
    p.add_argument("--serve-port", type=int, default=8000, help="port of the chat service")
    p.add_argument("--temp-dir", default="/tmp/ray_nanochat_demo",
                   help="Ray's temp dir for the demo's head (sessions, logs, metrics configs)")
    args = p.parse_args(argv)
    dashboard = f"http://{HOST}:{args.dashboard_port}"

    if args.stop:
        print(f"[demo] stopped {stop_head(args.ray_port)} process(es) of the Ray head at {HOST}:{args.ray_port}",
              flush=True)
        return 0
    use_token_auth(create=True)  # this process talks to the dashboard and the GCS too
    if not cluster_is_up(dashboard):
        start_local_head(args.ray_port, args.dashboard_port, args.temp_dir)
    else:
        print(f"[demo] using the Ray cluster already running at {dashboard}", flush=True)
        if not refuses_requests_without_token(dashboard):
            print(f"[demo] warning: that cluster runs without Ray's token authentication (an older demo's head?): "
                  f"any user of this machine can submit jobs to it. `make demo ARGS=--stop` (with its --ray-port) "
                  "and a new `make demo` start one that has it.", flush=True)
        take_down_chat_app(args.ray_port)

    flags = ["--preset", "tiny", "--address", dashboard] + (["--fresh"] if args.fresh else [])
    print(f"[demo] ray job submit --address {dashboard} --working-dir . -- "
          f"{shlex.join(['python', '-m', 'ray_jobs.speedrun', *flags])}", flush=True)
    started = time.time()
    try:
        run_as_job(Stage("speedrun", "ray_jobs.speedrun", flags), dashboard, REPO_DIR)
    except RuntimeError as exc:
        print(f"[demo] the pipeline failed: {exc}\n[demo] its logs are above and in the dashboard: {dashboard}",
              flush=True)
        return 1
    print(f"[demo] pipeline done in {time.time() - started:.0f}s", flush=True)
    report = os.path.join(Report().dir, "report.md")
    if args.no_serve:
        print(f"[demo] done. Ray dashboard: {dashboard}\n[demo] report card: {report}", flush=True)
        return 0

    print("[demo] deploying the chat service (Ray Serve)", flush=True)
    url = deploy_chat_app(args.ray_port, args.serve_port)
    stop = "--stop" + ("" if args.ray_port == 6379 else f" --ray-port {args.ray_port}")
    print(f"[demo] ready:\n  chat UI:        {url}\n"
          f"  OpenAI API:     {url}v1/chat/completions   (curl and openai examples in the README)\n"
          f"  Ray dashboard:  {dashboard}   (jobs and their logs, Serve, metrics)\n"
          f"  report card:    {report}\n"
          f"  stop it all:    make demo ARGS=\"{stop}\"", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
