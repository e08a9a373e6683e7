"""Benchmark of the scheduler's prefix cache (nanochat.prefix_cache): what it saves a chat server.

    python -m ray_jobs.bench_prefix_cache                  # depth 4, context 2048: about a minute on 2 CPUs
    python -m ray_jobs.bench_prefix_cache --depth 20 --device cuda

Every figure is taken with the cache and without it (prefix_cache_tokens=0), on the same model and
the same requests, in one run:
- time to first token at turn --turns (8) of a conversation. Each turn resends the whole history,
  as a client of the OpenAI API does: the previous prompt, the reply, <|assistant_end|>, and a new
  user message of --user-tokens. Earlier turns run to the end (--reply-tokens each), which fills the
  cache as a conversation does; the last turn is timed from submit to its first token, once per
  repeat with a different new message (so no repeat finds its own message cached);
- tokens/s with --clients (16) concurrent requests that share a --system-tokens (500) system prompt,
  each with a question of its own (--user-tokens) and --reply-tokens new tokens: the tokens
  generated over the wall time until all are done, prefills included. Each repeat asks new
  questions; the system prompt is the same throughout, as it is for a deployed application.

Machines are noisy: every figure is the best of --repeats, and the verdicts compare ratios measured
in this same run. Every verdict ends the output as one line,
`RESULT <name> <value> target <op> <number> PASS|FAIL`. The model has random weights (speed does not
depend on them), with the special tokens' logits zeroed so that replies run their full length.
"""

import argparse
import time

import torch

from nanochat.common import autodetect_device_type
from nanochat.scheduler import Scheduler
from ray_jobs.bench_engine import random_model, stand_in_tokenizer, synchronize
from ray_jobs.bench_results import result_line

TTFT_TARGET = 5.0  # turn N's first token at least this many times sooner with the cache
SHARED_PROMPT_TARGET = 1.2  # tokens/s of clients sharing a system prompt, with the cache over without


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=4, help="model depth (width = 64 * depth, rounded to 128)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context", type=int, default=2048, help="the model's context")
    parser.add_argument("--turns", type=int, default=8, help="the conversation's turn whose first token is timed")
    parser.add_argument("--user-tokens", type=int, default=40, help="tokens of each user message")
    parser.add_argument("--reply-tokens", type=int, default=40, help="tokens of each reply")
    parser.add_argument("--clients", type=int, default=16, help="concurrent requests sharing a system prompt")
    parser.add_argument("--system-tokens", type=int, default=500, help="tokens of the shared system prompt")
    parser.add_argument("--repeats", type=int, default=3, help="each figure is the best of this many runs")
    # One thread by default, as in bench_engine: on a small shared machine torch's threads spin-wait.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's own choice)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = parser.parse_args(argv)
    for name in ("depth", "vocab_size", "context", "turns", "user_tokens", "reply_tokens", "clients",
                 "system_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be at least 0")
    conversation = 1 + args.turns * (args.user_tokens + 4 + args.reply_tokens)
    if conversation > args.context:
        parser.error(f"{args.turns} turns of {args.user_tokens} + {args.reply_tokens} tokens ({conversation} in all) "
                     f"do not fit a context of {args.context}: raise --context or lower the others")
    if 1 + args.system_tokens + args.user_tokens + args.reply_tokens > args.context:
        parser.error("the system prompt, a question and a reply do not fit --context")
    return args


