"""Monitoring: the Grafana dashboard in monitoring/ asks only for metrics the code exports, and the
chat service's metrics and a trainer's gauge really reach the node's Prometheus export endpoint
(the one Ray's Prometheus config scrapes), named as the dashboard queries them."""

import json
import os
import re
import urllib.request

import pytest
import ray

from serve.app import ChatAppArgs, build_app
from tests.serve_helpers import request, save_tiny_chat_checkpoint, serve_port, wait_until

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(REPO_ROOT, "monitoring", "grafana_dashboard.json")
# Ray exports a ray.util.metrics metric NAME as ray_NAME; Prometheus adds these suffixes by type.
SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}


def _source(path: str) -> str:
    with open(os.path.join(REPO_ROOT, path)) as f:
        return f.read()


def dashboard_metrics() -> set[str]:
    """The Prometheus series names the dashboard's queries read."""
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    return {name for expr in exprs for name in re.findall(r"\bray_nanochat_\w+", expr)}


def serve_series() -> dict[str, str]:
    """Series name -> metric type of every metric serve/app.py defines."""
    found = re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(\w+)\"", _source("serve/app.py"))
    assert len(found) >= 5, found
    return {f"ray_{name}{suffix}": kind for kind, name in found for suffix in SUFFIXES[kind]}


def trainer_series() -> set[str]:
    """ray_<prefix>_<key> for each trainer that creates TrainMetrics(..., "<prefix>", ...) and each
    dict key its source writes (`"key": value` or `record["key"] = value`): the gauges its
    publish() calls can make."""
    series = set()
    for module in ("base_train", "chat_sft", "chat_rl"):
        source = _source(f"ray_jobs/{module}.py")
        prefixes = re.findall(r"TrainMetrics\([^,]+,\s*\"(\w+)\"", source)
        assert len(prefixes) == 1, (module, prefixes)
        written = re.findall(r"\"(\w+)\":|\[\"(\w+)\"\]\s*=[^=]", source)
        series |= {f"ray_{prefixes[0]}_{key}" for pair in written for key in pair if key}
    return series


def test_the_dashboard_is_valid_grafana_json_and_queries_only_exported_metrics():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert graphs and all(panel["targets"] and panel["datasource"]["uid"] == "${datasource}" for panel in graphs)
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]

    queried = dashboard_metrics()
    exported = set(serve_series()) | trainer_series()
    assert queried - exported == set(), "the dashboard queries metrics no code exports"
    # The panels the README promises: training loss, val bpb, tokens/s and MFU, and every serve metric.
    for name in ("ray_nanochat_base_loss", "ray_nanochat_base_val_bpb", "ray_nanochat_base_tokens_per_second",
                 "ray_nanochat_base_mfu", "ray_nanochat_rl_mean_reward"):
        assert name in queried
    kinds_queried = {serve_series()[name] for name in queried if name in serve_series()}
    assert kinds_queried == {"Counter", "Gauge", "Histogram"}
    assert {n.removeprefix("ray_") for n in serve_series()} >= {"nanochat_requests_total",
                                                                "nanochat_time_to_first_token_seconds_bucket"}


def test_the_trainer_series_check_is_not_vacuous():
    assert "ray_nanochat_base_tokens_per_second" in trainer_series()
    assert "ray_nanochat_base_no_such_key" not in trainer_series()
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
    status, body = request(metrics_app, "POST", "/metrics-test/v1/chat/completions",
                           {"model": "nanochat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                            "temperature": 0})
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
    assert sum(value for _, value in values["ray_nanochat_generated_tokens_total"]) >= 4
    assert [value for labels, value in values["ray_nanochat_base_loss"] if 'run="monitoring-test"' in labels] == [3.25]
    assert "ray_nanochat_base_note" not in values  # publish() skips values that are not numbers
