"""Which processes of this machine used its CPU while a benchmark ran: a census of CPU time per
process, sampled in a background thread and read back over any window of the run.

bench_train and bench_serve use it to show where the cores go while a Ray workload runs on a
local cluster: the worker being measured (base_train's train worker, the chat model's replica),
the other Ray worker processes (Ray Train's and Ray Data's actors, Serve's controller, proxy and
ingress, pooled workers), Ray's daemons (GCS, raylet, dashboard and its agents, the log monitor),
the driver, and what is not Ray at all (the machine's own processes).

    with CPUSampler(main=TRAIN_WORKER_MAIN) as sampler:   # or start() and stop()
        ...                                              # the run
    census = sampler.usage(t0, t1)         # a Census of [t0, t1] (time.time() stamps)
    groups, names = summarize(census)      # % of one core by group and by process name
    print("\n".join(report_lines(census, "CPU during the run")))

Besides the processes, a census holds what the kernel counts for the whole machine: idle time,
and the time a virtual machine's hypervisor ran other guests on its cores (steal), which no
process's CPU time shows and which slows every process alike.
"""

import os
import threading
import time
from dataclasses import dataclass

import psutil

RAY_WORKERS = "other Ray workers"
RAY_DAEMONS = "Ray daemons"
DRIVER = "driver"
NOT_RAY = "not Ray"
# The measured worker: (a part of its process title, its group's name).
TRAIN_WORKER_MAIN = ("ray::RayTrainWorker", "train worker")
MODEL_REPLICA_MAIN = (":ChatModel", "model replica")

# Ray worker processes retitle themselves `ray::<actor class or task>`; these few `ray::` titles
# are node daemons that Ray starts with the node, not workers of a job.
DAEMON_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
# A worker process that has not retitled itself yet runs one of Ray's worker scripts (through
# setup_worker.py when the job has a runtime environment).
WORKER_MARKERS = ("/ray/_private/workers/",)
# Daemons that keep their command line: executables and scripts under Ray's package folder, and
# the dashboard's module processes (titled ray-dashboard-<Module>-<n>).
DAEMON_MARKERS = ("/ray/core/src/ray/", "/ray/dashboard/", "/ray/_private/log_monitor.py",
                  "/ray/autoscaler/", "ray-dashboard-")


@dataclass(frozen=True)
class ProcessUsage:
    name: str
    group: str
    cpu_seconds: float


@dataclass(frozen=True)
class Census:
    main_group: str                       # the measured worker's group
    seconds: float                        # the wall time covered
    processes: dict[int, ProcessUsage]    # by pid, the processes that used CPU in it
    idle_seconds: float                   # CPU time of all cores that nothing used
    steal_seconds: float                  # CPU time of all cores that the hypervisor gave elsewhere


def classify(command: str, pid: int, driver_pid: int, main: tuple[str, str] = TRAIN_WORKER_MAIN) -> tuple[str, str]:
    """(short name, group) of a process from its command line; `main` picks the measured worker."""
    if pid == driver_pid:
        return "driver", DRIVER
    if command.startswith("ray::"):
        title = command.split()[0].split(".")[0]  # ray::Class.method: the class names the actor
        if title in DAEMON_TITLES:
            return title, RAY_DAEMONS
        return title, main[1] if main[0] in title else RAY_WORKERS
    if any(marker in command for marker in WORKER_MARKERS):
        script = next(part for part in command.split() if any(marker in part for marker in WORKER_MARKERS))
        return os.path.basename(script), RAY_WORKERS
    for marker in DAEMON_MARKERS:
        if marker in command:
            executable = command.split()[0]
            script = next((part for part in command.split() if part.endswith(".py")), executable)
            return os.path.basename(script if marker != "ray-dashboard-" else executable), RAY_DAEMONS
    return os.path.basename(command.split()[0]) if command else "?", NOT_RAY


