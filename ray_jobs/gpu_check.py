"""The GPU check: what the first machine with a CUDA GPU should run before any training on it.

    python -m ray_jobs.gpu_check                 # one CUDA GPU, about 7 minutes on an H200
    python -m ray_jobs.gpu_check --cpu-smoke     # the same code at tiny sizes on CPU, in seconds

It needs the repository and PyTorch only: no Ray (such machines often cannot install its wheel),
no network, no data. It runs the Ray-free core that the Ray workers run (nanochat.gpt's GPT and
config_from_depth, MuonAdamW through GPT.setup_optimizer, the attention backends of
nanochat.flash_attention, nanochat.engine's Engine and its KV cache, nanochat.common.peak_flops),
on synthetic tokens, and checks and measures, one section each:

- precision: the bf16 forward and backward against fp32 on the same weights (weights after a few
  MuonAdamW steps, so that every layer matters): relative error of the loss, of all the gradients
  together and of the worst weight matrix's gradient;
- attention: nanochat's SDPA path in bf16 against fp32, and FA3 / FA2 (where they import) against
  SDPA, outputs and gradients, full causal and sliding window, plus one KV-cache decoding step;
- compile: a torch.compile'd training step against the eager one on the same weights and batch
  (loss and gradients), then the optimizer step;
- train_d12, train_d20: training tokens/s and MFU (against the GPU's bf16 peak from its name) at
  T=2048 on synthetic tokens, after warm-up steps, compiled as the trainers compile on CUDA;
- kv_greedy: Engine greedy decoding through the KV cache against naive recompute, token for token,
  and the scheduler's prefill of prompts padded into one pass against a pass per prompt;
- decode: Engine decode tokens/s at batch 1, 8 and 32;
- fp8: nanochat.fp8's linear layer (base_train --fp8) against the bf16 one on the same inputs, its
  output and both gradients, with torch._scaled_mm on the GPU; then a GPT training step with fp8 on,
  compiled as base_train compiles it, against the bf16 step. Where the GPU cannot run fp8 (compute
  capability below 8.9) the section passes with the reason, as base_train falls back to bf16; the
  CPU smoke runs it through PyTorch's CPU _scaled_mm, eagerly.

- lm_loss: the chunked training loss (nanochat.lm_loss, what GPT trains with) against the plain
  one through the whole logits tensor, on d20's lm_head over 8 rows of 2048 tokens: loss and
  gradients, time and peak memory of each.

They run in the order precision, attention, kv_greedy, decode, fp8, lm_loss, compile (with train_d12),
train_d20.

Each section has a time budget; a global deadline (`--deadline-s`) skips the sections whose budget
no longer fits and says so. The run prints a table, writes one JSON file (`--out`) with every
check's pass/fail, figures and tolerances, and ends with one `RESULT <name> <value> target <op>
<number> PASS|FAIL` line per target. The exit status is 1 when a check that ran failed; the JSON's
`complete` is false when the deadline skipped a section.

Precision is switched the way the library decides it, through the compute dtype that nanochat.gpt
and nanochat.kv_cache read (nanochat.common.COMPUTE_DTYPE, bf16 on the GPU): `compute_dtype`
sets it for one pass and a hook on the last block confirms the activations really had that dtype.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch

from nanochat import flash_attention, gpt as gpt_module, kv_cache as kv_cache_module
from nanochat.common import COMPUTE_DTYPE, peak_flops
from nanochat.engine import Engine, greedy_decode_without_cache
from nanochat.flash_attention import attention_backend, flash_attn_func, flash_attn_with_kvcache
from nanochat.fp8 import enable_fp8, fp8_linear, fp8_unavailable_reason
from nanochat.gpt import GPT, GPTConfig, config_from_depth, padded_rows
from nanochat.lm_loss import chunked_softcap_cross_entropy, soft_cap
from ray_jobs import engine_timing
from ray_jobs.bench_results import result_line

STARTED = time.perf_counter()

# --- tolerances -------------------------------------------------------------------------------
# bf16 keeps 8 significant bits (unit roundoff 2**-9 = 0.2%). The loss is a mean over thousands of
# tokens whose rounding errors mostly cancel: bf16 lands within a few 0.1% of fp32, and 1% is the
# bound. A wrong cast or a path that overflows moves the loss by far more.
LOSS_REL_TOL = 1e-2
# Gradients carry the rounding of every layer's activations on the way back (the residual stream
# itself is rounded to bf16 once per layer): a few percent of their norm over all parameters, more
# for a single small tensor. A gradient that is wrong (a missing term, a bad cast) is off by O(1).
GRAD_REL_TOL = 5e-2
# The worst single weight matrix. The per-layer scalars (resid_lambdas, x0_lambdas) are left out
# of this one: their gradients are sums over every token and channel that nearly cancel, so their
# relative error is large in any precision and says nothing about the kernels (they still count
# in GRAD_REL_TOL above).
GRAD_WORST_REL_TOL = 0.2
# One attention call in bf16: inputs rounded to 0.2%, fp32 softmax and accumulation inside the
# kernels, output rounded again: under 1% of the output's norm, gradients alike; 2% is the bound.
# One key masked wrongly (a window off by one) changes an output row by ~1/window of a value.
ATTN_REL_TOL = 2e-2
# The lm_head's output is bf16 (spacing 1/16 between 8 and 16) and the cached and the recomputing
# paths round differently: two top logits closer than 4 such steps are a tie bf16 cannot order,
# and greedy decoding may take either; a divergence is accepted only at such a tie.
TIE_TOL = 0.25
# The compile check holds the compiled step to the bf16 tolerances above: compiled and eager are
# two bf16 evaluations of the same math, which differ by rounding only.
# fp8 against bf16, one linear layer: e4m3 keeps 4 significant bits (half an ulp is 6.25%, about
# 2.6% RMS over a tensor's values), and the output carries the rounding of both the input and the
# weight: about 4% of its norm (3.8% measured on CPU). The gradients take e5m2's coarser rounding
# of the incoming gradient on top (half an ulp 12.5%): about 6% (5.9%). Twice those are the
# bounds. A lost or inverted scale is off by orders of magnitude, a wrong operand by O(1).
FP8_OUT_REL_TOL = 0.08
FP8_GRAD_REL_TOL = 0.12
# A whole model's loss averages those errors over every token: a step in fp8 lands within a
# fraction of a percent of bf16's; 2% is the bound.
FP8_LOSS_REL_TOL = 2e-2
# The chunked training loss against the plain one: the same bf16 matmuls and fp32 soft-cap and
# softmax, summed in another order; the gradient of the logits is rounded to bf16 in both before
# its two matmuls. They differ by rounding alone, well under 1%; a wrong term is off by O(1).
LM_LOSS_REL_TOL = 1e-2

# --- sizes ------------------------------------------------------------------------------------
GPU_SIZES = {
    "deadline_s": 480.0,  # the 8 minutes; sections finish well inside their budgets (the d12 one in ~100 s)
    "model": dict(aspect_ratio=64, head_dim=128, vocab_size=32768),
    "precision": dict(depth=12, sequence_len=2048, batch=4, presteps=3),
    "attention": dict(batch=2, seq_len=2048, heads=10, head_dim=128),
    # d20 is 896.5 M parameters; 32 rows of 2048 tokens is the reference's d20 device batch on an
    # 80 GB H100, so compiled it fits an H200's 139 GiB with room to spare. d12 takes 16 rows: its
    # eager pass for the compile check keeps the fp32 logits and their softcap unfused
    # (16 x 2048 x 32768 floats = 4 GiB each), far from the limit at 16, closer than needed at 32.
    "train": [dict(name="d12", depth=12, batch=16, sequence_len=2048, warmup=3, steps=10, mfu_target=0.2),
              dict(name="d20", depth=20, batch=32, sequence_len=2048, warmup=3, steps=10, mfu_target=0.3)],
    # T=64 makes the short window 16 tokens: the 8-token prompt and 32 new tokens run well past it
    "kv_greedy": dict(depth=20, sequence_len=64, tokens=32),
    "decode": dict(depth=20, batches=(1, 8, 32), batch_ratio_target=8.0),
    # one linear layer of the gpt2 preset's d24 MLP (1536 -> 6144) over 8 rows of 2048 tokens; then a
    # d4 GPT (width 256, so every block matrix and the lm_head take fp8), compiled as base_train does
    "fp8": dict(tokens=8 * 2048, in_features=1536, out_features=6144, depth=4, batch=8, sequence_len=2048,
                compile=True),
    # seconds each section may take; a section starts only when its budget fits before the deadline
    # d20's lm_head (width 1280, 32,768 tokens) over 8 rows of 2048 tokens: 2 GiB of fp32 logits
    "lm_loss": dict(rows=8 * 2048, width=1280, vocab_size=32768),
    "budgets": {"precision": 40, "attention": 20, "kv_greedy": 30, "decode": 50, "fp8": 60, "lm_loss": 20,
                "compile_and_train_d12": 150,
                "train_d20": 150},
}
CPU_SIZES = {
    "deadline_s": 120.0,
    "model": dict(aspect_ratio=32, head_dim=16, vocab_size=512),
    "precision": dict(depth=2, sequence_len=64, batch=2, presteps=3),
    "attention": dict(batch=1, seq_len=64, heads=4, head_dim=16),
    "train": [dict(name="d1", depth=1, batch=4, sequence_len=64, warmup=1, steps=3, tokens_target=100.0),
              dict(name="d2", depth=2, batch=4, sequence_len=64, warmup=1, steps=3, tokens_target=100.0)],
    "kv_greedy": dict(depth=2, sequence_len=64, tokens=32),
    "decode": dict(depth=2, batches=(1, 8, 32), batch_ratio_target=2.0),
    # width 128 at depth 4 (aspect ratio 32): the smallest GPT whose block matrices take fp8
    "fp8": dict(tokens=256, in_features=128, out_features=512, depth=4, batch=2, sequence_len=64, compile=False),
    "lm_loss": dict(rows=2048, width=64, vocab_size=512),  # 2 chunks on a CPU
    "budgets": {"precision": 10, "attention": 5, "kv_greedy": 10, "decode": 20, "fp8": 10, "lm_loss": 5,
                "compile_and_train_d1": 60,
                "train_d2": 40},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Check and measure the Ray-free core on one CUDA GPU (no Ray needed)")
    p.add_argument("--out", default="gpu_check.json", help="where the JSON report goes")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: the same code, in seconds")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="skip the sections that no longer fit this many seconds after start "
                        "(default 480 on the GPU, 120 for --cpu-smoke)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Run:
    """What every section needs: the device, the sizes, the deadline and the checks so far."""

    def __init__(self, device: torch.device, sizes: dict, deadline_s: float, seed: int):
        self.device, self.sizes, self.deadline_s, self.seed = device, sizes, deadline_s, seed
        self.checks: list[dict] = []
        self.results: list[str] = []

    def seconds_left(self) -> float:
        return self.deadline_s - (time.perf_counter() - STARTED)

    def config(self, depth: int, sequence_len: int):
        return config_from_depth(depth, sequence_len=sequence_len, **self.sizes["model"])

    def model(self, config, seed: int | None = None) -> GPT:
        """A freshly initialised GPT on the device, built the way the trainers build it."""
        torch.manual_seed(self.seed if seed is None else seed)
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device=self.device)
        model.init_weights()
        return model

    def tokens(self, batch: int, sequence_len: int, vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A synthetic (inputs, targets) batch of uniform random token ids."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        rows = torch.randint(0, vocab_size, (batch, sequence_len + 1), generator=generator, device=self.device)
        return rows[:, :-1], rows[:, 1:]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, name: str, passed: bool, figures: dict, tolerances: dict | None = None, **extra) -> None:
        self.checks.append({"name": name, "passed": bool(passed), "figures": figures,
                            "tolerances": tolerances or {}, **extra})

    def result(self, name: str, value: float, op: str, target: float) -> None:
        self.results.append(result_line(f"gpu_check_{name}", value, op, target))


@contextlib.contextmanager
def compute_dtype(model: GPT, dtype: torch.dtype):
    """Run `model` with activations in `dtype` (its weights stay fp32): the switch NANOCHAT_DTYPE
    makes for a whole process, for one pass. Yields the list of dtypes the last block's input had."""
    previous = gpt_module.COMPUTE_DTYPE, kv_cache_module.COMPUTE_DTYPE
    gpt_module.COMPUTE_DTYPE = kv_cache_module.COMPUTE_DTYPE = dtype
    model.init_buffers()
    seen: list[torch.dtype] = []
    hook = model.transformer.h[-1].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
    try:
        yield seen
    finally:
        hook.remove()
        gpt_module.COMPUTE_DTYPE, kv_cache_module.COMPUTE_DTYPE = previous
        model.init_buffers()


