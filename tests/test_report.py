"""The report card: stages log sections, write_report turns them into report.md with the
metrics table (missing models and metrics as '-'), valid PNG plots linked from the markdown,
and the system section; bad input is refused with a message that says what to fix."""

import glob
import importlib.metadata
import json
import os
import struct

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from nanochat.report import Report, format_duration, normalize_metric_name, stage_history

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history(steps: int, loss0: float, seconds_per_step: float, val_every: int = 0) -> list[dict]:
    history = []
    for step in range(steps):
        entry = {"step": step, "time": step * seconds_per_step, "loss": loss0 * 0.97 ** step}
        if val_every and step % val_every == 0:
            entry["val_bpb"] = 2.0 * 0.98 ** step
        history.append(entry)
    return history


def _log_pipeline_without_rl(report: Report) -> None:
    report.reset()
    report.log_stage("data", config={"source": "sample", "num_shards": 2}, timings={"wall_s": 4.0})
    report.log_stage("base_train", source="base", config={"depth": 2, "lr": 0.02},
                     timings={"wall_s": 125.0}, metrics={"val_bpb": np.float32(0.8123)},
                     history=_history(40, 10.0, 3.0, val_every=10))
    report.log_stage("base_eval", source="base", timings={"wall_s": 30.0},
                     metrics={"CORE": torch.tensor(0.22189)})
    report.log_stage("chat_sft", source="sft", timings={"wall_s": 60.0}, history=_history(20, 3.0, 0.5))
    report.log_stage("chat_eval", source="sft", timings={"wall_s": 20.0},
                     metrics={"ARC-Easy": 0.38757, "arc_challenge": 0.28, "MMLU": 0.31, "GSM8K": 0.045,
                              "SpellingBee": 0.5, "arithmetic": 0.73, "ChatCORE metric": 0.1})


