"""The arithmetic behind docs/scaling.md: expected wall time and cost of pretraining the GPU
presets (gpt2, nanochat's speedrun today; d20 and d26, the seed's older runs) on 1, 2 and 4 nodes
of 8xH100, from the reference's published throughput and the Ray overheads measured on this
project's benchmarks.

    python -m ray_jobs.scaling_plan            # prints the markdown tables of docs/scaling.md

Nothing here runs a model: the sizes come from nanochat.gpt on the meta device, the horizon
(batch, steps) from nanochat.training.resolve_horizon exactly as base_train resolves it, and every
other input is a named constant below, marked as published, measured here, or assumed. A test
checks that docs/scaling.md holds the tables this prints, so the document cannot drift from its
inputs.
"""

import functools
import math
from dataclasses import dataclass

import torch

from nanochat.gpt import GPT, config_from_depth
from nanochat.training import REFERENCE_DEPTH, resolve_horizon
from ray_jobs.speedrun import GPU_EVAL_TOKENS, GPU_PRETRAINING

VOCAB_SIZE = 32768
SEQUENCE_LEN = 2048
GPUS_PER_NODE = 8
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM

# Published: the reference's d26 bf16 run trains at 630K tokens/s on one 8xH100 node
# (karpathy/nanochat dev/LOG.md, the FP8 section's baseline). With our FLOPs/token estimate that is
# the MFU below; the plan assumes the same MFU for d20 (smaller models usually reach a little less).
REFERENCE_D26_TOKENS_PER_SECOND = 630e3
# Published, same section: fp8 with tensorwise scaling trained that d26 at 740K tokens/s (1.17x);
# the plan applies the same factor to the fp8 presets (gpt2). nanochat adds that fp8's steps each
# learn a little less, so that the speed-up at matched quality is nearer 5%: ratio 8 is tuned to it.
REFERENCE_FP8_SPEEDUP = 740e3 / 630e3

# Measured here (bench_train --stand-in 500): what Ray Train adds to a 500 ms step, 1.33%.
RAY_SECONDS_PER_STEP = 0.0133 * 0.5
# Measured here (bench_checkpoint, d20): the step stalls 0.78 s per checkpoint for the copy to host
# memory; the write runs in the background. The GPU's device-to-host copy is assumed no slower.
CHECKPOINT_STALL_SECONDS = 0.78
SAVE_EVERY = 1000  # the presets' --save-every
# Assumed: starting the worker group, restoring nothing, and torch.compile's first steps.
STARTUP_SECONDS = 120.0
# Validation: the GPU presets' --eval-tokens (80 x 2**19) every 250 steps, a forward pass costing
# a third of a step (in bf16: evaluation never runs fp8).
EVAL_EVERY = 250

# Assumed link speeds for the gradient reduce-scatter and parameter all-gather of MuonAdamW (fp32):
# NVLink inside a node, and EFA between nodes (p5: 3200 Gbps per node, 400 GB/s, 50 GB/s per GPU),
# each at 80% of line rate, with no overlap between communication and compute (the conservative case).
NVLINK_BYTES_PER_SECOND = 0.8 * 450e9
EFA_BYTES_PER_GPU_PER_SECOND = 0.8 * 50e9
GRADIENT_BYTES = 4

PRICE_PER_GPU_HOUR = 3.0  # the reference README's figure for an H100

PRESETS = {name: {key: spec[key] for key in ("depth", "device_batch_size", "param_data_ratio", "fp8")}
           for name, spec in GPU_PRETRAINING.items()}
NODE_COUNTS = (1, 2, 4)


@dataclass
class ModelSize:
    params: int
    scaling_params: int
    flops_per_token: float


@functools.cache
def model_size(depth: int) -> ModelSize:
    with torch.device("meta"):
        model = GPT(config_from_depth(depth, vocab_size=VOCAB_SIZE, sequence_len=SEQUENCE_LEN))
    return ModelSize(sum(p.numel() for p in model.parameters()), model.num_scaling_params(), model.estimate_flops())


def reference_mfu() -> float:
    return REFERENCE_D26_TOKENS_PER_SECOND * model_size(26).flops_per_token / (GPUS_PER_NODE * H100_BF16_PEAK)


def communication_seconds(params: int, nodes: int) -> float:
    """One step's reduce-scatter plus all-gather of every parameter, ring algorithm: each GPU moves
    2 x (n-1)/n of the fp32 parameter bytes over its slowest link."""
    gpus = nodes * GPUS_PER_NODE
    moved = 2 * GRADIENT_BYTES * params * (gpus - 1) / gpus
    link = NVLINK_BYTES_PER_SECOND if nodes == 1 else EFA_BYTES_PER_GPU_PER_SECOND
    return moved / link


