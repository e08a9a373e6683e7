"""The training recipe as plain functions: what the single `--depth` dial derives (batch size,
horizon, learning-rate and weight-decay scaling, gradient accumulation) and the schedules (LR warmup /
constant / linear warmdown, Muon momentum warmup and warmdown, cosine weight-decay decay), with the
defaults of the current nanochat reference.

Every trainer (base, SFT, RL) calls these, so a run's resolved config is a pure function of its
flags and the model, and can be printed before any work starts.
"""

import math
from dataclasses import asdict, dataclass

REFERENCE_BATCH_TOKENS = 2 ** 19  # the batch size the seed's learning rates were tuned at
REFERENCE_DEPTH = 12  # the depth at which REFERENCE_BATCH_TOKENS is the best batch size
BATCH_SIZE_EXPONENT = 0.383  # best batch size grows as (training tokens) ** 0.383 (power-law fit)


@dataclass
class Horizon:
    """How long a run trains and with what batch: every number the flags leave open, resolved."""
    num_iterations: int
    total_batch_size: int  # tokens per optimizer step, over all workers
    grad_accum_steps: int
    tokens_per_micro_batch: int  # per worker
    total_tokens: int
    total_flops: float
    tokens_per_param: float
    lr_batch_scale: float  # learning rates are multiplied by sqrt(total_batch_size / 2**19)
    weight_decay_scale: float  # Muon weight decay is multiplied by this (see resolve_horizon)

    def as_dict(self) -> dict:
        return asdict(self)


def best_batch_size(target_tokens: float, reference_tokens: float) -> int:
    """The power of two closest (in log space) to the power-law optimum for a run of
    `target_tokens`, anchored at 2**19 tokens for a run of `reference_tokens`."""
    optimum = REFERENCE_BATCH_TOKENS * (target_tokens / reference_tokens) ** BATCH_SIZE_EXPONENT
    return 2 ** max(0, round(math.log2(optimum)))


def resolve_horizon(*, scaling_params: int, flops_per_token: float, reference_scaling_params: int,
                    device_batch_size: int, sequence_len: int, num_workers: int,
                    total_batch_size: int = -1, num_iterations: int = -1, target_flops: float = -1.0,
                    target_param_data_ratio: float = 12.0) -> Horizon:
    """Resolve batch size and number of steps. Precedence for the horizon: --num-iterations, then
    --target-flops, then the tokens-to-parameters ratio. The batch size, unless given, follows
    from the planned training tokens (see best_batch_size).

    Weight decay is rescaled so that B / (lr * wd * D) stays what it is at depth 12 with a batch
    of 2**19 (the T_epoch argument of arXiv:2405.13698): with lr proportional to sqrt(B), that is
    wd proportional to sqrt(B / 2**19) * (D_reference / D), D being the planned training tokens."""
    tokens_per_micro_batch = device_batch_size * sequence_len
    world_tokens = tokens_per_micro_batch * num_workers
    target_tokens = target_param_data_ratio * scaling_params
    if target_flops > 0:
        target_tokens = target_flops / flops_per_token
    reference_tokens = target_param_data_ratio * reference_scaling_params
    if total_batch_size <= 0:
        total_batch_size = max(world_tokens, best_batch_size(target_tokens, reference_tokens))
    if total_batch_size % world_tokens:
        raise ValueError(
            f"total batch size {total_batch_size} tokens is not a multiple of device_batch_size * "
            f"sequence_len * num_workers = {device_batch_size} * {sequence_len} * {num_workers} = "
            f"{world_tokens}; change --total-batch-size or --device-batch-size")
    if num_iterations > 0:
        steps = num_iterations
    elif target_flops > 0:
        steps = round(target_flops / (flops_per_token * total_batch_size))
    else:
        steps = int(target_param_data_ratio * scaling_params // total_batch_size)
    steps = max(1, steps)
    total_tokens = steps * total_batch_size
    return Horizon(
        num_iterations=steps, total_batch_size=total_batch_size,
        grad_accum_steps=total_batch_size // world_tokens, tokens_per_micro_batch=tokens_per_micro_batch,
        total_tokens=total_tokens, total_flops=flops_per_token * total_tokens,
        tokens_per_param=total_tokens / scaling_params,
        lr_batch_scale=math.sqrt(total_batch_size / REFERENCE_BATCH_TOKENS),
        weight_decay_scale=math.sqrt(total_batch_size / REFERENCE_BATCH_TOKENS) * reference_tokens / target_tokens,
    )


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.65,
                  final_lr_frac: float = 0.05, warmup_steps: int = 0) -> float:
    """Linear warmup, constant, then linear warmdown to `final_lr_frac` at the last step. The
    warmup lasts `warmup_steps` steps, or a `warmup_ratio` fraction of the run when that is set."""
    warmup = round(warmup_ratio * num_iterations) if warmup_ratio > 0 else warmup_steps
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, num_iterations: int = 0, warmdown_ratio: float = 0.65, warmup_steps: int = 400,
                  start: float = 0.85, peak: float = 0.97, end: float = 0.90) -> float:
    """Muon momentum rises linearly from `start` to `peak` over the first `warmup_steps` steps,
    then, when the run's length is given, falls linearly to `end` over the LR warmdown."""
    warmdown = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown
    if step < warmup_steps:
        frac = step / warmup_steps
        return (1 - frac) * start + frac * peak
    if num_iterations > 0 and warmdown > 0 and step >= warmdown_start:
        progress = (step - warmdown_start) / warmdown
        return (1 - progress) * peak + progress * end
    return peak


def weight_decay_at(step: int, num_iterations: int, weight_decay: float) -> float:
    """Weight decay follows a half cosine from `weight_decay` to zero over the run (it matters
    early, hurts late)."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / num_iterations))