@contextlib.contextmanager
def fp32_matmuls():
    """True fp32 matmuls for a reference pass (the trainers allow TF32, whose 10-bit mantissa would
    make the reference itself imprecise)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextlib.contextmanager
def attention_kernel(name: str, module):
    """Make nanochat.flash_attention dispatch to `module` (None: SDPA) for this block."""
    previous = flash_attention._backend
    flash_attention._backend = (name, module)
    try:
        yield
    finally:
        flash_attention._backend = previous


def relative_error(values, references) -> float:
    """||values - references|| / ||references|| over tensors taken together."""
    diff = sum(float((v.float() - r.float()).square().sum()) for v, r in zip(values, references))
    norm = sum(float(r.float().square().sum()) for r in references)
    return math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)


def loss_and_grads(model, step_model, x, y) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of `step_model` (the model or its compiled wrapper) on (x, y), and every gradient."""
    model.zero_grad(set_to_none=True)
    loss = step_model(x, y)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def compare_grads(grads: dict, references: dict) -> dict:
    """Relative error of all the gradients together and of the worst weight matrix (or table)."""
    names = sorted(name for name in references if float(references[name].norm()) > 0)
    matrices = [name for name in names if references[name].dim() >= 2]
    worst = max(matrices, key=lambda name: relative_error([grads[name]], [references[name]]))
    return {"grad_rel_error": relative_error([grads[n] for n in names], [references[n] for n in names]),
            "grad_worst_rel_error": relative_error([grads[worst]], [references[worst]]),
            "grad_worst_param": worst, "grads_compared": len(names),
            "grads_missing": sorted(set(references) - set(grads))}


