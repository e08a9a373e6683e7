"""Monitoring: the Grafana dashboard in monitoring/ is valid Grafana JSON with the panels the README
promises, the chat service's metrics and a trainer's gauge really reach the node's Prometheus
export endpoint (the one Ray's Prometheus config scrapes), and every panel's query finds series
that the trainers and the chat service really published.

That last check runs Prometheus for real, as the README's Monitoring section runs it: Debian's
`prometheus` (`make test` installs it; the test skips, saying so, only where it is missing) on the
config Ray's dashboard generates for a live head (the demo's `start_local_head`, in a temp dir of
its own, beside the session's `ray_local`, which has no dashboard and so no such config). Its copy
of that config scrapes every second instead of every 10 s, and the head's processes report their
metrics every second (RAY_metrics_report_interval_ms=1000, Ray's floor; 10 s by default) so that
the checks wait seconds, not tens of seconds. Tiny runs of all three trainers (`python -m
ray_jobs.base_train` with val bpb and CORE on tests/test_base_train.py's shards and CORE bundle,
`ray_jobs.chat_sft` on the offline mixture, `ray_jobs.chat_rl` on the offline arithmetic task) and
`python -m serve`, all started at once as a user would with RAY_ADDRESS pointing at the head, feed
it. The test then asks Prometheus's HTTP API for the `ray_nanochat_*` series: every series a panel
queries and every one the README's table lists must be among them, every query of every panel must
return data over the test's time range (a positive value, except where 0 is honest: idle gauges,
a random model's RL reward, CORE at chance), and a trainer gauge's values must be its run's own
records. So a panel on a series that nobody publishes, or a trainer key renamed, fails the suite.
"""

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import pytest
import ray
import yaml

from ray_jobs import demo
from ray_jobs.train_common import latest_run_checkpoint_meta
from serve.app import ChatAppArgs, build_app
from tests.serve_helpers import request, save_tiny_chat_checkpoint, serve_port, wait_until
from tests.test_base_train import pretraining_flags, write_pretraining_inputs
from tests.test_chat_sft import BASE_META, SEQ_LEN
from tests.tiny import save_tiny_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(REPO_ROOT, "monitoring", "grafana_dashboard.json")
# Ray exports a ray.util.metrics metric NAME as ray_NAME; Prometheus adds these suffixes by type.
SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}
# A chat message whose prompt is longer than a block of the prefix cache (16 tokens): sent twice,
# the second request finds the first's block, so the cache's series have values.
CACHED_MESSAGE = "Hi! Tell me a short story about a fox, a dog and the number 42."


def _source(path: str) -> str:
    with open(os.path.join(REPO_ROOT, path)) as f:
        return f.read()


def readme_trainer_series() -> set[str]:
    """The trainers' series the README's Monitoring table lists: a row's first cell names the
    first in full (`ray_nanochat_base_loss`), the others by their ending (`_val_bpb`)."""
    series = set()
    for cell, phase in re.findall(r"^\| (`ray_nanochat_(base|sft|rl)_[^|]*)\|", _source("README.md"), re.MULTILINE):
        series |= {name if name.startswith("ray_") else f"ray_nanochat_{phase}{name}"
                   for name in re.findall(r"`(\w+)`", cell)}
    assert len(series) >= 15, series
    return series


def dashboard_queries() -> list[str]:
    """The PromQL expression of every target of every panel of the dashboard."""
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def read_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bray_nanochat_\w+", expr))


def dashboard_metrics() -> set[str]:
    """The Prometheus series names the dashboard's queries read."""
    return {name for expr in dashboard_queries() for name in read_metrics(expr)}


def serve_series() -> dict[str, str]:
    """Series name -> metric type of every metric serve/app.py defines."""
    found = re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(\w+)\"", _source("serve/app.py"))
    assert len(found) >= 5, found
    return {f"ray_{name}{suffix}": kind for kind, name in found for suffix in SUFFIXES[kind]}


def test_the_dashboard_is_valid_grafana_json_with_the_panels_the_readme_promises():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert graphs and all(panel["targets"] and panel["datasource"]["uid"] == "${datasource}" for panel in graphs)
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]

    # The panels the README promises: training loss, val bpb, tokens/s and MFU, RL reward, and a
    # chat-service panel of each metric type. Whether anything exports what they query is the
    # Prometheus test's to check, on the series the runs really published.
    queried = dashboard_metrics()
    for name in ("ray_nanochat_base_loss", "ray_nanochat_base_val_bpb", "ray_nanochat_base_tokens_per_second",
                 "ray_nanochat_base_mfu", "ray_nanochat_rl_mean_reward"):
        assert name in queried
    kinds_queried = {serve_series()[name] for name in queried if name in serve_series()}
    assert kinds_queried == {"Counter", "Gauge", "Histogram"}


