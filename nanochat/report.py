"""The report card of a pipeline run: each stage records what it did, and the end of the run
turns those records into one `report.md` with a metrics table and training plots.

Every stage calls, from one process (its job driver or rank 0):

    Report().log_stage("base_train", source="base", config={...}, timings={"wall_s": 812.0},
                       metrics={"val_bpb": 0.81}, history=[{"step": 0, "time": 0.0, "loss": 10.9}, ...])

which writes `<base>/report/stage-base_train-base.json` under a temporary name and renames it into
place, so a crash never leaves half a section and a rerun of a stage replaces its old section.
A trainer's per-step records (Unix time at the end of each step) become such a history with
`stage_history(records)`. The pipeline driver (ray_jobs.speedrun) then adds each stage's wall time,
job start-up included, with `Report().record_wall_time(stage, seconds)`.
Keeping one file per stage, rather than one growing file, lets stages run as separate Ray jobs
(and resume with `--from`) without sharing any state but the base dir.

`Report().reset()` starts a fresh run: it removes the previous sections and plots and records the
system (git commit, torch and Ray versions, CPU, GPU, date). `Report().write_report()` then
assembles `<base>/report/report.md`:

- the metrics table: CORE, val bpb, ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee,
  Arithmetic and ChatCORE, one row for each metric some stage measured, one column per model (base, sft,
  rl), '-' where a model was not run or not measured; ChatCORE is nanochat's, over ARC-Easy,
  ARC-Challenge, MMLU, GSM8K and HumanEval only (nanochat.chat_eval), so SpellingBee and Arithmetic
  are rows of their own; under it, the protocol lines: one per way of matching "####" answers that
  an eval or RL stage used ("GSM8K answers: exact, as nanochat ...", or lenient when asked for),
  and one per HumanEval harness that an eval that ran HumanEval used ("HumanEval harness:
  nanochat's ...", or lenient);
- PNG plots, linked from the markdown: training loss and val bpb against step and against wall
  time, and the RL mean reward against step, drawn from the histories the stages recorded;
- one section per stage with its config, timings and all its metrics.

`source` names the model a stage trained or evaluated, as checkpoints do (base, sft, rl); metric
names match the table whatever their spelling ("ARC-Easy", "arc_easy" and "arc-easy" are one
metric). Plots use matplotlib's Agg canvas directly, so no display and no pyplot state is needed.
"""

import argparse
import datetime
import glob
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import socket
import subprocess
import time

import psutil
import torch

from nanochat.files import atomic_write_bytes, get_base_dir
from nanochat.tasks.common import ANSWER_MATCHING
from nanochat.tasks.humaneval import HUMANEVAL_HARNESSES

SOURCES = ("base", "sft", "rl")

# (row label, normalized metric name) of the metrics table, in display order.
TABLE_METRICS = (
    ("CORE", "core"),
    ("val bpb", "valbpb"),
    ("ARC-Easy", "arceasy"),
    ("ARC-Challenge", "arcchallenge"),
    ("MMLU", "mmlu"),
    ("GSM8K", "gsm8k"),
    ("HumanEval", "humaneval"),
    ("SpellingBee", "spellingbee"),
    ("Arithmetic", "arithmetic"),  # the offline task of the tiny preset
    ("ChatCORE", "chatcore"),
)

# (file name, history key, x axis key, title): the plots write_report draws when some stage's
# history has the values. The reward plot only looks at RL stages.
PLOTS = (
    ("loss_vs_step.png", "loss", "step", "Training loss"),
    ("loss_vs_time.png", "loss", "time", "Training loss"),
    ("val_bpb_vs_step.png", "val_bpb", "step", "Validation bits per byte"),
    ("val_bpb_vs_time.png", "val_bpb", "time", "Validation bits per byte"),
    ("rl_reward_vs_step.png", "reward", "step", "RL mean reward"),
)

_STAGE_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_SYSTEM_FILE = "system.json"
_REPORT_FILE = "report.md"


