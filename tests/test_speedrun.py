"""Tests of the pipeline driver: stage order per preset, --from, skipping finished and missing
stages, and stopping at the first failing stage with its error."""

import sys
import types

import pytest

from ray_jobs import speedrun


def test_presets_list_the_stages_in_order():
    names = [s.name for s in speedrun.preset_stages("tiny", with_rl=True)]
    assert names == ["data", "tokenizer", "tok_eval", "base_train", "base_eval", "chat_sft", "chat_eval", "chat_rl"]
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
