"""Export one of our checkpoints in karpathy/nanochat's layout and tokenizer format.

    python -m ray_jobs.export_nanochat --phase base|sft|rl --model-tag TAG [--step N] OUT

OUT becomes a nanochat base directory: OUT/<phase dir>/TAG/model_<step>.pt and meta_<step>.json
(what nanochat's checkpoint manager writes and its loader reads) and OUT/tokenizer/tokenizer.pkl
(a pickled tiktoken Encoding) and token_bytes.pt. nanochat then runs it with
NANOCHAT_BASE_DIR=OUT, and `python -m ray_jobs.import_nanochat OUT/<phase dir>/TAG` brings it back
with the same weights. The weights stay fp32 (nanochat's loader takes them as they are); the
optimizer state is not exported.

Only models that some version of nanochat builds the same way can be exported (see
nanochat.interop.reference_generation); anything else is refused with the reason. Files are
written into a temporary folder renamed to OUT at the end, so on error OUT is untouched.
A plain driver script, no Ray.
"""

import argparse
import json
import os
import shutil
import tempfile

import torch

from nanochat.checkpoint import PHASE_DIRS, TOKENIZER_SUBDIR, CheckpointError, find_largest_model, load_model
from nanochat.common import print0
from nanochat.files import get_base_dir
from nanochat.interop import reference_generation, reference_meta
from nanochat.tokenizer import TOKEN_BYTES_FILE, compute_token_bytes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export a checkpoint in karpathy/nanochat's format")
    parser.add_argument("out", help="folder to create: a nanochat base directory")
    parser.add_argument("--phase", required=True, choices=sorted(PHASE_DIRS), help="base, sft or rl")
    parser.add_argument("--model-tag", default=None, help="model tag (default: the largest model of the phase)")
    parser.add_argument("--step", type=int, default=None, help="step to export (default: the last)")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    """Export; returns the checkpoint folder written inside OUT."""
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"{out} already exists and is not an empty folder: pick another OUT")
    model_tag = args.model_tag or find_largest_model(os.path.join(get_base_dir(), PHASE_DIRS[args.phase]))
    model, tokenizer, meta = load_model(args.phase, "cpu", model_tag, args.step)
    generation = reference_generation(model.config)
    if tokenizer is None:
        raise CheckpointError(f"the {args.phase} checkpoint {model_tag} carries no tokenizer copy; nanochat needs "
                              "one: re-save the model with its tokenizer")
    step = meta["step"]
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.export.", dir=parent)
    try:
        ckpt = os.path.join(staging, PHASE_DIRS[args.phase], model_tag)
        os.makedirs(ckpt)
        torch.save(model.state_dict(), os.path.join(ckpt, f"model_{step:06d}.pt"))
        with open(os.path.join(ckpt, f"meta_{step:06d}.json"), "w", encoding="utf-8") as f:
            json.dump(reference_meta(model.config, step, meta), f, indent=2)
        tokenizer_dir = os.path.join(staging, TOKENIZER_SUBDIR)
        os.makedirs(tokenizer_dir)
        tokenizer.save(tokenizer_dir)
        torch.save(compute_token_bytes(tokenizer), os.path.join(tokenizer_dir, TOKEN_BYTES_FILE))
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print0(f"exported step {step} of {args.phase}/{model_tag} to {out} (runs as nanochat's {generation} architecture)")
    return os.path.join(out, PHASE_DIRS[args.phase], model_tag)


if __name__ == "__main__":
    main()
