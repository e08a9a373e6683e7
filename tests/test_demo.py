"""`make demo`'s own logic (ray_jobs/demo.py), on a Ray head of its own beside the module's
`dashboard` head. The pipeline is the real speedrun submitted as a Ray job, with two stand-in stages
in place of the tiny preset's (tests.stand_in_speedrun: the stages have tests of their own), so the
demo runs in seconds:

- a first run, on ports given by its flags, starts its head there, runs the pipeline and serves
  the chat app on the --serve-port;
- a second run reuses the running head and every stage's output, takes the chat app down while
  the pipeline runs, and deploys it again at the end;
- --stop takes down the demo's head, and only it: the other head keeps running.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import psutil
import pytest

from ray_jobs import demo
from tests.pipeline_stage import stages_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `python -m ray_jobs.demo` with its flags, except that its pipeline job runs tests.stand_in_speedrun
# (the same flags) and, just before, says what the chat app's /health answered.
DEMO = '''import sys, urllib.error, urllib.request
from ray_jobs import demo
from ray_jobs.speedrun import Stage

serve_port = sys.argv[sys.argv.index("--serve-port") + 1]
submit = demo.run_as_job

def pipeline(stage, address, working_dir):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{serve_port}/health", timeout=10) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = "no answer"
    print(f"[test] the chat app during the pipeline: {status}", flush=True)
    submit(Stage(stage.name, "tests.stand_in_speedrun", stage.flags), address, working_dir)

demo.run_as_job = pipeline
sys.exit(demo.main(sys.argv[1:]))
'''


@dataclass
class DemoHead:
    ray_port: int
    dashboard_port: int
    serve_port: int
    temp_dir: str
    base_dir: str

    @property
    def flags(self) -> list[str]:
        return ["--ray-port", str(self.ray_port), "--dashboard-port", str(self.dashboard_port),
                "--serve-port", str(self.serve_port), "--temp-dir", self.temp_dir]

    def run(self, *flags: str) -> str:
        """Run the demo with this head's port flags; its output."""
        env = {**os.environ, "NANOCHAT_BASE_DIR": self.base_dir}
        result = subprocess.run([sys.executable, "-c", DEMO, *self.flags, *flags], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-5000:]
        return output

    def gcs_server(self) -> list[int]:
        return [process.pid for process in demo.head_processes(self.ray_port) if "gcs_server" in process.name()]

    def chat_health(self):
        """(HTTP status, body) of the chat app's /health."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.serve_port}/health", timeout=30) as response:
            return response.status, response.read().decode()


@pytest.fixture(scope="module")
def first_run(dashboard, tmp_path_factory):
    """A first `make demo` on free ports: (its head, its output). The head is stopped at the end."""
    head = DemoHead(demo.free_port(), demo.free_port(), demo.free_port(),
                    tempfile.mkdtemp(prefix="demo_", dir="/tmp"), str(tmp_path_factory.mktemp("demo_base")))
    try:
        yield head, head.run()
    finally:
        demo.stop_head(head.ray_port)
        shutil.rmtree(head.temp_dir, ignore_errors=True)


def test_a_first_run_starts_its_head_on_the_given_ports_and_serves_the_pipelines_model(first_run):
    head, output = first_run
    assert f"ray start --head --port={head.ray_port} --dashboard-port={head.dashboard_port}" in output
    assert head.gcs_server() and demo.cluster_is_up(f"http://127.0.0.1:{head.dashboard_port}")
    assert os.path.isdir(os.path.join(head.temp_dir, "session_latest"))
    assert "[test] the chat app during the pipeline: no answer" in output
    assert stages_run(head.base_dir) == ["data", "chat_sft"]
    assert head.chat_health()[0] == 200
    assert f"chat UI:        http://127.0.0.1:{head.serve_port}/" in output
    assert f'make demo ARGS="--stop --ray-port {head.ray_port}"' in output


def test_a_second_run_reuses_the_head_and_the_outputs_and_serves_again_after_the_pipeline(first_run):
    head, _ = first_run
    gcs_server = head.gcs_server()
    output = head.run()
    assert f"using the Ray cluster already running at http://127.0.0.1:{head.dashboard_port}" in output
    assert "starting a local Ray head" not in output and head.gcs_server() == gcs_server
    assert "stage data: output exists" in output and "stage chat_sft: output exists" in output
    assert stages_run(head.base_dir) == ["data", "chat_sft"]  # nothing ran again
    # Down while the pipeline ran (its replica would hold a CPU the stages need), up again after it.
    during = output.split("[test] the chat app during the pipeline: ", 1)[1].split("\n", 1)[0]
    assert during != "200", output[-3000:]
    assert "taking the running chat app down while the pipeline runs" in output
    assert head.chat_health()[0] == 200


def test_stop_takes_down_the_demos_head_and_leaves_another_one_running(first_run, dashboard, capsys):
    head, _ = first_run
    assert demo.main(["--stop", "--ray-port", str(head.ray_port)]) == 0
    assert f"of the Ray head at 127.0.0.1:{head.ray_port}" in capsys.readouterr().out
    assert demo.head_processes(head.ray_port) == []
    with pytest.raises(OSError):  # refused, or reset by a process that was dying
        head.chat_health()
    assert demo.cluster_is_up(dashboard)


def test_a_heads_exited_child_that_nobody_reaped_yet_is_not_one_of_its_processes(tmp_path):
    # A stand-in GCS server (its flags on the command line) whose child has exited and is never
    # waited for: a zombie, which `--stop` must not count as a process of the head still running.
    port = demo.free_port()
    code = "import subprocess, sys, time; child = subprocess.Popen(['true']); print(child.pid, flush=True); time.sleep(60)"
    gcs = subprocess.Popen([sys.executable, "-c", code, f"--gcs_server_port={port}", f"--log_dir={tmp_path}/logs"],
                           stdout=subprocess.PIPE, text=True)
    try:
        child = int(gcs.stdout.readline())
        deadline = time.monotonic() + 10
        while psutil.Process(child).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert psutil.Process(child).status() == psutil.STATUS_ZOMBIE
        assert [process.pid for process in demo.head_processes(port)] == [gcs.pid]
    finally:
        gcs.kill()
        gcs.wait()
