"""Import a karpathy/nanochat model into our checkpoint layout, so that serve, chat_eval, chat_sft
and chat_rl run on it as on one of ours.

    python -m ray_jobs.import_nanochat PATH --phase base|sft|rl --model-tag TAG [--step N]
                                       [--tokenizer-dir DIR]

PATH is a checkpoint folder that nanochat's checkpoint manager wrote (e.g.
~/.cache/nanochat/base_checkpoints/d20, whose tokenizer nanochat keeps in ../../tokenizer), or a
model folder downloaded from Hugging Face (model_<step>.pt, meta_<step>.json, tokenizer.pkl and
token_bytes.pt side by side). The last step is imported unless --step says which. The model lands
in <NANOCHAT_BASE_DIR>/<phase dir>/TAG as step N, with the tokenizer copied along; optimizer
shards, when the folder has them, are merged into one rank's state so that training can go on.

Everything is read and checked before anything is written, and the checkpoint is written into a
temporary folder that is renamed to its place at the end: on any error the target is untouched.
A plain driver script, no Ray.
"""

import argparse
import dataclasses
import os
import shutil
import tempfile

from nanochat.checkpoint import PHASE_DIRS, CheckpointError, build_model, checkpoint_dir, save_checkpoint
from nanochat.common import print0
from nanochat.interop import read_reference_checkpoint, write_tokenizer_files


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Import a karpathy/nanochat checkpoint into our layout")
    parser.add_argument("path", help="nanochat checkpoint folder, or a downloaded model folder")
    parser.add_argument("--phase", required=True, choices=sorted(PHASE_DIRS),
                        help="which of our phases the model is filed under (base, sft or rl)")
    parser.add_argument("--model-tag", required=True, help="the model's tag in our layout, e.g. d20")
    parser.add_argument("--step", type=int, default=None, help="the step to import (default: the last)")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="folder with nanochat's tokenizer.pkl and token_bytes.pt (default: PATH, then "
                             "PATH/../../tokenizer as nanochat lays it out)")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    """Import; returns the checkpoint folder written."""
    args = parse_args(argv)
    target = checkpoint_dir(args.phase, args.model_tag)
    if os.path.exists(target) and os.listdir(target):
        raise CheckpointError(f"{target} already exists and is not empty: pick another --model-tag or remove it")
    checkpoint = read_reference_checkpoint(args.path, args.step, args.tokenizer_dir)
    meta = {"model_config": dataclasses.asdict(checkpoint.config),
            "user_config": checkpoint.meta.get("user_config", {}),
            "imported_from": {"path": os.path.abspath(args.path), "step": checkpoint.step,
                              "nanochat_meta": checkpoint.meta}}
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{args.model_tag}.import.", dir=parent)
    try:
        tokenizer_dir = os.path.join(staging, "tokenizer")
        write_tokenizer_files(checkpoint, tokenizer_dir)
        staged = os.path.join(staging, "checkpoint")
        save_checkpoint(staged, checkpoint.step, checkpoint.state, meta, checkpoint.optimizer_state,
                        tokenizer_dir=tokenizer_dir)
        build_model(staged, checkpoint.step, "cpu")  # what serve and the jobs will do, before it is in place
        if os.path.isdir(target):
            os.rmdir(target)  # empty, checked above
        os.rename(staged, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for note in checkpoint.notes:
        print0(f"note: {note}")
    print0(f"imported step {checkpoint.step} of {args.path} into {target}")
    return target


if __name__ == "__main__":
    main()