def _table_row(markdown: str, label: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no table row {label!r} in report.md")


def _assert_valid_png(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (700, 400)  # figsize 7x4 at 100 dpi
    pixels = imread(path)[..., :3]
    assert pixels.shape == (400, 700, 3)
    # Not blank: matplotlib drew axes, text and at least one line in the default blue (#1f77b4).
    assert pixels.std() > 0.05
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    blue = np.array([0x1F, 0x77, 0xB4]) / 255
    assert (np.abs(pixels - blue).max(axis=-1) < 0.02).sum() > 100


def test_report_has_the_metrics_table_with_dashes_for_missing_models(tmp_path):
    report = Report(str(tmp_path))
    _log_pipeline_without_rl(report)
    path = report.write_report()
    assert path == os.path.join(str(tmp_path), "report", "report.md")
    markdown = open(path).read()
    assert _table_row(markdown, "Metric") == ["base", "sft", "rl"]
    assert _table_row(markdown, "CORE") == ["0.2219", "-", "-"]
    assert _table_row(markdown, "val bpb") == ["0.8123", "-", "-"]
    assert _table_row(markdown, "ARC-Easy") == ["-", "0.3876", "-"]
    assert _table_row(markdown, "ARC-Challenge") == ["-", "0.2800", "-"]
    assert _table_row(markdown, "MMLU") == ["-", "0.3100", "-"]
    assert _table_row(markdown, "GSM8K") == ["-", "0.0450", "-"]
    assert _table_row(markdown, "SpellingBee") == ["-", "0.5000", "-"]
    assert _table_row(markdown, "Arithmetic") == ["-", "0.7300", "-"]
    # "ChatCORE metric" is not the ChatCORE row: only spelling variants of a name match.
    assert "| ChatCORE |" not in markdown
    # No stage ran HumanEval: its row is left out rather than shown empty.
    assert "| HumanEval |" not in markdown
    assert "Total wall time of the stages: 3m 59s" in markdown  # 4 + 125 + 30 + 60 + 20 s


def test_plots_are_valid_pngs_linked_from_the_markdown(tmp_path):
    report = Report(str(tmp_path))
    _log_pipeline_without_rl(report)
    markdown = open(report.write_report()).read()
    for name in ("loss_vs_step.png", "loss_vs_time.png", "val_bpb_vs_step.png", "val_bpb_vs_time.png"):
        assert f"]({name})" in markdown
        _assert_valid_png(os.path.join(report.dir, name))
    # No RL stage ran: no reward plot and no link to one.
    assert not os.path.exists(os.path.join(report.dir, "rl_reward_vs_step.png"))
    assert "rl_reward" not in markdown
    assert not glob.glob(os.path.join(report.dir, "*.tmp.*"))


def test_rl_stage_adds_its_column_and_the_reward_plot(tmp_path):
    report = Report(str(tmp_path))
    _log_pipeline_without_rl(report)
    report.log_stage("chat_rl", source="rl", timings={"wall_s": 90.0},
                     history=[{"step": s, "time": 2.0 * s, "reward": 0.1 + 0.02 * s} for s in range(25)])
    report.log_stage("chat_eval", source="rl", metrics={"gsm8k": 0.09, "HumanEval": 0.061})
    markdown = open(report.write_report()).read()
    assert _table_row(markdown, "GSM8K") == ["-", "0.0450", "0.0900"]
    assert _table_row(markdown, "HumanEval") == ["-", "-", "0.0610"]
    assert "](rl_reward_vs_step.png)" in markdown
    _assert_valid_png(os.path.join(report.dir, "rl_reward_vs_step.png"))


def test_the_report_card_says_how_gsm8k_answers_were_matched(tmp_path):
    report = Report(str(tmp_path))
    _log_pipeline_without_rl(report)  # its stages record no answer matching: no protocol line
    assert "GSM8K answers" not in open(report.write_report()).read()
    report.log_stage("chat_eval", source="sft", config={"answer_matching": "exact"}, metrics={"GSM8K": 0.045})
    report.log_stage("chat_rl", source="rl", config={"answer_matching": "exact"}, timings={"wall_s": 90.0})
    report.log_stage("chat_eval", source="rl", config={"answer_matching": "lenient"}, metrics={"GSM8K": 0.09})
    lines = [line for line in open(report.write_report()).read().splitlines() if line.startswith("GSM8K answers")]
    assert lines == [
        "GSM8K answers: exact, as nanochat (the text after '#### ', commas dropped: 42.0 is not 42); "
        "used by chat_eval (sft), chat_rl (rl). SpellingBee and Arithmetic follow the same rule.",
        "GSM8K answers: lenient, not nanochat's (equal numbers match: 42.0, $42 and 42 are one answer); "
        "used by chat_eval (rl). SpellingBee and Arithmetic follow the same rule."]


def test_the_report_card_says_which_humaneval_harness_ran(tmp_path):
    report = Report(str(tmp_path))
    # An eval without HumanEval records the flag's default but no HumanEval score: no line.
    report.log_stage("chat_eval", source="sft", config={"tasks": ["gsm8k"], "humaneval_harness": "nanochat"},
                     metrics={"GSM8K": 0.045})
    assert "HumanEval harness" not in open(report.write_report()).read()
    report.log_stage("chat_eval", source="rl", config={"tasks": ["humaneval"], "humaneval_harness": "lenient"},
                     metrics={"HumanEval": 0.061})
    lines = [line for line in open(report.write_report()).read().splitlines() if line.startswith("HumanEval harness")]
    assert lines == ["HumanEval harness: lenient, not nanochat's (the whole prompt with its helpers, then the "
                     "answer's code and the tests: a bare function body passes); used by chat_eval (rl)."]


def test_rerun_of_a_stage_replaces_its_section(tmp_path):
    report = Report(str(tmp_path))
    report.log_stage("base_eval", source="base", metrics={"core": 0.10})
    report.log_stage("base_eval", source="base", metrics={"core": 0.25})
    assert len(glob.glob(os.path.join(report.dir, "stage-*.json"))) == 1
    assert report.metrics_table() == [("CORE", {"base": 0.25})]


def test_an_empty_report_dir_gives_a_report_without_errors(tmp_path):
    report = Report(str(tmp_path))
    markdown = open(report.write_report()).read()
    assert "No evaluation metrics were recorded." in markdown
    assert "No stage recorded a training history." in markdown
    assert "No stage has logged a section yet." in markdown
    assert not glob.glob(os.path.join(report.dir, "*.png"))


def test_reset_clears_the_previous_run_and_records_the_system(tmp_path):
    report = Report(str(tmp_path))
    _log_pipeline_without_rl(report)
    report.write_report()
    report.reset()
    assert sorted(os.listdir(report.dir)) == ["system.json"]
    system = json.load(open(os.path.join(report.dir, "system.json")))
    assert system["torch"] == torch.__version__
    assert system["ray"] == importlib.metadata.version("ray")
    assert system["cpu"].startswith(f"{os.cpu_count()} x ")
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert system["gpus"] == [torch.cuda.get_device_name(index) for index in range(cuda_devices)]
    assert system["git_commit"]
    markdown = open(report.write_report()).read()
    assert f"| torch | {torch.__version__} (CUDA {torch.version.cuda or 'none'}) |" in markdown
    assert f"| Ray | {system['ray']} |" in markdown


@pytest.mark.parametrize("names, shown", [
    (["NVIDIA H100 80GB HBM3"] * 8, "8 x NVIDIA H100 80GB HBM3"),
    (["NVIDIA A100-SXM4-40GB", "NVIDIA A10G"], "NVIDIA A100-SXM4-40GB, NVIDIA A10G"),
])
def test_the_system_section_lists_every_gpu_torch_sees_by_name(tmp_path, monkeypatch, names, shown):
    """torch.cuda is made to report GPUs, so that the check is real on a machine without any: the
    report lists each of torch.cuda.device_count()'s devices under its own name."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[0 if device is None else device])
    report = Report(str(tmp_path))
    report.reset()
    assert json.load(open(os.path.join(report.dir, "system.json")))["gpus"] == names
    assert f"| GPU | {shown} |" in open(report.write_report()).read()


def test_stage_sections_hold_config_timings_and_metrics(tmp_path):
    report = Report(str(tmp_path))
    _log_pipeline_without_rl(report)
    section = json.load(open(os.path.join(report.dir, "stage-base_train-base.json")))
    assert section["config"] == {"depth": 2, "lr": 0.02}
    assert section["timings"] == {"wall_s": 125.0}
    assert section["metrics"]["val_bpb"] == pytest.approx(0.8123, abs=1e-6)
    assert len(section["history"]) == 40
    markdown = open(report.write_report()).read()
    assert "### base_train (base)" in markdown
    assert "Timings: wall_s 2m 05s" in markdown
    assert _table_row(markdown, "depth") == ["2"]
    assert _table_row(markdown, "lr") == ["0.02"]  # configs keep their digits, not 4 decimals


@pytest.mark.parametrize("kwargs, message", [
    ({"stage": "base train"}, "stage must be a name"),
    ({"stage": "chat_eval", "source": "mid"}, "source must be one of"),
    ({"stage": "base_train", "history": [{"loss": 1.0}]}, r"history\[0\] must be a dict with a 'step' key"),
    ({"stage": "base_train", "timings": {"wall_s": "long"}}, r"timings\['wall_s'\] must be a number"),
    ({"stage": "base_train", "metrics": [0.5]}, "metrics must be a dict"),
])
def test_bad_input_is_refused_with_a_clear_message(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Report(str(tmp_path)).log_stage(**kwargs)


def test_a_corrupt_section_names_the_file(tmp_path):
    report = Report(str(tmp_path))
    report.log_stage("data")
    bad = os.path.join(report.dir, "stage-chat_sft-sft.json")
    with open(bad, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="stage-chat_sft-sft.json is not valid JSON"):
        report.write_report()


def test_helpers():
    assert normalize_metric_name("ARC-Easy") == normalize_metric_name("arc_easy") == "arceasy"
    assert format_duration(42.5) == "42.5s"
    assert format_duration(3725) == "1h 02m 05s"


def test_stage_history_turns_trainer_records_into_seconds_since_the_start():
    records = [{"step": 0, "val_bpb": 3.0},  # the evaluation before the first step
               {"step": 1, "loss": 9.0, "time": 1000.5, "step_seconds": 0.5, "mfu": 0.01},
               {"step": 2, "loss": 8.0, "time": 1001.0, "step_seconds": 0.5},
               {"step": 2, "val_bpb": 2.5},  # an evaluation after step 2: step 2's time
               {"step": 2, "restored_from_checkpoint": True},
               {"step": 3, "loss": 7.0, "time": 1011.0, "step_seconds": 0.5}]
    assert stage_history(records) == [
        {"step": 0, "time": 0.0, "val_bpb": 3.0}, {"step": 1, "time": 0.5, "loss": 9.0},
        {"step": 2, "time": 1.0, "loss": 8.0}, {"step": 2, "time": 1.0, "val_bpb": 2.5},
        {"step": 3, "time": 11.0, "loss": 7.0}]


def test_record_wall_time_sets_the_newest_section_of_a_stage_or_logs_one(tmp_path):
    report = Report(str(tmp_path))
    report.log_stage("chat_eval", source="sft", timings={"eval_s": 3.0}, metrics={"GSM8K": 0.1})
    report.log_stage("chat_eval", source="rl", metrics={"GSM8K": 0.2})
    report.record_wall_time("chat_eval", 42.0)
    report.record_wall_time("data", 7.0)
    by_name = {(s["stage"], s["source"]): s for s in report.sections()}
    assert by_name[("chat_eval", "rl")]["timings"] == {"wall_s": 42.0}
    assert by_name[("chat_eval", "sft")]["timings"] == {"eval_s": 3.0}
    assert by_name[("data", None)]["timings"] == {"wall_s": 7.0}
    markdown = open(report.write_report()).read()
    assert _table_row(markdown, "chat_eval (rl)") == ["42.0s"]
    assert "Total wall time of the stages: 49.0s" in markdown