class CPUSampler:
    """Snapshots of every process's CPU time (user + system) every `interval_s` seconds. A snapshot
    of 100 processes costs the sampling process about 10 ms of CPU (counted in the driver's share),
    hence the 2 s default. `main`: the measured worker (TRAIN_WORKER_MAIN, MODEL_REPLICA_MAIN)."""

    def __init__(self, interval_s: float = 2.0, main: tuple[str, str] = TRAIN_WORKER_MAIN):
        self.interval_s = interval_s
        self.main = main
        self.driver_pid = os.getpid()
        self._snapshots: list[tuple[float, dict[int, tuple[str, float, float]], tuple[float, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._snapshots.append(self._snapshot())

    def __enter__(self) -> "CPUSampler":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._snapshots.append(self._snapshot())
            self._stop.wait(self.interval_s)

    @staticmethod
    def _snapshot() -> tuple[float, dict[int, tuple[str, float, float]], tuple[float, float]]:
        """(time, {pid: (command line, start time, CPU seconds)}, (machine idle, steal seconds))."""
        stamp = time.time()
        processes = {}
        for process in psutil.process_iter(["cmdline", "name", "create_time", "cpu_times"]):
            times = process.info["cpu_times"]
            if times is None:  # gone, or not ours to read
                continue
            command = " ".join(process.info["cmdline"] or []) or process.info["name"] or ""
            processes[process.pid] = (command, process.info["create_time"], times.user + times.system)
        machine = psutil.cpu_times()
        return stamp, processes, (machine.idle, getattr(machine, "steal", 0.0))

    def usage(self, start: float, end: float) -> Census:
        """The Census between the first snapshot at or after `start` and the
        last at or before `end` (time.time() stamps), so that nothing outside [start, end] counts;
        a process counts the CPU it used between the two, or since it started. It is named by its
        newest command line (a Ray worker retitles itself when it takes an actor); one that exited
        in between is not counted."""
        inside = [snapshot for snapshot in self._snapshots if start <= snapshot[0] <= end]
        if len(inside) < 2:
            raise ValueError(f"fewer than two snapshots fall in the {end - start:.1f} s asked for (one every "
                             f"{self.interval_s:g} s): sample more often, or over a longer window")
        before, after = inside[0], inside[-1]
        usages = {}
        for pid, (command, started, cpu) in after[1].items():
            previous = before[1].get(pid)
            used = cpu - previous[2] if previous is not None and previous[1] == started else cpu
            if used > 0:
                name, group = classify(command, pid, self.driver_pid, self.main)
                usages[pid] = ProcessUsage(name, group, used)
        return Census(self.main[1], after[0] - before[0], usages, after[2][0] - before[2][0],
                      after[2][1] - before[2][1])


def summarize(census: Census) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Percent of one core per group (every group present, 0 when idle) and per (group, name)."""
    groups = dict.fromkeys((census.main_group, RAY_WORKERS, RAY_DAEMONS, DRIVER, NOT_RAY), 0.0)
    names: dict[tuple[str, str], float] = {}
    for usage in census.processes.values():
        percent = 100 * usage.cpu_seconds / census.seconds
        groups[usage.group] += percent
        names[(usage.group, usage.name)] = names.get((usage.group, usage.name), 0.0) + percent
    return groups, names


def ray_share(census: Census) -> float:
    """The share of the machine's CPU (0-1) that Ray's processes took besides the measured worker."""
    seconds = sum(usage.cpu_seconds for usage in census.processes.values() if usage.group in (RAY_WORKERS, RAY_DAEMONS))
    return seconds / (census.seconds * (os.cpu_count() or 1))


def census_or_none(sampler: CPUSampler, start: float, end: float, what: str) -> Census | None:
    """sampler.usage(start, end), or None after a line saying why `what` has no census (a run
    shorter than two of the sampler's snapshots)."""
    try:
        return sampler.usage(start, end)
    except ValueError as error:
        print(f"no CPU census of {what}: {error}", flush=True)
        return None


def report_lines(census: Census, heading: str, min_percent: float = 0.3) -> list[str]:
    """The census as text, in % of one core: each group, under it each process (by name) that took
    at least `min_percent`, the machine's idle time and the hypervisor's steal, and the share of
    the machine that Ray's processes took besides the measured worker."""
    groups, names = summarize(census)
    lines = [f"{heading}, % of one core ({os.cpu_count()} cores, {census.seconds:.0f} s):"]
    for group, percent in groups.items():
        lines.append(f"  {group:<20}{percent:>8.1f}%")
        if group != census.main_group:
            lines += [f"      {name:<40}{name_percent:>6.2f}%"
                      for (name_group, name), name_percent in sorted(names.items(), key=lambda item: -item[1])
                      if name_group == group and name_percent >= min_percent]
    lines.append(f"  {'idle':<20}{100 * census.idle_seconds / census.seconds:>8.1f}%")
    lines.append(f"  {'stolen (hypervisor)':<20}{100 * census.steal_seconds / census.seconds:>8.1f}%")
    lines.append(f"Ray's processes besides the {census.main_group} took {100 * ray_share(census):.1f}% of the "
                 f"machine's CPU")
    return lines