def train_step(model, step_model, optimizer, x, y) -> torch.Tensor:
    """One training step as base_train takes it (one micro-batch): forward, backward, optimizer."""
    loss = step_model(x, y)
    loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss.detach()


# --- sections ---------------------------------------------------------------------------------

def check_precision(run: Run) -> None:
    size = run.sizes["precision"]
    config = run.config(size["depth"], size["sequence_len"])
    model = run.model(config)
    optimizer = model.setup_optimizer()
    for step in range(size["presteps"]):  # trained a little: the projections that start at zero move
        train_step(model, model, optimizer, *run.tokens(size["batch"], size["sequence_len"], config.vocab_size, step))
    x, y = run.tokens(size["batch"], size["sequence_len"], config.vocab_size, seed=100)
    with compute_dtype(model, torch.float32) as seen32, fp32_matmuls():
        loss32, grads32 = loss_and_grads(model, model, x, y)
    with compute_dtype(model, torch.bfloat16) as seen16:
        loss16, grads16 = loss_and_grads(model, model, x, y)
    figures = {"depth": size["depth"], "tokens": x.numel(), "loss_fp32": loss32, "loss_bf16": loss16,
               "loss_rel_error": abs(loss16 - loss32) / abs(loss32), **compare_grads(grads16, grads32),
               "activation_dtypes": [str(d).removeprefix("torch.") for d in seen32 + seen16]}
    passed = (seen32 == [torch.float32] and seen16 == [torch.bfloat16] and not figures["grads_missing"]
              and figures["loss_rel_error"] <= LOSS_REL_TOL and figures["grad_rel_error"] <= GRAD_REL_TOL
              and figures["grad_worst_rel_error"] <= GRAD_WORST_REL_TOL)
    run.add("precision", passed, figures, {"loss_rel_error": LOSS_REL_TOL, "grad_rel_error": GRAD_REL_TOL,
                                           "grad_worst_rel_error": GRAD_WORST_REL_TOL})
    run.result("bf16_loss_rel_error", figures["loss_rel_error"], "<=", LOSS_REL_TOL)
    run.result("bf16_grad_rel_error", figures["grad_rel_error"], "<=", GRAD_REL_TOL)


