"""Tests of the pipeline driver: stage order per preset, --from, skipping finished and missing
stages, stopping at the first failing stage with its error, and the report card it keeps; --resume
on every checkpointing stage, the drivers' CPUs and checkpoint storage per preset, and a stage's
job log tailed (test_ray_auth tails one from a real job server). One run goes through the Job
Submission API of a real head: two stand-in stages (tests.pipeline_stage) as Ray jobs, the first
failing stage's error, --from and --fresh."""

import os
import re
import sys
import types

import pytest

from nanochat.report import Report
from ray_jobs import speedrun
from tests.pipeline_stage import stages_run
from tests.stand_in_speedrun import stand_in_stage


def test_presets_list_the_stages_in_order():
    names = [s.name for s in speedrun.preset_stages("tiny", with_rl=True)]
    assert names == ["data", "tokenizer", "tok_eval", "base_train", "base_eval", "chat_sft", "chat_eval", "chat_rl",
                     "chat_eval_rl"]
    assert "chat_rl" not in [s.name for s in speedrun.preset_stages("d20", with_rl=False)]
    base_train = next(s for s in speedrun.preset_stages("d26", with_rl=False) if s.name == "base_train")
    assert base_train.flags[:2] == ["--depth", "26"]
    with pytest.raises(ValueError, match="unknown preset"):
        speedrun.preset_stages("d99", with_rl=False)


def test_unknown_from_stage_is_refused(capsys):
    with pytest.raises(SystemExit):
        speedrun.main(["--preset", "tiny", "--from", "nope", "--inline"])
    assert "not a stage of preset tiny" in capsys.readouterr().err


def _fake_module(monkeypatch, name):
    module = types.ModuleType(name)
    module.__file__ = f"<{name}>"
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_inline_run_skips_missing_and_done_stages_and_stops_at_a_failure(monkeypatch, tmp_path, capsys):
    ran = []
    stages = [
        speedrun.Stage("first", "tests_fake_stage_ok", ["--x", "1"]),
        speedrun.Stage("done", "tests_fake_stage_ok", [], done_marker="marker"),
        speedrun.Stage("missing", "tests_no_such_module_anywhere"),
        speedrun.Stage("broken", "tests_fake_stage_fails"),
        speedrun.Stage("after", "tests_fake_stage_ok"),
    ]
    (tmp_path / "marker").write_text("")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setattr(speedrun, "preset_stages", lambda preset, with_rl: stages)
    monkeypatch.setattr(speedrun.Stage, "is_built", lambda self: not self.module.startswith("tests_no_such"))

    def fake_run_inline(stage):
        ran.append((stage.name, stage.flags))
        if stage.name == "broken":
            raise RuntimeError("stage broken exited with status 3")

    monkeypatch.setattr(speedrun, "run_inline", fake_run_inline)
    assert speedrun.main(["--inline"]) == 1
    out = capsys.readouterr().out
    assert ran == [("first", ["--x", "1"]), ("broken", [])]
    assert "stage done: output exists" in out and "missing: tests_no_such_module_anywhere is not part" in out
    assert "FAILED at stage broken: stage broken exited with status 3" in out and "--from broken" in out

    ran.clear()
    assert speedrun.main(["--inline", "--from", "after"]) == 0
    assert ran == [("after", [])]


def test_run_inline_turns_a_nonzero_exit_into_an_error(monkeypatch):
    module = _fake_module(monkeypatch, "tests_fake_exit")
    monkeypatch.setattr(speedrun.runpy, "run_module",
                        lambda name, run_name, alter_sys: (_ for _ in ()).throw(SystemExit(2)))
    with pytest.raises(RuntimeError, match="exited with status 2"):
        speedrun.run_inline(speedrun.Stage("x", module.__name__))