def test_the_serve_series_read_from_the_source_are_named_as_ray_exports_them():
    assert {n.removeprefix("ray_") for n in serve_series()} >= {"nanochat_requests_total",
                                                                "nanochat_time_to_first_token_seconds_bucket"}
    assert "ray_nanochat_generated_tokens_total" in serve_series()
    assert "ray_nanochat_generated_tokens" not in serve_series()  # a counter is exported with _total


@pytest.fixture(scope="module")
def metrics_app(ray_local, tmp_path_factory):
    save_tiny_chat_checkpoint("metrics", str(tmp_path_factory.mktemp("tokenizer")))
    from ray import serve

    port = serve_port()
    serve.run(build_app(ChatAppArgs(model_tag="metrics", replica_cpus=0.5, max_batch_size=2)),
              name="nanochat-metrics", route_prefix="/metrics-test")
    yield port
    serve.delete("nanochat-metrics")


def test_serve_and_training_metrics_reach_the_prometheus_export_endpoint(metrics_app):
    for _ in range(2):
        status, body = request(metrics_app, "POST", "/metrics-test/v1/chat/completions",
                               {"model": "nanochat", "messages": [{"role": "user", "content": CACHED_MESSAGE}],
                                "max_tokens": 4, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] == 4

    @ray.remote(num_cpus=0)
    def train_worker_publishes(value: float) -> None:
        from ray_jobs.train_common import TrainMetrics

        metrics = TrainMetrics("monitoring-test", "nanochat_base", None, {})
        metrics.publish(7, {"loss": value, "tokens_per_second": 1234.0, "note": "not a number"})

    ray.get(train_worker_publishes.remote(3.25))

    # Ray's Prometheus scrapes this port on every node (prom_metrics_service_discovery.json).
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    # Every serve series the dashboard queries, and the trainer's gauge.
    wanted = {name for name in dashboard_metrics() if name in serve_series()} | {"ray_nanochat_base_loss"}
    assert {"ray_nanochat_requests_total", "ray_nanochat_time_to_first_token_seconds_bucket",
            "ray_nanochat_generated_tokens_total", "ray_nanochat_active_sequences"} <= wanted

    def scrape():
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        lines = [line for line in text.splitlines() if line.startswith("ray_nanochat_")]
        return lines if wanted <= {re.match(r"\w+", line).group() for line in lines} else None

    lines = wait_until(scrape, timeout=60, interval=2, what=f"the nanochat metrics on {url}")
    values = {}
    for line in lines:
        name, labels, value = re.match(r"(\w+)\{(.*)\} (\S+)$", line).groups()
        values.setdefault(name, []).append((labels, float(value)))
    assert any('endpoint="openai"' in labels and 'status="ok"' in labels and value >= 1
               for labels, value in values["ray_nanochat_requests_total"])
    assert sum(value for _, value in values["ray_nanochat_generated_tokens_total"]) >= 8
    assert sum(value for _, value in values["ray_nanochat_prefix_hit_tokens_total"]) >= 16
    assert sum(value for _, value in values["ray_nanochat_prefix_cached_blocks"]) >= 1
    assert [value for labels, value in values["ray_nanochat_base_loss"] if 'run="monitoring-test"' in labels] == [3.25]
    assert "ray_nanochat_base_note" not in values  # publish() skips values that are not numbers


# ------------------------------------------------------------ Prometheus on Ray's generated config

# One tiny run of each trainer, told apart by its run name (every trainer gauge is tagged with it),
# all three writing their checkpoints (and so their histories) into the fixture's folder.
RUNS = {"base": "prometheus-base", "sft": "prometheus-sft", "rl": "prometheus-rl"}
BASE_TAG = "prometheus_base"
SFT_TAG = "prometheus_d2"
RL_TAG = "prometheus_rl"
CHAT_TAG = "prometheus_chat"
BASE_STEPS = 4
# 8 steps keep SFT's per-step gauges on the export endpoint (they leave it 2 report intervals after
# their worker exits) for several of Prometheus's 1 s scrapes.
SFT_STEPS = 8
# Each trainer's worker, RL's rollout actor and the chat replica hold a quarter of a CPU, so that
# all run at once and, of the head's 2 CPUs, base_train's data pipeline keeps the 0.75 its packer
# and a tokenize task ask for.
WORKER_CPUS = ["--cpus-per-worker", "0.25"]
# base_train: val bpb at steps 0 and 4, CORE (on the tiny bundle) and the only checkpoint at step 4.
BASE_FLAGS = ["--num-iterations", str(BASE_STEPS), "--eval-every", str(BASE_STEPS), "--save-every", "-1",
              "--core-metric-every", str(BASE_STEPS), "--core-metric-max-per-task", "4", "--num-workers", "1",
              "--model-tag", BASE_TAG, *WORKER_CPUS]
SFT_FLAGS = ["--model-tag", SFT_TAG, "--mixture", "offline", "--num-iterations", str(SFT_STEPS), "--eval-every",
             "-1", "--eval-tokens", str(4 * SEQ_LEN), "--compile", "off", *WORKER_CPUS]
# chat_rl: 12 steps on the offline arithmetic task, pass@1 every 4 and at the end. A gauge reaches the
# export endpoint only at its worker's next metrics report (every second here), and these steps take
# about 0.1-0.2 s: two steps with pass@1 at the end were once all over between two reports, and
# Prometheus never saw an RL series. 12 steps publish for more than a report interval.
RL_STEPS = 12
RL_FLAGS = ["--model-tag", RL_TAG, "--task", "arithmetic", "--num-steps", str(RL_STEPS), "--examples-per-step", "2",
            "--num-samples", "2", "--max-new-tokens", "8", "--eval-every", "4", "--eval-examples", "2", "--eval-k",
            "2", "--num-rollout-workers", "1", "--rollout-cpus", "0.25", *WORKER_CPUS]
# Series whose values may honestly all be 0 or below. Between requests nothing decodes or waits,
# so the idle gauges read 0; a random model solves no arithmetic problem; CORE is centred on the
# tasks' random baselines, so a 4-step model's may be 0 or below.
NOT_POSITIVE = {"ray_nanochat_active_sequences", "ray_nanochat_queued_sequences", "ray_nanochat_rl_mean_reward",
                "ray_nanochat_rl_pass_at_1", "ray_nanochat_base_core_metric"}
TRAINER_GAUGE = re.compile(r"ray_nanochat_(base|sft|rl)_(\w+)")


def prometheus_api(url: str, endpoint: str, **params) -> dict | list:
    """The `data` of a successful answer of Prometheus's HTTP API, GET /api/v1/<endpoint>?<params>."""
    with urllib.request.urlopen(f"{url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}", timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]


def every_listed_target_up(url: str, discovery: str) -> bool:
    """Whether Prometheus at `url` scrapes, healthy, every target in Ray's discovery file."""
    try:
        with open(discovery) as f:
            listed = {target for group in json.load(f) for target in group["targets"]}
    except FileNotFoundError:
        return False
    active = prometheus_api(url, "targets")["activeTargets"]
    return bool(listed) and {t["labels"]["instance"] for t in active if t["health"] == "up"} == listed


def _log(path: str) -> str:
    with open(path) as f:
        return f.read()


def _log_tail(path: str) -> str:
    return _log(path)[-4000:]


def _wait_for_output(process: subprocess.Popen, log_path: str, text: str, timeout: float, what: str) -> None:
    def printed():
        assert process.poll() is None, f"{what} exited with status {process.returncode}:\n{_log_tail(log_path)}"
        return text in _log(log_path)  # not only at the end: a driver prints every Ray worker's output too

    wait_until(printed, timeout=timeout, interval=1, what=what)


@pytest.fixture(scope="module")
def prometheus_cluster(tmp_path_factory):
    """A Ray head with its dashboard, Prometheus on Ray's generated config (scraping every second),
    finished tiny runs of base_train, chat_sft and chat_rl, and the chat service of a tiny
    checkpoint, all started from this process. Yields what the test needs to reach them."""
    if shutil.which("prometheus") is None:
        pytest.skip("Prometheus is not installed: `make test` installs Debian's package (apt-get install "
                    "prometheus), which failed or was not run on this machine")
    work = tmp_path_factory.mktemp("prometheus")
    runs = str(work / "runs")
    write_pretraining_inputs(work / "shards")
    save_tiny_checkpoint("base", SFT_TAG, str(work / "sft_tokenizer"), sequence_len=SEQ_LEN, meta=BASE_META)
    save_tiny_chat_checkpoint(CHAT_TAG, str(work / "chat_tokenizer"))
    save_tiny_chat_checkpoint(RL_TAG, str(work / "rl_tokenizer"))
    trainers = {"base": ["ray_jobs.base_train", *pretraining_flags(work / "shards", runs), *BASE_FLAGS],
                "sft": ["ray_jobs.chat_sft", *SFT_FLAGS], "rl": ["ray_jobs.chat_rl", *RL_FLAGS]}
    temp_dir = tempfile.mkdtemp(prefix="ray_prom_", dir="/tmp")  # short: Ray's socket paths live there
    ray_port = demo.free_port()
    processes, logs = [], []

    def start(command: list[str], log_name: str, **kwargs) -> tuple[subprocess.Popen, str]:
        log_path = str(work / log_name)
        logs.append(open(log_path, "w"))
        processes.append(subprocess.Popen(command, stdout=logs[-1], stderr=subprocess.STDOUT, **kwargs))
        return processes[-1], log_path

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RAY_metrics_report_interval_ms", "1000")  # reaches the head's workers and replicas
            demo.start_local_head(ray_port, demo.free_port(), temp_dir)
        session = os.path.realpath(os.path.join(temp_dir, "session_latest"))
        generated = os.path.join(session, "metrics", "prometheus", "prometheus.yml")
        wait_until(lambda: os.path.exists(generated), timeout=60, what=f"Ray's Prometheus config {generated}")
        with open(generated) as f:
            ray_config = yaml.safe_load(f)
        config = {**ray_config, "global": {**ray_config["global"], "scrape_interval": "1s",
                                           "evaluation_interval": "1s"}}
        config_path = work / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))

        # A port is free when chosen; a process of the busy machine may take it before Prometheus binds it.
        for attempt in range(1, 4):
            prometheus_port = demo.free_port()
            prometheus, prometheus_log = start(["prometheus", f"--config.file={config_path}",
                                                f"--storage.tsdb.path={work / 'tsdb'}",
                                                f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                                               f"prometheus{attempt}.log")
            try:
                _wait_for_output(prometheus, prometheus_log, "Server is ready to receive web requests", 60,
                                 "Prometheus")
                break
            except AssertionError:
                if attempt == 3 or "address already in use" not in _log(prometheus_log):
                    raise

        # Only once Prometheus scrapes every node: a trainer's gauges are on a node's export
        # endpoint only while its run lasts (and a little after), so no run may finish before
        # the first scrape.
        discovery = os.path.join(session, "prom_metrics_service_discovery.json")
        wait_until(lambda: every_listed_target_up(f"http://127.0.0.1:{prometheus_port}", discovery),
                   timeout=60, interval=1, what="Prometheus scraping every target Ray lists")
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{ray_port}"}
        started = time.time()

        def start_trainer(phase: str) -> tuple[subprocess.Popen, str]:
            return start([sys.executable, "-m", *trainers[phase], "--storage-path", runs, "--run-name", RUNS[phase]],
                         f"{phase}.log", cwd=REPO_ROOT, env=env)

        # chat_sft first, alone until its worker has evaluated step 0. A Ray process drops its
        # metrics until its exporter has reached the node's metrics agent (Ray retries that once
        # a second, for up to 30 s), and chat_sft's 8 steps last seconds: started at once with the
        # other trainers and the chat service on a slow machine, twice no sft series reached
        # Prometheus, though it scraped throughout and the other trainers' series arrived. The
        # other trainers run longer.
        running = {"sft": start_trainer("sft")}
        wait_until(lambda: running["sft"][0].poll() is not None or "| val loss" in _log(running["sft"][1]),
                   timeout=240, interval=0.5, what="chat_sft's first evaluation")
        # Then the chat service and the other trainers at once: they spend most of their time
        # starting processes.
        chat_port = demo.free_port()
        chat, chat_log = start([sys.executable, "-m", "serve", "--model-tag", CHAT_TAG, "--port", str(chat_port),
                                "--replica-cpus", "0.25", "--max-batch-size", "2", "--ingress-min-replicas", "1"],
                               "serve.log", cwd=REPO_ROOT, env=env)
        running.update({phase: start_trainer(phase) for phase in trainers if phase != "sft"})
        for phase, (process, log_path) in running.items():
            assert process.wait(timeout=300) == 0, f"{trainers[phase][0]} failed:\n{_log_tail(log_path)}"
        _wait_for_output(chat, chat_log, "is up: http://", 180, "python -m serve")
        yield {"prometheus": f"http://127.0.0.1:{prometheus_port}", "chat_port": chat_port, "started": started,
               "ray_config": ray_config, "discovery": discovery, "runs": runs}
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        for log in logs:
            log.close()
        demo.stop_head(ray_port)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_prometheus_on_rays_generated_config_has_the_training_runs_and_the_chat_services_series(prometheus_cluster):
    cluster = prometheus_cluster
    url = cluster["prometheus"]
    # Ray's config: one job, whose targets Ray keeps listing in the session's discovery file (every
    # live node's metrics export port, and the autoscaler's and the dashboard's own). Prometheus
    # scrapes each of them.
    discovery = cluster["discovery"]
    assert cluster["ray_config"]["scrape_configs"] == [{"job_name": "ray", "file_sd_configs": [{"files": [discovery]}]}]

    wait_until(lambda: every_listed_target_up(url, discovery), timeout=30, interval=1,
               what="Prometheus scraping every target Ray lists")

    # Three chat requests, each once Prometheus holds what the one before did: a rate needs a
    # counter's increase. The same message each time: the second request is the first to find it
    # in the prefix cache, the third makes the hits counter grow.
    chat = {"model": "nanochat", "messages": [{"role": "user", "content": CACHED_MESSAGE}], "max_tokens": 4,
            "temperature": 0}
    for query in ("ray_nanochat_requests_total", "ray_nanochat_prefix_hit_tokens_total",
                  "increase(ray_nanochat_prefix_hit_tokens_total[1m]) > 0"):
        status, body = request(cluster["chat_port"], "POST", "/v1/chat/completions", chat)
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        wait_until(lambda: prometheus_api(url, "query", query=query)["result"], timeout=30, interval=1,
                   what=f"Prometheus answering {query}")

    # /api/v1/series: what the runs and the chat service really published. Every series the
    # dashboard queries must be among them (a trainer's last gauges reach Prometheus a scrape or two
    # after its run ends), and every series the README lists; each trainer's tagged with its run.
    def published_series() -> list[dict]:
        return prometheus_api(url, "series", **{"match[]": '{__name__=~"ray_nanochat_.*"}', "start": cluster["started"]})

    with contextlib.suppress(AssertionError):  # the assert below names what is missing
        wait_until(lambda: dashboard_metrics() <= {labels["__name__"] for labels in published_series()}, timeout=30,
                   interval=1, what="every series the dashboard queries")
    series = published_series()
    names = {labels["__name__"] for labels in series}
    assert dashboard_metrics() - names == set(), "the dashboard queries series that nobody published"
    assert readme_trainer_series() | set(serve_series()) <= names
    for phase, run in RUNS.items():
        assert {labels["run"] for labels in series if labels["__name__"].startswith(f"ray_nanochat_{phase}_")} == {run}

    # Every query of every panel, over the test's time range as a Grafana panel asks for it,
    # returns values, and a positive one unless its series may honestly read 0 or less.
    queries = dashboard_queries()
    assert len(queries) >= 18 and any("histogram_quantile" in expr for expr in queries)

    def values_over_the_run(expr: str) -> list[float]:
        matrix = prometheus_api(url, "query_range", query=expr, start=cluster["started"], end=time.time(), step=1)
        return [float(value) for found in matrix["result"] for _, value in found["values"]]

    def unanswered(answers: dict[str, list[float]]) -> list[str]:
        return [expr for expr, values in answers.items()
                if not values or not (read_metrics(expr) <= NOT_POSITIVE or any(value > 0 for value in values))]

    with contextlib.suppress(AssertionError):  # the assert below names the queries left without data
        wait_until(lambda: not unanswered({expr: values_over_the_run(expr) for expr in queries}), timeout=30,
                   interval=1, what="every panel's data")
    answers = {expr: values_over_the_run(expr) for expr in queries}
    assert unanswered(answers) == [], "dashboard queries without the data they should have"

    # What Prometheus holds of a trainer's gauge is the run's own record, step by step: the values
    # of that key in the run's history (kept with its checkpoint).
    histories = {phase: latest_run_checkpoint_meta(cluster["runs"], run)["history"] for phase, run in RUNS.items()}
    recorded_steps = {phase: [record["step"] for record in histories[phase] if key in record]
                      for phase, key in (("base", "loss"), ("sft", "loss"), ("rl", "mean_reward"))}
    assert recorded_steps == {"base": list(range(1, BASE_STEPS + 1)), "sft": list(range(1, SFT_STEPS + 1)),
                              "rl": list(range(RL_STEPS))}
    gauges = {expr: TRAINER_GAUGE.fullmatch(expr).groups() for expr in queries if TRAINER_GAUGE.fullmatch(expr)}
    assert len(gauges) >= 12
    for expr, (phase, key) in gauges.items():
        recorded = [record[key] for record in histories[phase] if key in record]
        assert recorded and all(any(math.isclose(value, kept, rel_tol=1e-9) for kept in recorded)
                                for value in answers[expr]), (expr, answers[expr], recorded)