def attention_pass(inputs, dtype, window, kernel) -> list[torch.Tensor]:
    """Output and (dq, dk, dv) of one flash_attn_func call on copies of `inputs` in `dtype`."""
    q, k, v, grad_out = (t.to(dtype, copy=True) for t in inputs)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with attention_kernel(*kernel):
        y = flash_attn_func(q, k, v, causal=True, window_size=window)
    y.backward(grad_out)
    return [y.detach(), q.grad, k.grad, v.grad]


def decode_pass(inputs, dtype, window, kernel) -> torch.Tensor:
    """One decoding query over a KV cache filled with the first T - 1 keys, through
    flash_attn_with_kvcache (which appends the last key and value itself)."""
    q, k, v, _ = (t.to(dtype) for t in inputs)
    filled = q.size(1) - 1
    k_cache, v_cache = torch.zeros_like(k), torch.zeros_like(v)
    k_cache[:, :filled], v_cache[:, :filled] = k[:, :filled], v[:, :filled]
    seqlens = torch.full((q.size(0),), filled, dtype=torch.int32, device=q.device)
    with attention_kernel(*kernel), torch.no_grad():
        return flash_attn_with_kvcache(q[:, filled:], k_cache, v_cache, k=k[:, filled:], v=v[:, filled:],
                                       cache_seqlens=seqlens, causal=True, window_size=window)


def check_attention(run: Run) -> None:
    size = run.sizes["attention"]
    generator = torch.Generator(device=run.device).manual_seed(run.seed + 7)
    shape = (size["batch"], size["seq_len"], size["heads"], size["head_dim"])
    # Rounded to bf16 first, so that the fp32 reference sees exactly the bf16 inputs.
    inputs = [torch.randn(shape, generator=generator, device=run.device).bfloat16().float() for _ in range(4)]
    windows = {"causal": (-1, 0), "sliding": (size["seq_len"] // 4, 0)}
    sdpa = ("sdpa", None)
    kernels, skipped = [sdpa], {}
    for name, loader in (("fa3", flash_attention._load_fa3), ("fa2", flash_attention._load_fa2)):
        module, reason = loader()
        if module is None:
            skipped[name] = reason
        else:
            kernels.append((name, module))
    rows, passed = {}, True
    for case, window in windows.items():
        with fp32_matmuls():
            reference = attention_pass(inputs, torch.float32, window, sdpa)
            reference_decode = decode_pass(inputs, torch.float32, window, sdpa)
        sdpa_bf16 = None
        for kernel in kernels:
            got = attention_pass(inputs, torch.bfloat16, window, kernel)
            decoded = decode_pass(inputs, torch.bfloat16, window, kernel)
            row = {"out_rel_error": relative_error(got[:1], reference[:1]),
                   "grad_rel_error": max(relative_error([g], [r]) for g, r in zip(got[1:], reference[1:])),
                   "decode_rel_error": relative_error([decoded], [reference_decode])}
            if kernel is sdpa:
                sdpa_bf16 = (got, decoded)
            else:
                row["out_rel_diff_vs_sdpa"] = relative_error(got[:1], sdpa_bf16[0][:1])
                row["grad_rel_diff_vs_sdpa"] = max(relative_error([g], [s]) for g, s in zip(got[1:], sdpa_bf16[0][1:]))
                row["decode_rel_diff_vs_sdpa"] = relative_error([decoded], [sdpa_bf16[1]])
            passed &= all(value <= ATTN_REL_TOL for value in row.values())
            rows[f"{kernel[0]}_{case}"] = row
    worst = max(value for row in rows.values() for value in row.values())
    figures = {"shape": list(shape), "kernels_skipped": skipped, **rows, "worst_rel_error": worst}
    run.add("attention", passed, figures, {"rel_error": ATTN_REL_TOL}, kernels=[name for name, _ in kernels])
    run.result("attention_worst_rel_error", worst, "<=", ATTN_REL_TOL)


def check_kv_greedy(run: Run) -> None:
    size = run.sizes["kv_greedy"]
    # unrounded short windows (a quarter of the context, not nanochat's multiple of 128), so that
    # decoding runs past a window at this short context
    config = dataclasses.replace(run.config(size["depth"], size["sequence_len"]), window_multiple=1)
    model = random_decoder(run, config)
    tokenizer = engine_timing.SpecialTokens(config.vocab_size)
    prompt = engine_timing.prompt_for(config.vocab_size)
    engine = Engine(model, tokenizer)
    # bf16 on the GPU already; on CPU (the smoke run) bf16 too, so that both runs check the same thing
    with compute_dtype(model, torch.bfloat16) as seen:
        cached, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=size["tokens"], temperature=0.0)
        cached = cached[0][len(prompt):]
        naive = greedy_decode_without_cache(model, prompt, size["tokens"])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + naive], device=run.device))[0, len(prompt) - 1:-1]
    same = next((i for i, (a, b) in enumerate(zip(cached, naive)) if a != b), min(len(cached), len(naive)))
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    figures = {"depth": size["depth"], "activation_dtypes": sorted({str(d).removeprefix("torch.") for d in seen}),
               "prompt_tokens": len(prompt), "window": model.window_sizes[0][0], "tokens": size["tokens"], "identical_tokens": same, "cached_tokens": len(cached),
               "distinct_tokens": len(set(naive)), "min_top2_margin": min(margins)}
    tie_at_divergence = same < len(naive) and same < len(cached) and margins[same] < TIE_TOL
    if same < size["tokens"]:
        figures["margin_at_divergence"] = margins[same] if same < len(margins) else None
    with compute_dtype(model, torch.bfloat16):
        figures["padded_prefill_rel_error"] = padded_prefill_error(model, prompt, run.device)
    passed = ((same == size["tokens"] or tie_at_divergence) and len(cached) == size["tokens"]
              and set(seen) == {torch.bfloat16} and figures["padded_prefill_rel_error"] <= ATTN_REL_TOL)
    run.add("kv_greedy", passed, figures, {"tie_margin": TIE_TOL, "padded_prefill_rel_error": ATTN_REL_TOL})
    # the tokens lost to a divergence that no near tie explains (or to an early stop)
    run.result("kv_greedy_unexplained_mismatches", 0 if passed else size["tokens"] - same, "<=", 0)