def test_a_full_run_starts_a_fresh_report_and_writes_it_also_after_a_failure(monkeypatch, tmp_path, capsys):
    """Every stage run from the first: the old report goes, each stage gets its wall time, and
    report.md is written although the last stage failed."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    old = Report()
    old.log_stage("base_eval", source="base", metrics={"CORE": 0.5})  # a previous run's section
    stages = [speedrun.Stage("data", "m_data"), speedrun.Stage("base_train", "m_train"),
              speedrun.Stage("chat_eval", "m_eval"), speedrun.Stage("chat_eval_rl", "m_eval", report_as="chat_eval")]
    monkeypatch.setattr(speedrun, "preset_stages", lambda preset, with_rl: stages)
    monkeypatch.setattr(speedrun.Stage, "is_built", lambda self: True)

    def fake_run_inline(stage):
        if stage.name == "base_train":  # the driver logs its own section, as the real one does
            Report().log_stage("base_train", source="base", metrics={"val_bpb": 1.25},
                               history=[{"step": 1, "time": 0.5, "loss": 9.0}])
        if stage.name == "chat_eval":
            raise RuntimeError("stage chat_eval exited with status 1")

    monkeypatch.setattr(speedrun, "run_inline", fake_run_inline)
    assert speedrun.main(["--inline"]) == 1
    out = capsys.readouterr().out
    report_md = os.path.join(str(tmp_path), "report", "report.md")
    assert f"report of the stages that finished: {report_md}" in out
    sections = {s["stage"]: s for s in Report().sections()}
    assert sorted(sections) == ["base_train", "data"]  # the old base_eval section is gone, chat_eval failed
    assert sections["base_train"]["metrics"] == {"val_bpb": 1.25}
    assert all(0 <= s["timings"]["wall_s"] < 5 for s in sections.values())
    markdown = open(report_md).read()
    assert "| val bpb | 1.2500 | - | - |" in markdown and "| base_train (base) |" in markdown

    # Resuming at the failed stage keeps the sections of the stages before it; a stage that logs
    # under another name (chat_eval of the RL model) gets its wall time in that section.
    def log_eval(stage):
        Report().log_stage("chat_eval", source="rl" if stage.name == "chat_eval_rl" else "sft", metrics={"GSM8K": 0.1})

    monkeypatch.setattr(speedrun, "run_inline", log_eval)
    assert speedrun.main(["--inline", "--from", "chat_eval"]) == 0
    assert sorted((s["stage"], s["source"]) for s in Report().sections()) == [
        ("base_train", "base"), ("chat_eval", "rl"), ("chat_eval", "sft"), ("data", None)]
    assert all("wall_s" in s["timings"] for s in Report().sections())
    assert "pipeline finished; report: " + report_md in capsys.readouterr().out


def test_the_tiny_preset_trains_a_1024_token_context_and_d26_the_seed_settings():
    tiny = {s.name: s for s in speedrun.preset_stages("tiny", with_rl=False)}
    flags = tiny["base_train"].flags
    assert flags[flags.index("--depth") + 1] == "4" and flags[flags.index("--source") + 1] == "sample"
    # The demo model holds a chat of ten short turns: base and SFT (which keeps the base context) at 1024.
    assert int(flags[flags.index("--max-seq-len") + 1]) >= 1024 and "--max-seq-len" not in tiny["chat_sft"].flags
    assert tiny["chat_sft"].flags[tiny["chat_sft"].flags.index("--mixture") + 1] == "offline"
    assert all(s.flags[s.flags.index("--model-tag") + 1] == "tiny" for s in tiny.values() if "--model-tag" in s.flags)
    d26 = {s.name: s for s in speedrun.preset_stages("d26", with_rl=False)}
    assert d26["data"].flags == ["--source", "fineweb-edu", "-n", "450"]
    assert d26["base_train"].flags[d26["base_train"].flags.index("--device-batch-size") + 1] == "16"


def test_the_gpt2_preset_is_nanochats_speedrun_and_every_gpu_preset_validates_on_80_x_2_19_tokens():
    """runs/speedrun.sh of nanochat today: 170 ClimbMix shards, a tokenizer on them, base_train at
    depth 24 with --target-param-data-ratio=8 --device-batch-size=16 --fp8 (and bf16 embeddings,
    which nanochat always has on GPUs), base_eval at 16 rows."""
    gpt2 = {s.name: s for s in speedrun.preset_stages("gpt2", with_rl=False)}
    assert gpt2["data"].flags == ["--source", "climbmix", "-n", "170"]
    assert gpt2["tokenizer"].flags[:4] == ["--source", "climbmix", "--vocab-size", "32768"]
    flags = gpt2["base_train"].flags
    value = {name: flags[flags.index(name) + 1] for name in ("--depth", "--device-batch-size", "--source",
                                                             "--target-param-data-ratio", "--embedding-dtype",
                                                             "--model-tag", "--num-workers")}
    assert value == {"--depth": "24", "--device-batch-size": "16", "--source": "climbmix",
                     "--target-param-data-ratio": "8", "--embedding-dtype": "bfloat16", "--model-tag": "d24",
                     "--num-workers": "8"}
    assert "--fp8" in flags
    assert gpt2["base_eval"].flags == ["--model-tag", "d24", "--device-batch-size", "16"]
    for preset in speedrun.GPU_PRESETS:
        flags = next(s for s in speedrun.preset_stages(preset, with_rl=False) if s.name == "base_train").flags
        assert int(flags[flags.index("--eval-tokens") + 1]) == 80 * 2 ** 19, preset
    # the seed's older runs stay as they were: FineWeb-Edu at the default ratio, no fp8
    d20 = next(s for s in speedrun.preset_stages("d20", with_rl=False) if s.name == "base_train").flags
    assert d20[d20.index("--source") + 1] == "fineweb-edu"
    assert "--fp8" not in d20 and d20[d20.index("--target-param-data-ratio") + 1] == "12"
    assert d20[d20.index("--embedding-dtype") + 1] == "float32"


def test_every_checkpointing_stage_resumes_so_that_from_continues_its_run():
    for preset in speedrun.PRESETS:
        stages = {s.name: s for s in speedrun.preset_stages(preset, with_rl=True)}
        for name in speedrun.CHECKPOINTING_STAGES:
            assert "--resume" in stages[name].flags, (preset, name)
        assert [n for n, s in stages.items() if "--resume" in s.flags] == list(speedrun.CHECKPOINTING_STAGES)


@pytest.mark.parametrize("preset, argv, env_storage, cpus, storage", [
    ("tiny", [], "s3://bucket/runs", 0, None),  # tiny: drivers run anywhere, checkpoints stay local
    ("d20", [], "s3://bucket/runs", 1, "s3://bucket/runs"),
    ("d26", [], None, 1, None),
    ("gpt2", [], "s3://bucket/runs", 1, "s3://bucket/runs"),
    ("d20", ["--storage-path", "/shared/runs", "--entrypoint-num-cpus", "2"], "s3://bucket/runs", 2, "/shared/runs"),
    ("tiny", ["--storage-path", "s3://other/runs", "--entrypoint-num-cpus", "0.5"], None, 0.5, "s3://other/runs"),
])
def test_job_drivers_cpus_and_checkpoint_storage_per_preset(monkeypatch, tmp_path, preset, argv, env_storage, cpus,
                                                           storage):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    if env_storage:
        monkeypatch.setenv("NANOCHAT_STORAGE", env_storage)
    else:
        monkeypatch.delenv("NANOCHAT_STORAGE", raising=False)
    monkeypatch.setattr(speedrun.Stage, "is_built", lambda self: True)
    monkeypatch.setattr(speedrun.Stage, "is_done", lambda self: False)
    submitted = {}

    def fake_run_as_job(stage, address, working_dir, entrypoint_num_cpus):
        submitted[stage.name] = (stage.flags, entrypoint_num_cpus)

    monkeypatch.setattr(speedrun, "run_as_job", fake_run_as_job)
    assert speedrun.main(["--preset", preset, "--rl", *argv]) == 0
    assert {c for _, c in submitted.values()} == {cpus}
    for name, (flags, _) in submitted.items():
        if name in speedrun.CHECKPOINTING_STAGES and storage:
            assert flags[flags.index("--storage-path") + 1] == storage
        else:
            assert "--storage-path" not in flags, name


class _FakeLogClient:
    """tail_job_logs yields the chunks, then, when `breaks`, fails as a lost websocket does."""

    def __init__(self, chunks, breaks):
        self.chunks, self.breaks = chunks, breaks

    async def tail_job_logs(self, job_id):
        for chunk in self.chunks:
            yield chunk
        if self.breaks:
            raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")


def test_follow_job_logs_prints_the_stream_and_reports_a_broken_one(capsys):
    speedrun.follow_job_logs(_FakeLogClient(["step 1\n", "step 2\n"], breaks=False), "job_a")
    assert capsys.readouterr().out == "step 1\nstep 2\n"
    speedrun.follow_job_logs(_FakeLogClient(["step 1\n"], breaks=True), "job_b")
    out = capsys.readouterr().out
    assert out.startswith("step 1\n[speedrun] lost the log stream of job job_b (WebSocket connection closed")
    assert "ray job logs job_b" in out


@pytest.mark.parametrize("preset", speedrun.GPU_PRESETS)
def test_gpu_presets_ask_for_gpus(preset):
    """A GPU preset's trainers never decide from the GPUs that happen to be up (ray_jobs.gpus)."""
    stages = {stage.name: stage for stage in speedrun.preset_stages(preset, with_rl=True)}
    for name in ("base_train", "chat_sft", "chat_rl"):
        flags = stages[name].flags
        assert flags[flags.index("--use-gpu") + 1] == "on"


