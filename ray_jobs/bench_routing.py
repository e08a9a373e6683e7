"""Benchmark of prefix-aware routing (serve/routing.py): how much of the prefix cache's work
survives spreading conversations over several ChatModel replicas.

    python -m ray_jobs.bench_routing               # depth 2 on CPU, 16 chats of 6 turns: a few minutes
    python -m ray_jobs.bench_routing --smoke --skip-default-router   # 8 chats of 3 turns, two setups: the suite's

--chats concurrent multi-turn conversations (16) talk to the Serve app over HTTP, the OpenAI
endpoint, greedy, each turn resending the whole history (the previous messages, the reply, a new
user message), as OpenAI clients do. Three setups, one after the other on a fresh app each:
- 1 replica: the hit rate the prefix cache reaches when every turn finds its history;
- --replicas (2) replicas with Serve's default router (power of two choices);
- --replicas replicas with the prefix-aware router.
--skip-default-router leaves out the second, which no target reads.
The hit rate is the prompt tokens served from the replicas' prefix caches over all prompt tokens
(the replicas' /stats counters). Target: the prefix-aware router keeps at least 0.8x the single
replica's rate; the default router's is printed beside it. The ingress runs as 2 replicas, as by
default, so a conversation's turns cross both ingress routers.

The model has random weights saved as a temporary sft checkpoint (bench_serve's, whose answers
are printable text), so the replicas load it the normal way. Every verdict ends the output as one
line, `RESULT <name> <value> target <op> <number> PASS|FAIL`.
"""

import argparse
import asyncio
import os
import tempfile

import aiohttp
import ray
from ray import serve

from ray_jobs.bench_results import result_line
from ray_jobs.bench_serve import MODEL_TAG, free_port, save_benchmark_checkpoint
from serve.app import ChatAppArgs, build_app

HIT_RATE_TARGET = 0.8  # the prefix-aware router's hit rate over the single replica's
SMOKE_SIZES = {"chats": 8, "turns": 3}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=2, help="model depth (width = 64 * depth, rounded to 128)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--chats", type=int, default=16, help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=6, help="user messages per conversation")
    parser.add_argument("--max-tokens", type=int, default=12, help="tokens of each reply")
    parser.add_argument("--replicas", type=int, default=2, help="ChatModel replicas of the routed setups")
    parser.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs per replica")
    parser.add_argument("--imbalance", type=int, default=None,
                        help="the prefix-aware router's routing_imbalance (default: the app's, half a batch)")
    parser.add_argument("--smoke", action="store_true", help="fewer, shorter chats: the suite's quick check")
    parser.add_argument("--skip-default-router", action="store_true",
                        help="leave out the setup with Serve's default router (printed for comparison only)")
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**SMOKE_SIZES)
    args = parser.parse_args(argv)
    if min(args.depth, args.vocab_size, args.chats, args.turns, args.max_tokens) < 1 or args.replicas < 2:
        parser.error("--depth, --vocab-size, --chats, --turns and --max-tokens must be at least 1, --replicas 2")
    if args.replica_cpus <= 0 or (args.imbalance is not None and args.imbalance < 0):
        parser.error("--replica-cpus must be positive and --imbalance at least 0")
    return args


async def chat(session: aiohttp.ClientSession, url: str, index: int, args) -> None:
    """One conversation of --turns user messages, each turn sending the whole history."""
    messages = [{"role": "system", "content": f"You are assistant number {index}; answer briefly and kindly."}]
    for turn in range(args.turns):
        messages.append({"role": "user", "content": f"Chat {index}, question {turn}: what comes after {turn * 7}?"})
        body = {"model": "nanochat", "messages": messages, "max_tokens": args.max_tokens, "temperature": 0}
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            answer = await response.json()
            if response.status != 200:
                raise RuntimeError(f"chat {index} turn {turn}: HTTP {response.status}: {answer}")
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})


async def hit_rate(url: str, args) -> dict:
    """Run the chats against the app at `url`; the replicas' prefix hits over their prompt tokens."""
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{url}/stats") as response:
            before = await response.json()
        await asyncio.gather(*(chat(session, url, index, args) for index in range(args.chats)))
        async with session.get(f"{url}/stats") as response:
            after = await response.json()
    hits = after["prefix_hit_tokens"] - before["prefix_hit_tokens"]
    prompts = after["prefix_prompt_tokens"] - before["prefix_prompt_tokens"]
    return {"hit_rate": hits / prompts, "hit_tokens": hits, "prompt_tokens": prompts,
            "replicas": len(after["per_replica"])}


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["NANOCHAT_BASE_DIR"] = tempfile.mkdtemp(prefix="nanochat_bench_routing_")
    save_benchmark_checkpoint(args)
    print(f"bench_routing: depth {args.depth}, {args.chats} chats of {args.turns} turns, {args.max_tokens} tokens "
          f"per reply, {args.replica_cpus:g} CPUs per replica", flush=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"NANOCHAT_BASE_DIR": os.environ["NANOCHAT_BASE_DIR"], "OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    single, default, prefix = ("1 replica", f"{args.replicas} replicas, Serve's default router",
                               f"{args.replicas} replicas, prefix-aware router")
    setups = {single: (1, "prefix"), default: (args.replicas, "default"), prefix: (args.replicas, "prefix")}
    if args.skip_default_router:
        del setups[default]
    results = {}
    try:
        for number, (name, (replicas, routing)) in enumerate(setups.items()):
            app_args = ChatAppArgs(model_tag=MODEL_TAG, replica_cpus=args.replica_cpus, min_replicas=replicas,
                                   max_replicas=replicas, max_batch_size=args.chats, routing=routing,
                                   routing_imbalance=args.imbalance)
            # One app at a time, each with cold caches: an idle app's replicas would hold CPUs.
            serve.run(build_app(app_args), name=f"routing{number}", route_prefix=f"/routing{number}")
            results[name] = asyncio.run(hit_rate(f"http://127.0.0.1:{port}/routing{number}", args))
            serve.delete(f"routing{number}")
            row = results[name]
            print(f"  {name}: hit rate {row['hit_rate']:.3f} ({row['hit_tokens']} of {row['prompt_tokens']} "
                  f"prompt tokens from the prefix caches)", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["prefix_vs_single"] = results[prefix]["hit_rate"] / results[single]["hit_rate"]
    summary = f"\nhit rate over the single replica's: prefix-aware router {results['prefix_vs_single']:.2f}x"
    if default in results:
        results["default_vs_single"] = results[default]["hit_rate"] / results[single]["hit_rate"]
        summary += f", Serve's default router {results['default_vs_single']:.2f}x"
    print(summary)
    print(result_line(f"prefix_routing_hit_rate_vs_single_{args.replicas}_replicas", results["prefix_vs_single"],
                      ">=", HIT_RATE_TARGET))
    return results


if __name__ == "__main__":
    main()