def padded_prefill_error(model: GPT, prompt: list[int], device) -> float:
    """The scheduler's prefill of several prompts in one pass, padded to the longest (GPT.forward's
    row_lengths; on a GPU the kernel takes each row's cache length and the padded queries), against
    each prompt's own pass: relative error of the next-token logits. Two rows continue a cached
    prefix of their own length, one starts empty."""
    prefixes, tails = [5, 0, 2], [prompt[:7], prompt[:4], prompt[:1]]
    together = kv_cache_module.KVCache.for_model(model, batch_size=3, max_seq_len=32)
    theirs = []
    with torch.no_grad():
        for row, filled in enumerate(prefixes):
            alone = kv_cache_module.KVCache.for_model(model, batch_size=1, max_seq_len=32)
            if filled:
                history = torch.tensor([prompt[-filled:]], device=device)
                model(history, kv_cache=alone)
                model(history, kv_cache=together.rows(row, row + 1))
            theirs.append(model(torch.tensor([tails[row]], device=device), kv_cache=alone, last_only=True)[0, 0])
        mine = model(padded_rows(tails, device), kv_cache=together, row_lengths=[len(tail) for tail in tails])[:, 0]
    return relative_error(list(mine), theirs)


def random_decoder(run: Run, config) -> GPT:
    """A GPT whose every weight is random (each layer changes the output), with logits of standard
    deviation about 3: spread enough that greedy decoding rarely meets a tie, and below the soft-cap,
    which would flatten the top logits into ties. The special tokens' rows are zeroed so that no
    stop token ends the Engine's generation early."""
    model = run.model(config, seed=run.seed + 11)
    generator = torch.Generator(device=run.device).manual_seed(run.seed + 12)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            fan_in = parameter.size(-1) if parameter.dim() == 2 and "wte" not in name and "value_embeds" not in name else 1
            parameter.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
        model.lm_head.weight.mul_(3.0)
        model.resid_lambdas.fill_(1.0)
        model.x0_lambdas.fill_(0.1)
        model.lm_head.weight[list(engine_timing.SpecialTokens(config.vocab_size).ids.values())] = 0.0
    return model.eval()