def normalize_metric_name(name: str) -> str:
    """'ARC-Easy', 'arc_easy' and 'arc easy' all become 'arceasy'."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def stage_history(records: list[dict], keys: tuple[str, ...] = ("loss", "val_bpb", "reward")) -> list[dict]:
    """A trainer's records -> the report's history: {'step', 'time', and whichever of `keys` the
    record has}, 'time' in seconds since the first step began.

    A training record carries 'time' (Unix time at the end of its step) and 'step_seconds'; a record
    without a time (an evaluation) takes the time of the record before it. Records with none of
    `keys` (e.g. a 'restored_from_checkpoint' marker) are left out."""
    history, start, elapsed = [], None, 0.0
    for record in records:
        timestamp = record.get("time")
        if isinstance(timestamp, (int, float)):
            if start is None:
                start = timestamp - record.get("step_seconds", 0.0)
            elapsed = timestamp - start
        values = {key: record[key] for key in keys if isinstance(record.get(key), (int, float))}
        if "step" in record and values:
            history.append({"step": record["step"], "time": elapsed, **values})
    return history


def _jsonable(value):
    """numpy and torch values become plain numbers (lists for arrays); anything else becomes text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=2, default=_jsonable).encode("utf-8")


def format_duration(seconds: float) -> str:
    """3725 -> '1h 02m 05s'; 42.5 -> '42.5s'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _format_value(value, float_format: str = ".6g") -> str:
    """Table metrics use '.4f' (scores side by side); configs and stage details keep 6 digits,
    so that a learning rate of 3e-5 does not print as 0.0000."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, float_format)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def git_commit() -> str:
    """The commit of the checkout this code runs from, with '(dirty)' when it has changes. A Ray
    job's uploaded working dir has no .git, so there the submitter's answer comes in
    $NANOCHAT_GIT_COMMIT (ray_jobs.speedrun passes it on to every job); 'n/a' when neither knows."""
    if os.environ.get("NANOCHAT_GIT_COMMIT"):
        return os.environ["NANOCHAT_GIT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return "n/a"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    dirty = " (dirty)" if status.returncode == 0 and status.stdout.strip() else ""
    return commit.stdout.strip() + dirty


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_info() -> dict:
    """What ran this pipeline: date, host, git commit, versions, CPU, memory and GPUs."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "ray": _package_version("ray"),
        "cpu": f"{os.cpu_count()} x {_cpu_name()}",
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
    }


class Report:
    """The report folder `<base_dir>/report` (base_dir defaults to NANOCHAT_BASE_DIR)."""

    def __init__(self, base_dir: str | None = None):
        self.base_dir = base_dir if base_dir is not None else get_base_dir()
        self.dir = os.path.join(self.base_dir, "report")

    # ------------------------------------------------------------------ recording

    def reset(self) -> None:
        """Start a fresh run: drop the previous run's sections, plots and report.md, record the system."""
        os.makedirs(self.dir, exist_ok=True)
        for pattern in ("stage-*.json", "*.png", _SYSTEM_FILE, _REPORT_FILE):
            for path in glob.glob(os.path.join(self.dir, pattern)):
                os.remove(path)
        atomic_write_bytes(os.path.join(self.dir, _SYSTEM_FILE), _json_bytes(system_info()))

    def log_stage(self, stage: str, *, source: str | None = None, config: dict | None = None,
                  timings: dict | None = None, metrics: dict | None = None,
                  history: list[dict] | None = None) -> str:
        """Record one stage's section and return its path.

        stage:   the stage's name, letters, digits and '_' (e.g. 'base_train', 'chat_eval').
        source:  the model it trained or evaluated: 'base', 'sft' or 'rl' (its metrics go to that
                 column of the table); None for stages without a model (data, tokenizer).
        config:  the resolved settings; timings: name -> seconds ('wall_s' adds to the total);
        metrics: final values; history: one dict per logged step, with 'step' and optionally
                 'time' (seconds since the stage began), 'loss', 'val_bpb', 'reward', ...
        """
        if not isinstance(stage, str) or not _STAGE_NAME.match(stage):
            raise ValueError(f"stage must be a name of letters, digits and '_' such as 'base_train', got {stage!r}")
        if source is not None and source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES} or None, got {source!r}")
        for name, value in (("config", config), ("timings", timings), ("metrics", metrics)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
        for name, value in (timings or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"timings[{name!r}] must be a number of seconds, got {value!r}")
        history = list(history or [])
        for i, entry in enumerate(history):
            if not isinstance(entry, dict) or "step" not in entry:
                raise ValueError(f"history[{i}] must be a dict with a 'step' key, got {entry!r}")
        section = {"stage": stage, "source": source, "logged_at": time.time(), "config": config or {},
                   "timings": timings or {}, "metrics": metrics or {}, "history": history}
        name = f"stage-{stage}" + (f"-{source}" if source else "") + ".json"
        path = os.path.join(self.dir, name)
        atomic_write_bytes(path, _json_bytes(section))
        return path

    def record_wall_time(self, stage: str, seconds: float) -> None:
        """Set timings['wall_s'] of the newest section of `stage` (which its driver logged), or log a
        section with only that timing when the stage's driver logged none."""
        newest = None
        for path in glob.glob(os.path.join(self.dir, f"stage-{stage}.json")) + \
                glob.glob(os.path.join(self.dir, f"stage-{stage}-*.json")):
            section = self._read_json(path)
            if section["stage"] == stage and (newest is None or section["logged_at"] > newest[1]["logged_at"]):
                newest = (path, section)
        if newest is None:
            self.log_stage(stage, timings={"wall_s": float(seconds)})
            return
        path, section = newest
        section["timings"]["wall_s"] = float(seconds)
        atomic_write_bytes(path, _json_bytes(section))

    # ------------------------------------------------------------------ reading

    def _read_json(self, path: str):
        try:
            with open(path) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"report file {path} is not valid JSON ({e}): delete it and rerun the stage "
                             "that wrote it, or call Report.reset() to start over") from None

    def sections(self) -> list[dict]:
        """The recorded stage sections, in the order they were logged."""
        paths = glob.glob(os.path.join(self.dir, "stage-*.json"))
        return sorted((self._read_json(p) for p in paths), key=lambda s: s["logged_at"])

    def system(self) -> dict:
        """The system recorded by reset(), or the current one when the run never called reset()."""
        path = os.path.join(self.dir, _SYSTEM_FILE)
        return self._read_json(path) if os.path.exists(path) else system_info()

    def metrics_table(self) -> list[tuple[str, dict[str, object]]]:
        """(row label, {source: value}) for each table metric some model has; a later section
        overrides an earlier one's value for the same model and metric."""
        values: dict[str, dict[str, object]] = {}
        for section in self.sections():
            if section["source"] is None:
                continue
            for name, value in section["metrics"].items():
                values.setdefault(normalize_metric_name(name), {})[section["source"]] = value
        return [(label, values[key]) for label, key in TABLE_METRICS if key in values]

    @staticmethod
    def protocol_lines(sections: list[dict]) -> list[str]:
        """The protocol lines under the metrics table: for each way of matching "####" answers that
        a stage's config records (chat_eval's --answer-matching, chat_rl's reward), and for each
        HumanEval harness that an eval which ran HumanEval records (--humaneval-harness), which one
        it is and which stages used it."""
        stages_by_line: dict[tuple[str, str], list[str]] = {}
        for section in sections:
            config = section.get("config") or {}
            name = section["stage"] + (f" ({section['source']})" if section["source"] else "")
            matching = config.get("answer_matching")
            if matching is not None:
                stages_by_line.setdefault(("GSM8K answers", ANSWER_MATCHING.get(matching, matching)), []).append(name)
            harness = config.get("humaneval_harness")
            if harness is not None and "humaneval" in (config.get("tasks") or []):
                stages_by_line.setdefault(("HumanEval harness", HUMANEVAL_HARNESSES.get(harness, harness)),
                                          []).append(name)
        notes = {"GSM8K answers": " SpellingBee and Arithmetic follow the same rule."}
        in_order = sorted(stages_by_line.items(), key=lambda item: item[0][0] != "GSM8K answers")  # answers first
        return [line for (what, rule), stages in in_order
                for line in ("", f"{what}: {rule}; used by {', '.join(stages)}.{notes.get(what, '')}")]

    # ------------------------------------------------------------------ writing

    def _plot(self, filename: str, key: str, x_key: str, title: str, sections: list[dict]) -> bool:
        """Draw `key` against `x_key` for every section whose history has both; False if none has."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        series = []
        for section in sections:
            if key == "reward" and section["source"] != "rl":
                continue
            points = [(e[x_key], e[key]) for e in section["history"]
                      if isinstance(e.get(x_key), (int, float)) and isinstance(e.get(key), (int, float))]
            if points:
                label = section["stage"] + (f" ({section['source']})" if section["source"] else "")
                series.append((label, points))
        if not series:
            return False

        scale, unit = 1.0, "s"
        if x_key == "time":
            longest = max(x for _, points in series for x, _ in points)
            scale, unit = (3600.0, "h") if longest >= 7200 else (60.0, "min") if longest >= 120 else (1.0, "s")
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for label, points in series:
            xs = [x / scale for x, _ in points]
            ys = [y for _, y in points]
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step" if x_key == "step" else f"wall time ({unit})")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        atomic_write_bytes(os.path.join(self.dir, filename), buffer.getvalue())
        return True

    def write_report(self) -> str:
        """Write report.md and its plots into the report folder; returns the path of report.md."""
        os.makedirs(self.dir, exist_ok=True)
        sections = self.sections()
        system = self.system()
        lines = ["# nanochat report", ""]
        lines.append(f"Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC "
                     f"from {len(sections)} stage section(s) in `{self.dir}`.")
        lines += ["", "## System", "", "| | |", "|---|---|"]
        gpus = system.get("gpus") or []
        gpu_text = f"{len(gpus)} x {gpus[0]}" if gpus and len(set(gpus)) == 1 else ", ".join(gpus) or "none"
        for label, value in (("Date", system.get("date")), ("Host", system.get("host")),
                             ("Git commit", system.get("git_commit")), ("Python", system.get("python")),
                             ("torch", f"{system.get('torch')} (CUDA {system.get('cuda')})"),
                             ("Ray", system.get("ray")), ("CPU", system.get("cpu")),
                             ("Memory", f"{system.get('memory_gib')} GiB"), ("GPU", gpu_text),
                             ("Platform", system.get("platform"))):
            lines.append(f"| {label} | {_md_cell(str(value))} |")

        lines += ["", "## Metrics", ""]
        table = self.metrics_table()
        if table:
            lines += ["| Metric | " + " | ".join(SOURCES) + " |", "|---|" + "---|" * len(SOURCES)]
            for label, by_source in table:
                cells = [_format_value(by_source[s], ".4f") if s in by_source else "-" for s in SOURCES]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        else:
            lines.append("No evaluation metrics were recorded.")
        lines += self.protocol_lines(sections)
        walls = [(s["stage"] + (f" ({s['source']})" if s["source"] else ""), s["timings"]["wall_s"])
                 for s in sections if "wall_s" in s["timings"]]
        if walls:
            lines += ["", "| Stage | wall time |", "|---|---|"]
            lines += [f"| {name} | {format_duration(seconds)} |" for name, seconds in walls]
            lines += ["", f"Total wall time of the stages: {format_duration(sum(s for _, s in walls))}"]

        lines += ["", "## Plots", ""]
        drawn = [(filename, title, x_key) for filename, key, x_key, title in PLOTS
                 if self._plot(filename, key, x_key, title, sections)]
        for filename, title, x_key in drawn:
            lines += [f"![{title} against {'step' if x_key == 'step' else 'wall time'}]({filename})", ""]
        if not drawn:
            lines += ["No stage recorded a training history.", ""]

        lines += ["## Stages"]
        for section in sections:
            heading = section["stage"] + (f" ({section['source']})" if section["source"] else "")
            logged = datetime.datetime.fromtimestamp(section["logged_at"], datetime.timezone.utc)
            lines += ["", f"### {heading}", "", f"Logged {logged:%Y-%m-%d %H:%M:%S} UTC."]
            if section["timings"]:
                lines += ["", "Timings: " + ", ".join(f"{name} {format_duration(seconds)}"
                                                      for name, seconds in section["timings"].items())]
            for title in ("metrics", "config"):
                if section[title]:
                    lines += ["", f"| {title} | value |", "|---|---|"]
                    lines += [f"| {_md_cell(str(k))} | {_md_cell(_format_value(v))} |"
                              for k, v in section[title].items()]
        if not sections:
            lines += ["", "No stage has logged a section yet."]
        path = os.path.join(self.dir, _REPORT_FILE)
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
        return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write report.md (metrics table and plots) from the "
                                                 "sections the pipeline's stages logged")
    parser.add_argument("--base-dir", default=None, help="default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat")
    args = parser.parse_args()
    print(Report(args.base_dir).write_report())


if __name__ == "__main__":
    main()