class Bench:
    """The model, the chat format's token ids, and a source of random ordinary tokens."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.tokenizer = stand_in_tokenizer()
        self.model = random_model(args.depth, args.vocab_size, args.context, self.tokenizer, device)
        self.special = {name: self.tokenizer.encode_special(name) for name in self.tokenizer.get_special_tokens()}
        self.generator = torch.Generator().manual_seed(0)

    def words(self, count: int) -> list[int]:
        # ids below the first special token are ordinary text
        return torch.randint(0, self.tokenizer.get_bos_token_id(), (count,), generator=self.generator).tolist()

    def user_turn(self, history: list[int]) -> list[int]:
        """`history` followed by a new user message and the assistant's turn, ready to prompt."""
        return (history + [self.special["<|user_start|>"]] + self.words(self.args.user_tokens)
                + [self.special["<|user_end|>"], self.special["<|assistant_start|>"]])

    def scheduler(self, cached: bool, batch: int) -> Scheduler:
        return Scheduler(self.model, self.tokenizer, max_batch_size=batch, max_seq_len=self.args.context,
                         prefix_cache_tokens=None if cached else 0)

    def run(self, scheduler: Scheduler, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        requests = [scheduler.submit(prompt, max_tokens=max_tokens, temperature=0.0) for prompt in prompts]
        while scheduler.has_work():
            scheduler.step()
        if any(len(request.tokens) != max_tokens for request in requests):
            raise RuntimeError("a benchmark request stopped early; its special tokens should be unreachable")
        return [request.tokens for request in requests]

    def first_token_seconds(self, scheduler: Scheduler, prompt: list[int]) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        request = scheduler.submit(prompt, max_tokens=1, temperature=0.0)
        while not request.done:
            scheduler.step()
        synchronize(self.device)
        return time.perf_counter() - start

    @torch.inference_mode()
    def turn_ttft(self, cached: bool) -> tuple[float, int]:
        """(best seconds to the first token of the last turn, its prompt length)."""
        scheduler = self.scheduler(cached, batch=1)
        history = [self.tokenizer.get_bos_token_id()]
        for _ in range(self.args.turns - 1):
            prompt = self.user_turn(history)
            (reply,) = self.run(scheduler, [prompt], self.args.reply_tokens)
            history = prompt + reply + [self.special["<|assistant_end|>"]]
        last_prompts = [self.user_turn(history) for _ in range(self.args.repeats + 1)]  # the first warms up
        times = [self.first_token_seconds(scheduler, prompt) for prompt in last_prompts]
        return min(times[1:]), len(last_prompts[0])

    @torch.inference_mode()
    def shared_prompt_rate(self, cached: bool) -> float:
        """Best tokens/s of --clients requests that share the system prompt."""
        scheduler = self.scheduler(cached, batch=self.args.clients)
        system = [self.tokenizer.get_bos_token_id(), self.special["<|user_start|>"]] + self.words(self.args.system_tokens)
        best = 0.0
        for repeat in range(self.args.repeats + 1):  # the first warms up (and, with the cache, caches the system prompt)
            prompts = [system + self.words(self.args.user_tokens)
                       + [self.special["<|user_end|>"], self.special["<|assistant_start|>"]]
                       for _ in range(self.args.clients)]
            synchronize(self.device)
            start = time.perf_counter()
            self.run(scheduler, prompts, self.args.reply_tokens)
            synchronize(self.device)
            if repeat:
                best = max(best, self.args.clients * self.args.reply_tokens / (time.perf_counter() - start))
        return best


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or autodetect_device_type())
    bench = Bench(args, device)
    cfg = bench.model.config
    print(f"bench_prefix_cache: depth {cfg.n_layer}, width {cfg.n_embd}, vocab {cfg.vocab_size}, context "
          f"{cfg.sequence_len}, device {device}, torch threads {torch.get_num_threads()}, best of {args.repeats}",
          flush=True)
    (ttft_without, prompt_len), (ttft_with, _) = bench.turn_ttft(False), bench.turn_ttft(True)
    rate_without, rate_with = bench.shared_prompt_rate(False), bench.shared_prompt_rate(True)
    results = {"turn": args.turns, "turn_prompt_tokens": prompt_len, "ttft_without_s": ttft_without,
               "ttft_with_s": ttft_with, "ttft_speedup": ttft_without / ttft_with,
               "shared_prompt_tokens_per_s_without": rate_without, "shared_prompt_tokens_per_s_with": rate_with,
               "shared_prompt_speedup": rate_with / rate_without}
    print(f"\n{'figure':<58}  {'no cache':>10}  {'cache':>10}  ratio")
    print(f"{f'time to first token, turn {args.turns} ({prompt_len}-token prompt), ms':<58}  "
          f"{ttft_without * 1e3:>10.1f}  {ttft_with * 1e3:>10.1f}  {results['ttft_speedup']:.2f}x")
    print(f"{f'tokens/s, {args.clients} clients sharing a {args.system_tokens}-token system prompt':<58}  "
          f"{rate_without:>10.1f}  {rate_with:>10.1f}  {results['shared_prompt_speedup']:.2f}x")
    print(result_line(f"prefix_cache_ttft_turn{args.turns}_speedup", results["ttft_speedup"], ">=", TTFT_TARGET))
    print(result_line("prefix_cache_shared_system_prompt_speedup", results["shared_prompt_speedup"], ">=",
                      SHARED_PROMPT_TARGET))
    return results


if __name__ == "__main__":
    main()
