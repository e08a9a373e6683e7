"""A stand-in pipeline stage for the tests of the speedrun and of `make demo`: it runs in a moment,
as `python -m tests.pipeline_stage`, the way a real stage runs (a Ray job of its own, or inline in
the speedrun's process), and leaves what a real stage leaves behind, in NANOCHAT_BASE_DIR:

- its --name appended to stages_run.txt, so a test sees which stages ran, and in which order;
- with --chat-model TAG, the tiny chat checkpoint of tests.serve_helpers saved as sft checkpoint
  TAG, which the demo then serves;
- its done marker, --marker, written last (the speedrun skips a stage whose marker exists).

With --fail-unless FILE it fails, as a broken stage does, while FILE is missing from the base dir.
tests.stand_in_speedrun.stand_in_stage makes the speedrun Stage that runs it.
"""

import argparse
import os

from nanochat.files import get_base_dir

RUN_LOG = "stages_run.txt"


def stages_run(base_dir: str) -> list[str]:
    """The names of the stand-in stages that ran in base_dir, in order."""
    path = os.path.join(base_dir, RUN_LOG)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--marker", required=True, help="the done marker, relative to the base dir")
    parser.add_argument("--fail-unless", default=None, help="fail while this file is missing from the base dir")
    parser.add_argument("--chat-model", default=None, help="save the tiny chat checkpoint under this model tag")
    args = parser.parse_args(argv)
    base_dir = get_base_dir()
    with open(os.path.join(base_dir, RUN_LOG), "a") as f:
        f.write(args.name + "\n")
    print(f"stand-in stage {args.name} runs in {base_dir}", flush=True)
    if args.fail_unless and not os.path.exists(os.path.join(base_dir, args.fail_unless)):
        raise SystemExit(f"ValueError: stand-in stage {args.name} needs {args.fail_unless} in the base dir")
    if args.chat_model:
        from tests.serve_helpers import save_tiny_chat_checkpoint
        save_tiny_chat_checkpoint(args.chat_model, os.path.join(base_dir, "tokenizer"))
    marker = os.path.join(base_dir, args.marker)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "a"):
        pass


if __name__ == "__main__":
    main()
