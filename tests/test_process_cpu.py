"""The CPU census of bench_train (ray_jobs/process_cpu.py): a busy process is counted at about
one core in its group, a sleeping one near zero, and command lines land in the right groups."""
import os
import subprocess
import sys
import time

import pytest

from ray_jobs import process_cpu
from ray_jobs.process_cpu import CPUSampler, classify, summarize

BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"


def test_a_busy_process_counts_about_one_core_and_a_sleeping_one_nothing():
    sampler = CPUSampler(interval_s=0.1)
    sampler.start()
    busy = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=1.5)])
    sleeping = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        time.sleep(0.5)  # past both interpreters' start-up
        start = time.time()
        time.sleep(0.8)
        end = time.time()
    finally:
        busy.wait()
        sleeping.wait()
        sampler.stop()
    census = sampler.usage(start, end)
    seconds, usages = census.seconds, census.processes
    assert 0.5 < seconds <= 0.8
    percent = {pid: 100 * usage.cpu_seconds / seconds for pid, usage in usages.items()}
    # one core's worth on a 2-core machine shared with the sampler and whatever else runs
    assert 60 < percent[busy.pid] < 105
    assert percent.get(sleeping.pid, 0.0) < 5
    assert (usages[busy.pid].name, usages[busy.pid].group) == (os.path.basename(sys.executable), process_cpu.NOT_RAY)
    groups, names = summarize(census)
    assert list(groups) == ["train worker", process_cpu.RAY_WORKERS, process_cpu.RAY_DAEMONS, process_cpu.DRIVER,
                            process_cpu.NOT_RAY]
    assert groups[process_cpu.NOT_RAY] >= percent[busy.pid]
    # the machine's time adds up: what processes used, what was idle, what the hypervisor took
    # (kernel threads and the exited interpreters' start-up are in neither, hence the margin)
    accounted = sum(usage.cpu_seconds for usage in usages.values()) + census.idle_seconds + census.steal_seconds
    assert 0.8 * os.cpu_count() * seconds < accounted < 1.2 * os.cpu_count() * seconds


def test_a_window_with_fewer_than_two_snapshots_is_refused():
    sampler = CPUSampler(interval_s=10)
    sampler.start()
    start = time.time()
    sampler.stop()
    with pytest.raises(ValueError, match="fewer than two snapshots"):
        sampler.usage(start, time.time())


@pytest.mark.parametrize("command, expected", [
    ("ray::RayTrainWorker._RayTrainWorker__execute.get_next", ("ray::RayTrainWorker", "train worker")),
    ("ray::TrainController.run", ("ray::TrainController", process_cpu.RAY_WORKERS)),
    ("ray::IDLE", ("ray::IDLE", process_cpu.RAY_WORKERS)),
    ("ray::DashboardAgent", ("ray::DashboardAgent", process_cpu.RAY_DAEMONS)),
    ("/v/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x",
     ("raylet", process_cpu.RAY_DAEMONS)),
    ("/v/bin/python -u /v/lib/python3.11/site-packages/ray/_private/log_monitor.py --session-dir=x",
     ("log_monitor.py", process_cpu.RAY_DAEMONS)),
    ("/v/bin/python /v/lib/python3.11/site-packages/ray/dashboard/dashboard.py --host=127.0.0.1",
     ("dashboard.py", process_cpu.RAY_DAEMONS)),
    ('ray-dashboard-StateHead-0 (/v/bin/python -B -c "from multiprocessing")', ("ray-dashboard-StateHead-0", process_cpu.RAY_DAEMONS)),
    ("/v/bin/python /v/lib/python3.11/site-packages/ray/_private/workers/setup_worker.py "
     "/v/lib/python3.11/site-packages/ray/_private/workers/default_worker.py --raylet-name=/tmp/ray/raylet",
     ("setup_worker.py", process_cpu.RAY_WORKERS)),
    ("kdamond.0", ("kdamond.0", process_cpu.NOT_RAY)),
])
def test_command_lines_are_named_and_grouped(command, expected):
    assert classify(command, pid=2, driver_pid=1) == expected


def test_the_measured_worker_is_the_one_asked_for():
    replica = "ray::ServeReplica:batching:ChatModel"
    assert classify(replica, pid=2, driver_pid=1, main=process_cpu.MODEL_REPLICA_MAIN) == (replica, "model replica")
    assert classify("ray::ServeReplica:batching:ChatAPI", pid=2, driver_pid=1, main=process_cpu.MODEL_REPLICA_MAIN)[1] \
        == process_cpu.RAY_WORKERS
    assert classify("ray::RayTrainWorker", pid=2, driver_pid=1, main=process_cpu.MODEL_REPLICA_MAIN)[1] \
        == process_cpu.RAY_WORKERS


def test_the_report_lists_groups_processes_idle_steal_and_rays_share():
    census = process_cpu.Census("train worker", 10.0, {
        3: process_cpu.ProcessUsage("ray::RayTrainWorker", "train worker", 18.0),
        4: process_cpu.ProcessUsage("ray::TrainController", process_cpu.RAY_WORKERS, 0.15),
        5: process_cpu.ProcessUsage("gcs_server", process_cpu.RAY_DAEMONS, 0.1),
        6: process_cpu.ProcessUsage("raylet", process_cpu.RAY_DAEMONS, 0.01)}, idle_seconds=1.0, steal_seconds=0.5)
    text = "\n".join(process_cpu.report_lines(census, "CPU during the test"))
    assert "train worker" in text and "180.0%" in text
    assert "ray::TrainController" in text and "1.50%" in text
    assert "gcs_server" in text and "raylet" not in text  # 0.1% of a core is below the 0.3% shown
    assert "idle" in text and "10.0%" in text and "stolen (hypervisor)" in text and "5.0%" in text
    assert process_cpu.ray_share(census) == pytest.approx(0.026 / os.cpu_count())


def test_the_driver_is_its_own_group():
    assert classify("python -m ray_jobs.bench_train", pid=1, driver_pid=1) == ("driver", process_cpu.DRIVER)
