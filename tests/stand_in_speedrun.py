"""The speedrun with stand-in stages (tests.pipeline_stage), for the tests of the speedrun and the
demo. As `python -m tests.stand_in_speedrun`, it is what the demo's test submits in place of
`python -m ray_jobs.speedrun`: the speedrun itself, with its flags, but with two stand-in stages in
place of the tiny preset's, run inline in the job. The stages take seconds and the second saves
the chat model that the demo serves, so a test of `make demo` exercises the demo's own logic (its
head, its flags, the chat app around the pipeline, the outputs it reuses) in seconds."""

import sys

from ray_jobs import speedrun

CHAT_MODEL = "demo"


def stand_in_stage(name: str, fail_unless: str | None = None, chat_model: str | None = None) -> speedrun.Stage:
    """A speedrun Stage that runs tests.pipeline_stage as `name`, done once <base dir>/<name>.done exists."""
    flags = ["--name", name, "--marker", f"{name}.done"]
    if fail_unless:
        flags += ["--fail-unless", fail_unless]
    if chat_model:
        flags += ["--chat-model", chat_model]
    return speedrun.Stage(name, "tests.pipeline_stage", flags, done_marker=f"{name}.done")


def stand_in_stages(preset: str, with_rl: bool) -> list[speedrun.Stage]:
    return [stand_in_stage("data"), stand_in_stage("chat_sft", chat_model=CHAT_MODEL)]


if __name__ == "__main__":
    speedrun.preset_stages = stand_in_stages
    sys.exit(speedrun.main([*sys.argv[1:], "--inline"]))
