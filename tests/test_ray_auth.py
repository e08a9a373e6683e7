"""Ray's token authentication, on one real head that has it on: the module's `dashboard`
(tests/conftest.py), which the demo's own `start_local_head` started beside `ray_local`.

- The README's commands, typed in a shell as a user would: the two lines of its "Ray's token"
  section, then a `ray job submit` of its pipeline section. The same submit without them is
  refused, which shows that the head checks the token.
- The Job Submission client as the speedrun and the demo use it (`run_as_job`): a job's log is
  tailed as it is written and its failure reported, and a job whose driver joins the cluster
  (`ray.init()`) gets the token from the head's environment.
"""

import os
import re
import subprocess
import sys
import time

import pytest
from ray.job_submission import JobSubmissionClient

from ray_jobs import demo, speedrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block(heading: str) -> list[str]:
    """The lines of the first ```bash block after the README's `## heading`, as written."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text[text.index(f"\n## {heading}\n"):]
    return section.split("```bash\n", 1)[1].split("\n```", 1)[0].splitlines()


def user_shell(commands: list[str], dashboard: str) -> subprocess.CompletedProcess:
    """Run commands in bash in the repository, with this venv's `ray` on PATH and no RAY_AUTH_MODE
    of this process's; RAY_ADDRESS points the job commands at the test's head, as `--address` or
    the default http://127.0.0.1:8265 would at a user's."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""), RAY_ADDRESS=dashboard)
    return subprocess.run(["bash", "-e", "-c", "\n".join(commands)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_heads_job_server_refuses_requests_without_the_token(dashboard):
    assert demo.refuses_requests_without_token(dashboard)  # HTTP 401 to a request without it
    assert demo.cluster_is_up(dashboard)  # the demo's own check sends the token


def test_the_readme_commands_work_as_written_with_its_token_lines(dashboard):
    token_lines = readme_block("Ray's token")
    assert [line.split("#")[0].strip() for line in token_lines] == [
        "ray get-auth-token --generate > /dev/null && chmod 600 ~/.ray/auth_token", "export RAY_AUTH_MODE=token"]
    [submit] = [line for line in readme_block("The pipeline") if "ray_jobs.tok_eval --help" in line]

    refused = user_shell([submit], dashboard)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stderr + refused.stdout

    done = user_shell([*token_lines, submit], dashboard)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "usage: tok_eval.py" in output and "succeeded" in output
    assert os.stat(os.path.expanduser("~/.ray/auth_token")).st_mode & 0o077 == 0


TICK_MODULE = '''import sys, time
print("tick 1", flush=True)
time.sleep(4)
print("tick 2", flush=True)
print("ValueError: the stage broke", file=sys.stderr, flush=True)
sys.exit(3)
'''

DRIVER_MODULE = '''import os
import ray
ray.init()
print("the driver sees", int(ray.cluster_resources()["CPU"]), "CPUs", flush=True)
print("its workers run at nice", ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote()), flush=True)
'''


class _TimedOut:
    """sys.stdout stand-in that keeps each write with the time it came."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append((time.monotonic(), text))
        return len(text)

    def flush(self):
        pass

    def first(self, text):
        return next(t for t, chunk in self.writes if text in chunk)


def test_a_real_jobs_log_is_tailed_as_it_is_written_and_its_failure_reported(dashboard, monkeypatch, tmp_path):
    """The job's first line is printed seconds before its last, the whole log is never fetched,
    and the failure names the job's status."""
    (tmp_path / "tick.py").write_text(TICK_MODULE)
    monkeypatch.setattr(JobSubmissionClient, "get_job_logs",
                        lambda self, job_id: pytest.fail("the whole log was downloaded"))
    out = _TimedOut()
    monkeypatch.setattr(sys, "stdout", out)
    with pytest.raises(RuntimeError, match=r"stage tick \(job nanochat-tick-\d+\) failed: .*exit code 3"):
        speedrun.run_as_job(speedrun.Stage("tick", "tick"), dashboard, str(tmp_path))
    monkeypatch.undo()
    text = "".join(chunk for _, chunk in out.writes)
    assert "submitted job nanochat-tick-" in text and "(0 CPU for its driver)" in text
    assert out.first("tick 2") - out.first("tick 1") > 3
    assert "ValueError: the stage broke" in text


def test_a_jobs_driver_joins_the_cluster_with_the_heads_token_and_its_workers_run_at_nice_0(dashboard, capsys, tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER_MODULE)
    speedrun.run_as_job(speedrun.Stage("driver", "driver"), dashboard, str(tmp_path))
    output = capsys.readouterr().out
    assert re.search(r"the driver sees \d+ CPUs", output)
    # the demo's head runs its workers at nice 0, not Ray's 15 (demo.DEMO_WORKER_NICENESS)
    assert f"its workers run at nice {demo.DEMO_WORKER_NICENESS}" in output


USE_TOKEN_AUTH = '''import ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from ray_jobs.ray_auth import use_token_auth
before = is_token_auth_enabled()
use_token_auth()
print(before, is_token_auth_enabled())
'''


@pytest.mark.parametrize("mode, expected", [(None, "False True"), ("disabled", "False False"), ("token", "True True")])
def test_a_client_turns_token_auth_on_after_ray_is_imported_unless_told_otherwise(dashboard, mode, expected):
    """`dashboard` made the token; Ray has read its configuration by the time use_token_auth runs."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    if mode is not None:
        env["RAY_AUTH_MODE"] = mode
    out = subprocess.run([sys.executable, "-c", USE_TOKEN_AUTH], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.split() == expected.split()