def plan_row(preset: str, nodes: int, mfu: float) -> dict:
    spec = PRESETS[preset]
    size = model_size(spec["depth"])
    workers = nodes * GPUS_PER_NODE
    common = dict(scaling_params=size.scaling_params, flops_per_token=size.flops_per_token,
                  reference_scaling_params=model_size(REFERENCE_DEPTH).scaling_params, sequence_len=SEQUENCE_LEN,
                  target_param_data_ratio=spec["param_data_ratio"])
    batch = resolve_horizon(**common, device_batch_size=1, num_workers=1).total_batch_size
    # base_train raises the batch to one micro-batch per worker when that is larger; the plan keeps
    # the depth's batch instead, with fewer rows per GPU (what --device-batch-size would be set to)
    device_batch = min(spec["device_batch_size"], batch // (SEQUENCE_LEN * workers))
    horizon = resolve_horizon(**common, device_batch_size=device_batch, num_workers=workers, total_batch_size=batch)
    gpu_tokens_per_second = mfu * H100_BF16_PEAK / size.flops_per_token
    train_tokens_per_second = gpu_tokens_per_second * (REFERENCE_FP8_SPEEDUP if spec["fp8"] else 1.0)
    compute = horizon.total_batch_size / (train_tokens_per_second * workers)
    communication = communication_seconds(size.params, nodes)
    step = compute + communication + RAY_SECONDS_PER_STEP
    steps = horizon.num_iterations
    evaluation = (steps // EVAL_EVERY) * GPU_EVAL_TOKENS / (gpu_tokens_per_second * workers) / 3
    checkpoints = (steps // SAVE_EVERY) * CHECKPOINT_STALL_SECONDS
    wall = steps * step + evaluation + checkpoints + STARTUP_SECONDS
    return {"preset": preset, "nodes": nodes, "device_batch": device_batch, "grad_accum": horizon.grad_accum_steps,
            "steps": steps, "tokens": horizon.total_tokens, "batch": horizon.total_batch_size,
            "compute_s": compute, "communication_s": communication, "step_s": step, "wall_s": wall,
            "scaling": None, "cost": wall / 3600 * workers * PRICE_PER_GPU_HOUR}


def plan() -> list[dict]:
    mfu = reference_mfu()
    rows = [plan_row(preset, nodes, mfu) for preset in PRESETS for nodes in NODE_COUNTS]
    for row in rows:
        one_node = next(r for r in rows if r["preset"] == row["preset"] and r["nodes"] == 1)
        row["scaling"] = one_node["wall_s"] / row["wall_s"] / row["nodes"]
    return rows


def markdown() -> str:
    mfu = reference_mfu()
    lines = [f"Inputs: MFU {100 * mfu:.1f}% (the reference's d26 figure), {H100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 "
             f"per H100, x{REFERENCE_FP8_SPEEDUP:.2f} tokens/s with fp8, T={SEQUENCE_LEN}, vocabulary {VOCAB_SIZE}, "
             f"${PRICE_PER_GPU_HOUR:.0f} per GPU-hour.", "",
             "| preset | params | scaling params | tokens/param | fp8 | tokens | batch | steps |",
             "|---|---|---|---|---|---|---|---|"]
    for preset, spec in PRESETS.items():
        size = model_size(spec["depth"])
        row = plan_row(preset, 1, mfu)
        lines.append(f"| {preset} | {size.params / 1e6:,.1f} M | {size.scaling_params / 1e6:,.1f} M | "
                     f"{spec['param_data_ratio']:g} | {'yes' if spec['fp8'] else 'no'} | "
                     f"{row['tokens'] / 1e9:.2f} B | {row['batch']:,} | {row['steps']:,} |")
    lines += ["", "| preset | nodes | rows/GPU | accum | compute s/step | comm s/step | step s | wall | "
                  "vs linear | cost |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in plan():
        hours, minutes = divmod(math.ceil(row["wall_s"] / 60), 60)
        lines.append(f"| {row['preset']} | {row['nodes']} | {row['device_batch']} | {row['grad_accum']} | "
                     f"{row['compute_s']:.3f} | {row['communication_s']:.3f} | {row['step_s']:.3f} | "
                     f"{hours}h{minutes:02d} | {100 * row['scaling']:.0f}% | ${row['cost']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
