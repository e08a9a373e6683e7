"""Benchmark of inference: prefill, KV-cache decoding against full recomputation, and the
continuous-batching scheduler's throughput as concurrency grows. One run, one table.

    python -m ray_jobs.bench_engine                      # depth 6 (width 384): minutes on 2 CPUs
    python -m ray_jobs.bench_engine --depth 20 --device cuda

What each row measures, all greedy at batch 1 unless said otherwise:
- prefill: a --context-token prompt through the model into an empty KV cache;
- decode with the KV cache: tokens after the first, continuing that prompt (Engine.generate);
- decode without it: the naive loop that reruns the whole sequence for every token, from the same
  prompt (nanochat.engine.greedy_decode_without_cache);
- scheduler: N requests submitted at once, each a --request-prompt-token prompt and
  --request-tokens new tokens; total generated tokens over the wall time until all are done
  (prefills included).

Machines are noisy, so every number is the best of --repeats runs and the verdicts compare ratios
measured in this same run. The model has random weights (speed does not depend on them), with
the special tokens' logits zeroed so no request stops early or calls the tool: every request
does its full share of work.
"""

import argparse
import time

import torch

from nanochat.common import autodetect_device_type
from nanochat.engine import Engine, greedy_decode_without_cache
from nanochat.gpt import GPT, config_from_depth
from nanochat.kv_cache import KVCache
from nanochat.scheduler import Scheduler
from nanochat.tokenizer import Tokenizer

KV_CACHE_TARGET = 5.0    # KV-cache decode at least this many times the naive loop
SCHEDULER_TARGET = 3.0   # 8 concurrent requests at least this many times one request's throughput
TARGET_CONCURRENCY = 8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=6, help="model depth (width = 64 * depth, rounded to 128)")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--context", type=int, default=256, help="prompt length for prefill and batch-1 decoding")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded with the KV cache")
    parser.add_argument("--naive-tokens", type=int, default=16, help="tokens decoded by full recomputation")
    parser.add_argument("--request-prompt", type=int, default=32, help="prompt length of each scheduler request")
    parser.add_argument("--request-tokens", type=int, default=64, help="new tokens of each scheduler request")
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated numbers of concurrent requests")
    parser.add_argument("--repeats", type=int, default=3, help="each number is the best of this many runs")
    # One thread by default: on a small shared machine, torch's intra-op threads spin-wait against
    # other processes and single timings swing several-fold, which makes the ratios meaningless.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's own choice)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = parser.parse_args(argv)
    try:
        args.concurrency = sorted({int(part) for part in args.concurrency.split(",")})
    except ValueError:
        parser.error(f"--concurrency {args.concurrency!r} must be comma-separated integers such as 1,4,8,16")
    positive = ("depth", "vocab_size", "context", "decode_tokens", "naive_tokens", "request_prompt",
                "request_tokens", "repeats")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.concurrency) < 1 or args.threads < 0:
        parser.error("--concurrency values must be at least 1 and --threads at least 0")
    if args.decode_tokens < 2:
        parser.error("--decode-tokens must be at least 2: the rate is measured after the first token")
    return args


def stand_in_tokenizer() -> Tokenizer:
    """Only the special token ids matter here (stop and tool tokens), so a tiny tokenizer will do."""
    return Tokenizer.train_from_iterator(iter(["nanochat benchmark text, 0123456789. " * 50]), vocab_size=300)


