"""Decoding timings that run the same way against this repository's Engine and the reference's.

bench_engine compares our Engine with karpathy/nanochat's on one machine. The two codebases both
call their package `nanochat`, so they cannot share a process: bench_engine imports this file
for our side and runs it as a script under the reference's Python for the other side, with the
reference checkout first on the path. Nothing here imports a nanochat module at import time;
the classes come in as arguments, and both Engines are driven through the same calls:
`GPT(GPTConfig(...))` built on the meta device, `to_empty`, `init_weights`, and
`Engine(model, tokenizer).generate(prompt, num_samples, max_tokens, temperature, top_k, seed)`.

Two figures per side:
- decode rate: tokens per second of whole `generate` calls (prefill included) on the depth-4
  model of issue 13 (width 256, 4 heads of 64, vocab 4096, full-context window), at batch 1 and
  with 8 samples, top-k 50 at temperature 1;
- step overhead: microseconds per decoding step on a tiny model (depth 1, width 64, vocab 512),
  where the matmuls cost next to nothing and what is left is the per-step work around them
  (kernel launches on a GPU, op dispatch and Python on both), at batch 1 and 32.

The weights are random, jittered so that the samples differ, and the special tokens' head rows
are zeroed: with top-k 50 over thousands of spread-out logits, a zero logit is never among the
candidates, so no row stops early or calls the tool and both sides do the same work.

    python ray_jobs/engine_timing.py [--threads N]   # prints this side's figures as JSON
"""

import json
import sys
import time

import torch

DECODE_SHAPE = dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=256, vocab_size=4096)
OVERHEAD_SHAPE = dict(n_layer=1, n_head=1, n_kv_head=1, n_embd=64, vocab_size=512)
SEQUENCE_LEN = 1024
PROMPT_LEN = 8
DECODE_TOKENS = 200
DECODE_SAMPLES = (1, 8)
OVERHEAD_STEPS = 100
OVERHEAD_BATCHES = (1, 32)
TOP_K = 50
SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


class SpecialTokens:
    """The part of a tokenizer that both Engines use while no tool runs: the special token ids,
    which take the last ids of the vocabulary."""

    def __init__(self, vocab_size: int):
        first = vocab_size - len(SPECIAL_TOKENS)
        self.ids = {name: first + i for i, name in enumerate(SPECIAL_TOKENS)}

    def encode_special(self, name: str) -> int:
        return self.ids[name]

    def get_bos_token_id(self) -> int:
        return self.ids["<|bos|>"]

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in ids)

    def encode(self, text, *args, **kwargs) -> list[int]:
        return [int(part) for part in str(text).split()]


def build_model(GPT, GPTConfig, shape: dict, device: str | torch.device = "cpu", seed: int = 0):
    """A model of `shape` with random weights that make every step's sample a real choice."""
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=SEQUENCE_LEN, window_pattern="L", **shape))
    model.to_empty(device=device)
    model.init_weights()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.device) * 0.02)
        model.lm_head.weight.mul_(50.0)  # spread the logits far apart, so zeroed rows are never in the top-k
        special = list(SpecialTokens(shape["vocab_size"]).ids.values())
        model.lm_head.weight[special] = 0.0
    return model.eval()


def prompt_for(vocab_size: int) -> list[int]:
    return torch.randint(0, vocab_size - len(SPECIAL_TOKENS), (PROMPT_LEN,),
                         generator=torch.Generator().manual_seed(1)).tolist()


def decode_rate(engine, prompt: list[int], num_samples: int) -> float:
    """Tokens per second of one whole generate call, every sample's tokens counted."""
    start = time.perf_counter()
    tokens = sum(len(column) for column, _ in engine.generate(prompt, num_samples=num_samples,
                                                                 max_tokens=DECODE_TOKENS, temperature=1.0,
                                                                 top_k=TOP_K, seed=7))
    return tokens / (time.perf_counter() - start)


def step_overhead_us(engine, prompt: list[int], num_samples: int) -> float:
    """Microseconds per decoding step, the steps after the first column (which waits on the prefill)."""
    stamps = [time.perf_counter() for _ in engine.generate(prompt, num_samples=num_samples,
                                                           max_tokens=OVERHEAD_STEPS + 1, temperature=1.0,
                                                           top_k=TOP_K, seed=7)]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e6


def measure(GPT, GPTConfig, Engine) -> dict:
    """One round of every figure for the codebase these classes come from (after a warm-up call each)."""
    results = {}
    decode_model = build_model(GPT, GPTConfig, DECODE_SHAPE)
    engine = Engine(decode_model, SpecialTokens(DECODE_SHAPE["vocab_size"]))
    prompt = prompt_for(DECODE_SHAPE["vocab_size"])
    for samples in DECODE_SAMPLES:
        decode_rate(engine, prompt[:4], samples)
        results[f"decode_{samples}"] = decode_rate(engine, prompt, samples)
    tiny = build_model(GPT, GPTConfig, OVERHEAD_SHAPE)
    engine = Engine(tiny, SpecialTokens(OVERHEAD_SHAPE["vocab_size"]))
    prompt = prompt_for(OVERHEAD_SHAPE["vocab_size"])
    for batch in OVERHEAD_BATCHES:
        step_overhead_us(engine, prompt, batch)
        results[f"engine_step_us_{batch}"] = step_overhead_us(engine, prompt, batch)
    return results


def main(argv: list[str]) -> None:
    threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 1
    if threads:
        torch.set_num_threads(threads)
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, GPTConfig
    print(json.dumps(measure(GPT, GPTConfig, Engine)))


if __name__ == "__main__":
    main(sys.argv[1:])