def test_stages_run_as_real_jobs_stop_at_the_first_failure_and_resume_with_from_and_fresh(dashboard, monkeypatch,
                                                                                         tmp_path, capsys):
    """Not --inline: each stage is a job of the module's head, which runs it from this checkout."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    stages = [stand_in_stage("first"), stand_in_stage("second", fail_unless="fixed")]
    monkeypatch.setattr(speedrun, "preset_stages", lambda preset, with_rl: stages)
    address = ["--address", dashboard]

    assert speedrun.main(address) == 1
    out = capsys.readouterr().out
    assert stages_run(str(tmp_path)) == ["first", "second"]
    assert "stage first: submitted job nanochat-first-" in out and "stage first: done" in out
    # The failing job's own error, from its log, then the speedrun's verdict and where to resume.
    assert "ValueError: stand-in stage second needs fixed in the base dir" in out
    assert re.search(r"FAILED at stage second: stage second \(job nanochat-second-\d+\) failed: .*exit code 1", out)
    assert "resume with --from second" in out and "pipeline finished" not in out

    (tmp_path / "fixed").write_text("")
    assert speedrun.main([*address, "--from", "second"]) == 0
    assert stages_run(str(tmp_path)) == ["first", "second", "second"]
    assert "pipeline finished" in capsys.readouterr().out

    # Both outputs exist: a run skips both stages, and --fresh runs a stage again all the same.
    assert speedrun.main(address) == 0
    out = capsys.readouterr().out
    assert "stage first: output exists" in out and "stage second: output exists" in out
    assert speedrun.main([*address, "--from", "second", "--fresh"]) == 0
    assert stages_run(str(tmp_path)) == ["first", "second", "second", "second"]
