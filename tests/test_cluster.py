"""The cluster configs: cluster.yaml passes Ray's own launcher schema offline and carries what a
GPU cluster needs (a head that offers no CPUs, EFA interfaces in a cluster placement group, the
NCCL settings that reach `ray start`, checkpoints in S3), and cluster-local.yaml drives Ray's
autoscaler on fake nodes on this machine, where a Serve deployment that scales up gets new nodes
for its replicas.

The fake cluster is a separate Ray instance: its own temp dir, its own ports, and a process
session of its own, so that the test can stop exactly what it started while other Ray
instances (the session's `ray_local`, other runs on the machine) keep running. Its driver runs
in a subprocess because this process may already be connected to `ray_local`.
"""

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import jsonschema
import psutil
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ray_jobs import speedrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(REPO, "cluster.yaml")
CLUSTER_LOCAL_YAML = os.path.join(REPO, "cluster-local.yaml")


def _load(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _prepared_cluster_config() -> dict:
    config = prepare_config(_load(CLUSTER_YAML))
    validate_config(config)
    return config


# ---------------------------------------------------------------- cluster.yaml (AWS, offline)

def test_cluster_yaml_passes_rays_launcher_schema_with_cpu_head_and_h100_workers():
    config = _prepared_cluster_config()
    assert config["provider"]["type"] == "aws"
    head_type = config["head_node_type"]
    node_types = config["available_node_types"]
    assert node_types[head_type]["node_config"]["InstanceType"] == "m6i.2xlarge"
    assert node_types[head_type]["max_workers"] == 0
    workers = {name: spec for name, spec in node_types.items() if name != head_type}
    assert list(workers) == ["gpu_8xh100"]
    gpu = workers["gpu_8xh100"]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    assert (gpu["min_workers"], gpu["max_workers"]) == (1, 2)
    assert config["max_workers"] == 2


def test_cluster_yaml_installs_the_project_with_cuda_torch_and_shares_the_base_dir():
    config = _prepared_cluster_config()
    common = config["setup_commands"]
    assert "pip install torch" in common
    assert any("NANOCHAT_BASE_DIR=/mnt/nanochat" in cmd for cmd in common)
    # prepare_config prepends the common commands to the head's and the workers' own.
    head_only = config["head_setup_commands"][len(common):]
    worker_only = config["worker_setup_commands"][len(common):]
    assert "pip install -e ~/nanochat-ray" in head_only
    assert any("nanochat-ray[gpu]" in cmd for cmd in worker_only)
    assert any("/etc/exports" in cmd for cmd in head_only)
    assert any("$RAY_HEAD_IP:/mnt/nanochat /mnt/nanochat" in cmd for cmd in worker_only)


def test_cluster_yaml_file_mounts_point_at_this_checkout_and_carry_rays_token():
    mounts = dict(_prepared_cluster_config()["file_mounts"])
    assert mounts.pop("~/.ray/auth_token") == "~/.ray/auth_token"
    assert set(mounts) == {f"~/nanochat-ray/{name}" for name in
                           ("pyproject.toml", "README.md", "nanochat", "ray_jobs", "serve")}
    for local in mounts.values():
        assert os.path.exists(os.path.join(REPO, local)), f"{local} is not in the repository"


def test_cluster_yaml_nodes_start_ray_with_token_authentication(tmp_path):
    """The token setup commands run in a home with the token that file_mounts copied; then the
    head's start commands run, in a shell that reads ~/.bashrc as Ray's login shells do, with a
    stand-in `ray` that prints its environment: `ray start --head` gets RAY_AUTH_MODE=token, and
    only the node's user can read the token."""
    config = _prepared_cluster_config()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ray", "serve"):
        (bin_dir / tool).write_text("#!/bin/sh\n[ \"$1\" = start ] && env\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    token_setup = [cmd for cmd in config["setup_commands"] if "auth_token" in cmd or "RAY_AUTH_MODE" in cmd]
    subprocess.run(["bash", "-c", "; ".join(token_setup)], env=env, check=True)
    out = subprocess.run(["bash", "-c", "source ~/.bashrc; " + "; ".join(config["head_start_ray_commands"])],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "RAY_AUTH_MODE=token" in out.splitlines()
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o077 == 0


def test_cluster_yaml_head_exposes_dashboard_and_serve_ports():
    head_start = " ".join(_prepared_cluster_config()["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head_start
    assert "--dashboard-port=8265" in head_start
    assert "serve start --http-host 0.0.0.0 --http-port 8000" in head_start


def test_cluster_yaml_head_offers_no_cpus_so_job_drivers_run_on_the_workers():
    config = _prepared_cluster_config()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "ray start --head --num-cpus=0 " in " ".join(config["head_start_ray_commands"])
    # The GPU presets' stage drivers, and the README's cluster submissions, ask for a CPU.
    assert speedrun.ENTRYPOINT_NUM_CPUS == {"tiny": 0, "gpt2": 1, "d20": 1, "d26": 1}
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    submits = [line for line in readme.splitlines() if line.startswith("ray job submit ")]
    assert len(submits) == 13 and all("--entrypoint-num-cpus=1" in line for line in submits)
    header_submit = next(line for line in open(CLUSTER_YAML) if "ray job submit" in line)
    assert "--entrypoint-num-cpus=1" in header_submit


def test_cluster_yaml_gpu_nodes_have_32_efa_interfaces_in_a_cluster_placement_group():
    config = _prepared_cluster_config()
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    gpu = config["available_node_types"]["gpu_8xh100"]["node_config"]
    assert gpu["Placement"] == {"GroupName": "nanochat-p5"}
    interfaces = gpu["NetworkInterfaces"]
    assert [i["NetworkCardIndex"] for i in interfaces] == list(range(32))
    assert [i["DeviceIndex"] for i in interfaces] == [0] + [1] * 31
    assert {i["InterfaceType"] for i in interfaces} == {"efa"}
    # Ray's AWS bootstrap takes subnet and groups from every interface and refuses them at the
    # node level beside NetworkInterfaces; the head shares them (its group lets the nodes talk).
    assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(gpu)
    assert {i["SubnetId"] for i in interfaces} == set(head["SubnetIds"])
    assert {g for i in interfaces for g in i["Groups"]} == set(head["SecurityGroupIds"])
    # Multi-interface nodes get no public IP: the launcher and the nodes use private ones.
    assert config["provider"]["use_internal_ips"] is True


def test_cluster_yaml_sets_what_nccl_needs_to_use_efa(tmp_path):
    """The worker start command runs with a stand-in `ray` that prints its environment: the NCCL
    and libfabric settings and the plugin's folder reach `ray start`, hence every train worker."""
    config = _prepared_cluster_config()
    worker_setup = " ".join(config["worker_setup_commands"])
    assert "fi_info -p efa" in worker_setup and "libnccl-net*.so" in worker_setup
    assert "> ~/nanochat-efa.sh" in worker_setup
    (tmp_path / "nanochat-efa.sh").write_text("export LD_LIBRARY_PATH=/opt/amazon/ofi-nccl/lib:$LD_LIBRARY_PATH\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text("#!/bin/sh\n[ \"$1\" = start ] && env\nexit 0\n")
    (bin_dir / "ray").chmod(0o755)
    env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.1"}
    out = subprocess.run(["bash", "-c", "; ".join(config["worker_start_ray_commands"])], env=env,
                         capture_output=True, text=True, check=True).stdout
    started = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert started["FI_PROVIDER"] == "efa" and started["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert started["NCCL_SOCKET_IFNAME"] == "^lo,docker"
    assert started["NCCL_DEBUG"] == "INFO" and "NET" in started["NCCL_DEBUG_SUBSYS"].split(",")
    assert started["LD_LIBRARY_PATH"].startswith("/opt/amazon/ofi-nccl/lib:")
    with open(os.path.join(REPO, "README.md")) as f:
        assert 'grep -E "NET/OFI|Using network"' in f.read()  # how to confirm EFA on the first run


def test_cluster_yaml_keeps_checkpoints_in_s3_that_every_node_reaches():
    config = _prepared_cluster_config()
    storage = next(cmd for cmd in config["setup_commands"] if "NANOCHAT_STORAGE" in cmd)
    assert "export NANOCHAT_STORAGE=s3://nanochat-$(" in storage and "-us-west-2/ray_runs" in storage
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["IamInstanceProfile"] == {"Name": "nanochat-node"}
    head_only = config["head_setup_commands"][len(config["setup_commands"]):]
    assert any("head_bucket" in cmd for cmd in head_only)


def test_rays_schema_rejects_a_misspelled_key_so_the_validation_has_teeth():
    raw = _load(CLUSTER_YAML)
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_8xh100"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(broken))


# ---------------------------------------------------------------- cluster-local.yaml (fake nodes)

def test_cluster_local_yaml_is_a_complete_config_for_the_fake_provider():
    config = _load(CLUSTER_LOCAL_YAML)
    # Ray 2.60 ships no defaults for this provider, so the file must pass the schema as written.
    validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    worker = config["available_node_types"]["replica_node"]
    assert worker["resources"] == {"CPU": 1, "replica_slot": 1}
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {}


# The driver of the fake cluster: a Serve deployment whose replicas each need a replica_slot,
# which only new nodes have. Load makes Serve want a second replica, hence a second node.
_DRIVER = textwrap.dedent('''
    import asyncio, json, sys, time
    import ray
    from ray import serve

    ray.init(address=sys.argv[1], log_to_driver=False)

    def alive():
        return [n for n in ray.nodes() if n["Alive"]]

    head = next(n["NodeID"] for n in alive() if "node:__internal_head__" in n["Resources"])
    nodes_before = len(alive())

    @serve.deployment(
        ray_actor_options={"num_cpus": 0, "resources": {"replica_slot": 1}},
        autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                            "upscale_delay_s": 0.5, "downscale_delay_s": 600,
                            "look_back_period_s": 2},
    )
    class WhereAmI:
        async def __call__(self, seconds: float) -> str:
            await asyncio.sleep(seconds)
            return ray.get_runtime_context().get_node_id()

    serve.start(proxy_location="Disabled")
    handle = serve.run(WhereAmI.bind(), name="where", route_prefix=None)
    first = handle.remote(0.0).result()
    nodes_with_one_replica = len(alive())

    replica_nodes = {first}
    deadline = time.time() + 45
    while len(replica_nodes) < 2 and time.time() < deadline:
        replies = [handle.remote(0.5) for _ in range(6)]
        replica_nodes |= {reply.result() for reply in replies}

    slot_nodes = sorted(n["NodeID"] for n in alive() if n["Resources"].get("replica_slot"))
    print("RESULT " + json.dumps({
        "head": head, "nodes_before": nodes_before,
        "nodes_with_one_replica": nodes_with_one_replica, "nodes_after_load": len(alive()),
        "replica_nodes": sorted(replica_nodes), "slot_nodes": slot_nodes,
    }), flush=True)
    serve.shutdown()
''')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _fake_cluster_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_USAGE_STATS_ENABLED="0",
               # A token in ~/.ray would switch the head to token auth but not the driver.
               RAY_AUTH_MODE="disabled")
    return env


def _kill_session(session_id: int, timeout_s: float = 15.0) -> None:
    """SIGKILL every process of the session that `ray start` opened (its daemons, the fake nodes
    the autoscaler launched, their workers): `ray stop --force` for this cluster only."""
    deadline = time.time() + timeout_s
    while True:
        members = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == session_id:
                    members.append(proc.pid)
            except (ProcessLookupError, PermissionError):
                continue
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.time() > deadline:
            raise RuntimeError(f"processes {members} of the fake cluster survived SIGKILL")
        time.sleep(0.2)


@pytest.mark.timeout(150)
def test_serve_replicas_asking_for_slots_make_the_autoscaler_add_fake_nodes():
    ip = ray.util.get_node_ip_address()
    gcs_port = _free_port()
    # Unix socket paths must stay short: a temp dir directly under /tmp, not pytest's tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="ncfake", dir="/tmp")
    config = _load(CLUSTER_LOCAL_YAML)
    config["provider"]["gcs_address"] = f"{ip}:{gcs_port}"
    config_path = os.path.join(temp_dir, "autoscaler.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)
    driver_path = os.path.join(temp_dir, "driver.py")
    with open(driver_path, "w") as f:
        f.write(_DRIVER)

    env = _fake_cluster_env()
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
             f"--port={gcs_port}", f"--temp-dir={temp_dir}", f"--autoscaling-config={config_path}",
             "--num-cpus=1", "--include-dashboard=false",
             f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
             "--dashboard-agent-listen-port=0", "--disable-usage-stats"]
    head = subprocess.Popen(start, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        start_log, _ = head.communicate(timeout=60)
        assert head.returncode == 0, f"`ray start` of the fake cluster failed:\n{start_log[-3000:]}"
        driver = subprocess.run([sys.executable, driver_path, f"{ip}:{gcs_port}"], env=env,
                                capture_output=True, text=True, timeout=75)
        results = [line for line in driver.stdout.splitlines() if line.startswith("RESULT ")]
        assert driver.returncode == 0 and results, (
            f"the fake-cluster driver failed (rc={driver.returncode}):\n"
            f"{driver.stdout[-2000:]}\n{driver.stderr[-4000:]}")
    finally:
        _kill_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)

    seen = json.loads(results[-1][len("RESULT "):])
    # The head alone at first; one new node for the first replica, another when load scaled up.
    assert seen["nodes_before"] == 1
    assert seen["nodes_with_one_replica"] == 2
    assert seen["nodes_after_load"] == 3
    assert len(seen["replica_nodes"]) == 2, "the second replica never ran on a node of its own"
    assert seen["head"] not in seen["replica_nodes"]
    assert seen["replica_nodes"] == seen["slot_nodes"]