def check_training(run: Run, spec: dict, compare_eager: bool) -> None:
    """Tokens/s and MFU of compiled training steps for one model; with `compare_eager`, first the
    compile check on the same model (the first compiled steps then count as its warm-up)."""
    config = run.config(spec["depth"], spec["sequence_len"])
    model = run.model(config)
    optimizer = model.setup_optimizer()
    optimizer.compile_step()  # as train_common.maybe_compile does on CUDA
    compiled = torch.compile(model, dynamic=False)
    batches = [run.tokens(spec["batch"], spec["sequence_len"], config.vocab_size, seed) for seed in range(2)]
    if compare_eager:
        x, y = batches[0]
        train_step(model, model, optimizer, x, y)  # weights that moved off the init
        eager_loss, eager_grads = loss_and_grads(model, model, x, y)
        started = time.perf_counter()
        compiled_loss, compiled_grads = loss_and_grads(model, compiled, x, y)
        compile_seconds = time.perf_counter() - started
        step_loss = float(train_step(model, compiled, optimizer, x, y))
        figures = {"depth": spec["depth"], "tokens": x.numel(), "loss_eager": eager_loss, "loss_compiled": compiled_loss,
                   "loss_rel_error": abs(compiled_loss - eager_loss) / abs(eager_loss),
                   **compare_grads(compiled_grads, eager_grads), "first_call_seconds": compile_seconds,
                   "step_loss": step_loss}
        passed = (figures["loss_rel_error"] <= LOSS_REL_TOL and figures["grad_rel_error"] <= GRAD_REL_TOL
                  and figures["grad_worst_rel_error"] <= GRAD_WORST_REL_TOL and not figures["grads_missing"]
                  and math.isfinite(step_loss))
        run.add("compile", passed, figures, {"loss_rel_error": LOSS_REL_TOL, "grad_rel_error": GRAD_REL_TOL,
                                             "grad_worst_rel_error": GRAD_WORST_REL_TOL})
        run.result("compile_loss_rel_error", figures["loss_rel_error"], "<=", LOSS_REL_TOL)

    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    warm_started = time.perf_counter()
    for step in range(spec["warmup"]):
        train_step(model, compiled, optimizer, *batches[step % 2])
    run.sync()
    warmup_seconds = time.perf_counter() - warm_started
    losses, started = [], time.perf_counter()
    for step in range(spec["steps"]):
        losses.append(train_step(model, compiled, optimizer, *batches[step % 2]))
        if run.seconds_left() < 0:
            break  # the deadline: report the steps timed so far
    run.sync()
    seconds = time.perf_counter() - started
    tokens_per_second = len(losses) * spec["batch"] * spec["sequence_len"] / seconds
    peak = peak_flops(run.device)
    flops_per_token = model.estimate_flops()
    losses = [float(loss) for loss in losses]
    figures = {"depth": spec["depth"], "params": model.param_counts()["total"], "batch": spec["batch"],
               "sequence_len": spec["sequence_len"], "warmup_steps": spec["warmup"], "warmup_seconds": warmup_seconds,
               "timed_steps": len(losses), "step_seconds": seconds / len(losses),
               "tokens_per_second": tokens_per_second, "flops_per_token": flops_per_token,
               "peak_flops": peak or None, "mfu": flops_per_token * tokens_per_second / peak if peak else None,
               "last_loss": losses[-1]}
    if run.device.type == "cuda":
        figures["peak_memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2 ** 30
    finite = all(math.isfinite(loss) for loss in losses)
    if "mfu_target" in spec and peak:
        passed = finite and figures["mfu"] >= spec["mfu_target"]
        run.result(f"train_{spec['name']}_mfu", figures["mfu"], ">=", spec["mfu_target"])
    else:
        target = spec.get("tokens_target", 1.0)
        passed = finite and tokens_per_second >= target
        run.result(f"train_{spec['name']}_tokens_per_s", tokens_per_second, ">=", target)
    run.add(f"train_{spec['name']}", passed, figures)


def check_decode(run: Run) -> None:
    size = run.sizes["decode"]
    config = run.config(size["depth"], engine_timing.SEQUENCE_LEN)
    shape = dict(n_layer=config.n_layer, n_head=config.n_head, n_kv_head=config.n_kv_head,
                 n_embd=config.n_embd, vocab_size=config.vocab_size)
    model = engine_timing.build_model(GPT, GPTConfig, shape, device=run.device, seed=run.seed)
    engine = Engine(model, engine_timing.SpecialTokens(config.vocab_size))
    prompt = engine_timing.prompt_for(config.vocab_size)
    rates = {}
    for batch in size["batches"]:
        engine_timing.decode_rate(engine, prompt[:4], batch)  # warm-up: allocator, kernels' first launch
        run.sync()
        rates[batch] = engine_timing.decode_rate(engine, prompt, batch)
    ratio = rates[max(rates)] / rates[min(rates)]
    figures = {"depth": size["depth"], "tokens_per_row": engine_timing.DECODE_TOKENS, "top_k": engine_timing.TOP_K,
               **{f"tokens_per_second_batch_{batch}": rate for batch, rate in rates.items()},
               f"batch_{max(rates)}_over_batch_{min(rates)}": ratio}
    run.add("decode", ratio >= size["batch_ratio_target"], figures)
    run.result(f"decode_batch_{max(rates)}_over_{min(rates)}", ratio, ">=", size["batch_ratio_target"])


def linear_pass(x, weight, grad_out, use_fp8: bool) -> list[torch.Tensor]:
    """Output and (input, weight) gradients of one linear layer on bf16 activations, its weight an
    fp32 master weight: in fp8 (nanochat.fp8) or as gpt.Linear runs it in bf16."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    y = fp8_linear(x, weight) if use_fp8 else torch.nn.functional.linear(x, weight.to(x.dtype))
    y.backward(grad_out)
    return [y.detach(), x.grad, weight.grad]


def check_fp8(run: Run) -> None:
    size = run.sizes["fp8"]
    reason = fp8_unavailable_reason(run.device) if run.device.type == "cuda" else None
    if reason is not None:  # what base_train does on this GPU: trains in bf16 and says why
        run.add("fp8", True, {"skipped": reason})
        return
    generator = torch.Generator(device=run.device).manual_seed(run.seed + 21)
    x = torch.randn(size["tokens"], size["in_features"], generator=generator, device=run.device).bfloat16()
    weight = torch.randn(size["out_features"], size["in_features"], generator=generator,
                         device=run.device) / math.sqrt(size["in_features"])
    grad_out = torch.randn(size["tokens"], size["out_features"], generator=generator, device=run.device).bfloat16()
    bf16 = linear_pass(x, weight, grad_out, use_fp8=False)
    fp8 = linear_pass(x, weight, grad_out, use_fp8=True)
    errors = {name: relative_error([a], [b]) for name, a, b in zip(("out", "grad_input", "grad_weight"), fp8, bf16)}
    figures = {"linear": [size["tokens"], size["in_features"], size["out_features"]],
               **{f"{name}_rel_diff_vs_bf16": error for name, error in errors.items()},
               "dtypes": [str(t.dtype).removeprefix("torch.") for t in fp8]}
    # fp8 really ran: a path that silently stayed in bf16 would match it to its last bit
    passed = (min(errors.values()) > 0 and errors["out"] <= FP8_OUT_REL_TOL
              and max(errors["grad_input"], errors["grad_weight"]) <= FP8_GRAD_REL_TOL
              and [t.dtype for t in fp8] == [torch.bfloat16, torch.bfloat16, torch.float32])

    # A training step of a GPT with fp8 on, compiled where the trainers compile, against bf16.
    config = run.config(size["depth"], size["sequence_len"])
    model = run.model(config)
    batch = run.tokens(size["batch"], size["sequence_len"], config.vocab_size, seed=3)
    optimizer = model.setup_optimizer()
    with compute_dtype(model, torch.bfloat16):
        train_step(model, model, optimizer, *batch)  # the output projections leave zero
        bf16_loss, _ = loss_and_grads(model, model, *batch)
        layers = enable_fp8(model)
        step_model = torch.compile(model, dynamic=False) if size["compile"] else model
        fp8_loss, fp8_grads = loss_and_grads(model, step_model, *batch)
        model.eval()
        with torch.no_grad():
            eval_loss = float(model(*batch))  # evaluation stays in bf16
    figures.update(model_depth=size["depth"], fp8_layers=len(layers), compiled=size["compile"],
                   loss_bf16=bf16_loss, loss_fp8=fp8_loss, loss_rel_error=abs(fp8_loss - bf16_loss) / abs(bf16_loss),
                   eval_loss_rel_error=abs(eval_loss - bf16_loss) / abs(bf16_loss),
                   grads_finite=all(bool(torch.isfinite(g).all()) for g in fp8_grads.values()))
    passed &= (len(layers) == 6 * size["depth"] + 1 and figures["loss_rel_error"] <= FP8_LOSS_REL_TOL
               and figures["grads_finite"] and figures["eval_loss_rel_error"] <= LOSS_REL_TOL)
    run.add("fp8", passed, figures, {"out_rel_diff_vs_bf16": FP8_OUT_REL_TOL, "grad_rel_diff_vs_bf16": FP8_GRAD_REL_TOL,
                                     "loss_rel_error": FP8_LOSS_REL_TOL})
    run.result("fp8_out_rel_diff_vs_bf16", errors["out"], "<=", FP8_OUT_REL_TOL)
    run.result("fp8_loss_rel_error", figures["loss_rel_error"], "<=", FP8_LOSS_REL_TOL)


def lm_loss_pass(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunked: bool):
    """The training loss of an lm_head over hidden states x, and its gradients: chunked as GPT
    trains (nanochat.lm_loss), or through the whole logits tensor (the plain way)."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    if chunked:
        loss = chunked_softcap_cross_entropy(x, weight, targets, gpt_module.LOGIT_SOFTCAP)
    else:
        capped = soft_cap((x @ weight.t()).float(), gpt_module.LOGIT_SOFTCAP)
        loss = torch.nn.functional.cross_entropy(capped, targets, ignore_index=-1)
    loss.backward()
    return loss.detach(), {"x": x.grad, "weight": weight.grad}


def check_lm_loss(run: Run) -> None:
    """The chunked training loss against the plain one on the same bf16 hidden states and lm_head,
    d20's head over one device batch: loss, gradients, time and peak memory of each."""
    size = run.sizes["lm_loss"]
    generator = torch.Generator(device=run.device).manual_seed(run.seed + 11)
    x = torch.randn(size["rows"], size["width"], generator=generator, device=run.device).to(COMPUTE_DTYPE)
    weight = (torch.randn(size["vocab_size"], size["width"], generator=generator, device=run.device)
              * size["width"] ** -0.5).to(COMPUTE_DTYPE)
    targets = torch.randint(0, size["vocab_size"], (size["rows"],), generator=generator, device=run.device)
    targets[::50] = -1
    figures, outputs = {}, {}
    for name, chunked in (("plain", False), ("chunked", True)):
        lm_loss_pass(x, weight, targets, chunked)  # warm-up
        run.sync()
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
            base = torch.cuda.memory_allocated(run.device)
        started = time.perf_counter()
        outputs[name] = lm_loss_pass(x, weight, targets, chunked)
        run.sync()
        figures[f"{name}_ms"] = 1000 * (time.perf_counter() - started)
        if run.device.type == "cuda":
            figures[f"{name}_peak_gib"] = (torch.cuda.max_memory_allocated(run.device) - base) / 2 ** 30
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = outputs["plain"], outputs["chunked"]
    figures.update(rows=size["rows"], vocab_size=size["vocab_size"], loss=float(plain_loss),
                   loss_rel_error=abs(float(chunked_loss) - float(plain_loss)) / abs(float(plain_loss)),
                   grad_x_rel_error=relative_error([chunked_grads["x"]], [plain_grads["x"]]),
                   grad_weight_rel_error=relative_error([chunked_grads["weight"]], [plain_grads["weight"]]))
    passed = (figures["loss_rel_error"] <= LM_LOSS_REL_TOL and figures["grad_x_rel_error"] <= LM_LOSS_REL_TOL
              and figures["grad_weight_rel_error"] <= LM_LOSS_REL_TOL)
    run.add("lm_loss", passed, figures, {"loss_rel_error": LM_LOSS_REL_TOL, "grad_rel_error": LM_LOSS_REL_TOL})
    run.result("lm_loss_grad_rel_error", max(figures["grad_x_rel_error"], figures["grad_weight_rel_error"]), "<=",
               LM_LOSS_REL_TOL)


def sections(run: Run) -> list[tuple[str, object]]:
    """(budget key, callable) in the order they run: the quick sections first, the training ones (which
    compile) last, so that a deadline cuts the most expensive section first."""
    first, *rest = run.sizes["train"]
    plan = [("precision", lambda: check_precision(run)), ("attention", lambda: check_attention(run)),
            ("kv_greedy", lambda: check_kv_greedy(run)), ("decode", lambda: check_decode(run)),
            ("fp8", lambda: check_fp8(run)), ("lm_loss", lambda: check_lm_loss(run)),
            (f"compile_and_train_{first['name']}", lambda: check_training(run, first, compare_eager=True))]
    return plan + [(f"train_{spec['name']}", lambda spec=spec: check_training(run, spec, compare_eager=False))
                   for spec in rest]


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device), "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
            "attention_backend": attention_backend(), "peak_bf16_flops": peak_flops(device) or None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    memory_gib=props.total_memory / 2 ** 30)
    else:
        info["threads"] = torch.get_num_threads()
    return info