def build_model(args, tokenizer: Tokenizer, device: torch.device) -> GPT:
    config = config_from_depth(args.depth, vocab_size=args.vocab_size,
                               sequence_len=max(1024, args.context + args.decode_tokens + args.naive_tokens,
                                                args.request_prompt + args.request_tokens))
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():
        special_ids = [tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()]
        model.lm_head.weight[special_ids] = 0.0
    return model.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(run, repeats: int, device: torch.device) -> float:
    """The shortest wall time of `repeats` calls of run() (after one warm-up call)."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def bench_prefill(model, prompt: list[int], repeats: int, device: torch.device) -> float:
    ids = torch.tensor([prompt], device=device)

    def prefill():
        model(ids, kv_cache=KVCache.for_model(model, batch_size=1, max_seq_len=len(prompt)))

    return len(prompt) / best_time(prefill, repeats, device)


def bench_kv_decode(engine: Engine, prompt: list[int], tokens: int, repeats: int, device: torch.device) -> float:
    """Tokens/s of the steps after the first (the first column waits for the prefill)."""
    rates = []
    for _ in range(repeats + 1):
        stamps = []
        for _ in engine.generate(prompt, max_tokens=tokens, temperature=0.0):
            synchronize(device)
            stamps.append(time.perf_counter())
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return max(rates[1:])  # the first run warms up


def bench_naive_decode(model, prompt: list[int], tokens: int, repeats: int, device: torch.device) -> float:
    return tokens / best_time(lambda: greedy_decode_without_cache(model, prompt, tokens), repeats, device)


def bench_scheduler(model, tokenizer, prompts: list[list[int]], args, device: torch.device) -> float:
    """Total generated tokens per second with len(prompts) requests in flight at once."""
    scheduler = Scheduler(model, tokenizer, max_batch_size=max(args.concurrency),
                          max_seq_len=args.request_prompt + args.request_tokens)

    def serve_all():
        requests = [scheduler.submit(prompt, max_tokens=args.request_tokens, temperature=0.0) for prompt in prompts]
        while scheduler.has_work():
            scheduler.step()
        if any(len(request.tokens) != args.request_tokens for request in requests):
            raise RuntimeError("a benchmark request stopped early; its special tokens should be unreachable")

    return len(prompts) * args.request_tokens / best_time(serve_all, args.repeats, device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or autodetect_device_type())
    tokenizer = stand_in_tokenizer()
    model = build_model(args, tokenizer, device)
    cfg = model.config
    print(f"bench_engine: depth {cfg.n_layer}, width {cfg.n_embd}, heads {cfg.n_head}, vocab {cfg.vocab_size}, "
          f"{model.num_scaling_params() / 1e6:.1f}M matmul params, device {device}, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}", flush=True)

    generator = torch.Generator().manual_seed(0)
    ordinary = tokenizer.get_bos_token_id()  # ids below the first special token are ordinary text

    def random_prompt(length: int) -> list[int]:
        return torch.randint(0, ordinary, (length,), generator=generator).tolist()

    prompt = random_prompt(args.context)
    engine = Engine(model, tokenizer)
    results = {
        "prefill": bench_prefill(model, prompt, args.repeats, device),
        "naive": bench_naive_decode(model, prompt, args.naive_tokens, args.repeats, device),
        "kv_cache": bench_kv_decode(engine, prompt, args.decode_tokens, args.repeats, device),
    }
    for concurrency in args.concurrency:
        prompts = [random_prompt(args.request_prompt) for _ in range(concurrency)]
        results[f"scheduler_{concurrency}"] = bench_scheduler(model, tokenizer, prompts, args, device)

    single = results[f"scheduler_{args.concurrency[0]}"]
    rows = [(f"prefill ({args.context}-token prompt)", results["prefill"], ""),
            (f"decode batch 1, naive recompute @{args.context}", results["naive"], "1.00x"),
            (f"decode batch 1, KV cache @{args.context}", results["kv_cache"],
             f"{results['kv_cache'] / results['naive']:.2f}x naive")]
    rows += [(f"scheduler, {c} concurrent ({args.request_tokens} tokens each)", results[f"scheduler_{c}"],
              f"{results[f'scheduler_{c}'] / single:.2f}x {args.concurrency[0]} concurrent")
             for c in args.concurrency]
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'measurement':<{width}}  {'tokens/s':>10}  ratio")
    for name, rate, ratio in rows:
        print(f"{name:<{width}}  {rate:>10.1f}  {ratio}")

    kv_ratio = results["kv_cache"] / results["naive"]
    print(f"\nKV-cache decode vs naive: {kv_ratio:.2f}x (target >= {KV_CACHE_TARGET:.0f}x): "
          f"{'PASS' if kv_ratio >= KV_CACHE_TARGET else 'FAIL'}")
    if TARGET_CONCURRENCY in args.concurrency and 1 in args.concurrency:
        batch_ratio = results[f"scheduler_{TARGET_CONCURRENCY}"] / results["scheduler_1"]
        print(f"scheduler {TARGET_CONCURRENCY} concurrent vs 1: {batch_ratio:.2f}x (target >= "
              f"{SCHEDULER_TARGET:.0f}x): {'PASS' if batch_ratio >= SCHEDULER_TARGET else 'FAIL'}")
    return results


if __name__ == "__main__":
    main()