def run_sections(run: Run) -> list[dict]:
    """Every section within the deadline; returns the skipped ones. A section that raises is a failed
    check with its error; on CUDA its memory is released before the next one."""
    skipped = []
    for key, section in sections(run):
        budget = run.sizes["budgets"][key]
        if run.seconds_left() < budget:
            skipped.append({"section": key, "budget_s": budget, "seconds_left": round(run.seconds_left(), 1)})
            print(f"[gpu_check] skipped {key}: its budget of {budget} s does not fit the {run.seconds_left():.0f} s "
                  f"left before the deadline", flush=True)
            continue
        print(f"[gpu_check] {key} (budget {budget} s) ...", flush=True)
        before, started = len(run.checks), time.perf_counter()
        try:
            section()
        except Exception as error:  # one broken section must not hide the figures of the others
            run.add(key, False, {}, error=f"{type(error).__name__}: {error}")
        seconds = time.perf_counter() - started
        for check in run.checks[before:]:
            check.update(section=key, section_seconds=seconds, budget_s=budget)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    return skipped


def format_figure(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def table(checks: list[dict], skipped: list[dict]) -> str:
    """One line per check: its verdict, its seconds, then its figures (nested ones flattened)."""
    lines = [f"{'check':<12} {'result':<6} {'secs':>6}  figures"]
    for check in checks:
        flat = {}
        for key, value in check["figures"].items():
            if isinstance(value, dict) and key != "kernels_skipped":
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        text = " ".join(f"{k}={format_figure(v)}" for k, v in flat.items())
        if "error" in check:
            text = f"error: {check['error']}"
        lines.append(f"{check['name']:<12} {'PASS' if check['passed'] else 'FAIL':<6} "
                     f"{check.get('section_seconds', 0):>6.1f}  {text}")
    lines += [f"{item['section']:<12} {'SKIP':<6} {'':>6}  deadline: budget {item['budget_s']} s, "
              f"{item['seconds_left']} s left" for item in skipped]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cpu_smoke:
        device, sizes = torch.device("cpu"), CPU_SIZES
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda", torch.cuda.current_device()), GPU_SIZES
        torch.cuda.set_device(device)
    else:
        print("gpu_check: no CUDA GPU is visible; run with --cpu-smoke to check the code at tiny sizes on CPU",
              file=sys.stderr)
        raise SystemExit(2)
    torch.set_float32_matmul_precision("high")  # as the trainers set it
    run = Run(device, sizes, args.deadline_s if args.deadline_s is not None else sizes["deadline_s"], args.seed)
    env = environment(device)
    print(f"[gpu_check] {json.dumps(env)}", flush=True)
    skipped = run_sections(run)
    report = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "environment": env, "deadline_s": run.deadline_s,
              "elapsed_s": time.perf_counter() - STARTED, "passed": all(check["passed"] for check in run.checks),
              "complete": not skipped,
              "checks": run.checks, "skipped": skipped, "results": run.results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(table(run.checks, skipped))
    print(f"[gpu_check] {report['elapsed_s']:.0f} s, report in {os.path.abspath(args.out)}")
    for line in run.results:
        print(line)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
