"""Benchmark of the chat service: streaming clients on 127.0.0.1 against the Serve app, the same
scheduler in-process, and a replica that serves one request at a time. One run, one table.

    python -m ray_jobs.bench_serve                    # depth 6 (width 384) on CPU: a few minutes
    python -m ray_jobs.bench_serve --depth 20 --replica-cpus 4 --threads 4   # on a GPU machine it uses the GPU

For 1, 4 and 16 concurrent clients (--clients), each client sends --requests-per-client requests
one after another, every request a --max-tokens greedy answer to the same chat message; it
measures time to first token (p50/p99 over all requests) and the total generated tokens per
second of wall time. Three ways of serving, on the same machine and the same model:

- in-process: nanochat.scheduler.Scheduler in this process, requests submitted from asyncio
  tasks: the decoding loop with no serving around it. It runs twice, before and after the Serve
  runs, and the Serve path is held to the mean of the two passes' rates (as bench_train holds Ray
  to its plain loop's): the machine drifts, and one pass alone, taken in the process's first
  seconds, ran 78-118 tokens/s at 1 client in three runs of one session;
- serve, continuous batching: the Serve app of serve/app.py (one ChatModel replica whose batch
  holds every client), streamed over HTTP as server-sent events;
- serve, one at a time: the same app with max_batch_size=1 and max_ongoing_requests=1, the
  behaviour of the seed's worker pool with one worker: a request holds the model until it ends.

The model has random weights (speed does not depend on them) saved as an sft checkpoint in a
temporary NANOCHAT_BASE_DIR, so the replicas load it the normal way. Its special tokens' output
rows are zeroed, so no answer stops early: every request does its full --max-tokens of work.
The model runs on --threads torch threads in this process and on --replica-cpus CPUs (one torch
thread per CPU) in a replica, the same by default, so the three rows compare like with like.
While the continuous-batching app serves the 16 clients, ray_jobs/process_cpu.py takes a census
of the machine's CPU (every process by name: the model replica, the ingress, the proxy, Serve's
controller, Ray's daemons, this driver with the clients; idle time; the hypervisor's steal).
Machines are noisy: compare the ratios of one run, printed at the end, each as one
`RESULT <name> <value> target <op> <number> PASS|FAIL` line (ray_jobs.bench_results).

    python -m ray_jobs.bench_serve --smoke            # tiny sizes, under a minute: the test suite runs it

`--smoke` runs a depth-1 model with a small vocabulary, 4 clients, one short request each (flags
given beside it still win). Its one target is the direction at its largest client count: continuous
batching must beat the one-at-a-time replica (ratio >= 1).
"""

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import tempfile
import time
from dataclasses import asdict

import aiohttp
import ray
import torch
from ray import serve

from nanochat.checkpoint import checkpoint_dir, save_checkpoint
from nanochat.common import autodetect_device_type
from nanochat.gpt import GPT, config_from_depth
from nanochat.scheduler import Scheduler
from nanochat.tokenizer import Tokenizer
from ray_jobs import process_cpu
from ray_jobs.bench_results import result_line
from serve.app import ChatAppArgs, build_app

TARGET_CLIENTS = 16
TARGET_RATIO = 3.0  # continuous batching at 16 clients vs the one-at-a-time replica
SERVE_VS_IN_PROCESS = 0.9  # the Serve path vs the same scheduler driven in-process, at 16 clients
SMOKE_SIZES = {"depth": 1, "vocab_size": 512, "clients": "4", "requests_per_client": 1, "max_tokens": 24}
SMOKE_RATIO = 1.0  # --smoke: batching must beat one at a time, at the largest client count
MODEL_TAG = "bench"
MESSAGE = "Tell me a long story about a fox, a dog and the number 42."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=6, help="model depth (width = 64 * depth, rounded to 128)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="model vocabulary (sets the lm_head's cost)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process scheduler")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (and torch threads) per replica")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes for a quick check (depth 1, 4 clients); the target is then the direction only")
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**SMOKE_SIZES)
    args = parser.parse_args(argv)
    try:
        args.clients = sorted({int(part) for part in args.clients.split(",")})
    except ValueError:
        parser.error(f"--clients {args.clients!r} must be comma-separated integers such as 1,4,16")
    if min(args.clients) < 1 or min(args.depth, args.requests_per_client, args.max_tokens, args.threads) < 1:
        parser.error("--clients, --depth, --requests-per-client, --max-tokens and --threads must be at least 1")
    if args.replica_cpus <= 0:
        parser.error("--replica-cpus must be positive")
    return args


def save_benchmark_checkpoint(args) -> tuple[GPT, Tokenizer]:
    """A random model with a stand-in tokenizer, saved as sft checkpoint 'bench' under the base dir.
    Rows of the lm_head that greedy decoding must never pick are zeroed: the special tokens (so no
    answer stops early) and the ids past the stand-in tokenizer's vocabulary (so every answer decodes)."""
    tokenizer = Tokenizer.train_from_iterator(iter(["nanochat benchmark text, 0123456789. " * 50]), vocab_size=300)
    config = config_from_depth(args.depth, vocab_size=max(args.vocab_size, tokenizer.get_vocab_size()),
                               sequence_len=1024)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
        model.lm_head.weight[tokenizer.get_bos_token_id():] = 0.0
        for token in range(tokenizer.get_bos_token_id()):
            if not re.fullmatch(r"[ -~]+", tokenizer.decode([token])):
                model.lm_head.weight[token] = 0.0  # a byte that is half a character: keep the text whole
    tokenizer_dir = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "tokenizer")
    tokenizer.save(tokenizer_dir)
    save_checkpoint(checkpoint_dir("sft", MODEL_TAG), 0, model.state_dict(), {"model_config": asdict(config)},
                    tokenizer_dir=tokenizer_dir)
    return model.eval(), tokenizer


def summarize(ttfts: list[float], tokens: int, wall_s: float, window: tuple[float, float]) -> dict:
    """The figures of one run of clients; `window` is its (start, end) in time.time() stamps."""
    p99 = statistics.quantiles(ttfts, n=100, method="inclusive")[98] if len(ttfts) > 1 else ttfts[0]
    return {"ttft_p50_ms": 1000 * statistics.median(ttfts), "ttft_p99_ms": 1000 * p99,
            "tokens_per_s": tokens / wall_s, "requests": len(ttfts), "window": window}


async def run_clients(clients: int, requests_per_client: int, one_request) -> dict:
    """`clients` concurrent loops of `requests_per_client` calls of one_request() -> (ttft_s, tokens)."""
    ttfts, tokens = [], 0

    async def client():
        nonlocal tokens
        for _ in range(requests_per_client):
            ttft, count = await one_request()
            ttfts.append(ttft)
            tokens += count

    started, stamp = time.perf_counter(), time.time()
    await asyncio.gather(*(client() for _ in range(clients)))
    return summarize(ttfts, tokens, time.perf_counter() - started, (stamp, time.time()))


def in_process_request(scheduler: Scheduler, prompt: list[int], max_tokens: int):
    async def one_request():
        started = time.perf_counter()
        request = scheduler.submit(prompt, max_tokens=max_tokens, temperature=0.0)
        ttft, count = None, 0
        async for _ in request:
            ttft = ttft if ttft is not None else time.perf_counter() - started
            count += 1
        return ttft, count

    return one_request


def http_request(session, url: str, max_tokens: int):
    body = {"messages": [{"role": "user", "content": MESSAGE}], "temperature": 0, "max_tokens": max_tokens}

    async def one_request():
        started = time.perf_counter()
        ttft, count = None, None
        async with session.post(url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"{url} answered HTTP {response.status}: {await response.text()}")
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[len(b"data:"):])
                if "token" in event and ttft is None:
                    ttft = time.perf_counter() - started
                elif "error" in event:
                    raise RuntimeError(f"a stream failed: {event['error']}")
                elif event.get("done"):
                    count = event["usage"]["completion_tokens"]
        if count != max_tokens:
            raise RuntimeError(f"a request made {count} tokens instead of {max_tokens}: it should never stop early")
        return ttft, count

    return one_request


async def bench_http(port: int, route: str, args) -> tuple[dict, int]:
    """(the figures by number of clients, the most requests the app's replica decoded at once)."""
    url = f"http://127.0.0.1:{port}{route}/chat/completions"
    results = {}
    limits = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=None)) as session:
        await run_clients(1, 1, http_request(session, url, args.max_tokens))  # warm-up
        for clients in args.clients:
            results[clients] = await run_clients(clients, args.requests_per_client,
                                                 http_request(session, url, args.max_tokens))
            print(f"  {route}: {clients} clients done", flush=True)
        async with session.get(f"http://127.0.0.1:{port}{route}/stats") as response:
            (replica,) = (await response.json())["per_replica"]
    print(f"  {route}: its replica decoded at most {replica['peak_active']} requests at once", flush=True)
    return results, replica["peak_active"]


async def bench_in_process(model, tokenizer, args) -> dict:
    scheduler = Scheduler(model, tokenizer, max_batch_size=max(args.clients))
    scheduler.start()
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": MESSAGE},
                                                           {"role": "assistant", "content": ""}]})
    try:
        await run_clients(1, 1, in_process_request(scheduler, prompt, args.max_tokens))  # warm-up
        return {clients: await run_clients(clients, args.requests_per_client,
                                           in_process_request(scheduler, prompt, args.max_tokens))
                for clients in args.clients}
    finally:
        scheduler.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["NANOCHAT_BASE_DIR"] = tempfile.mkdtemp(prefix="nanochat_bench_serve_")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or autodetect_device_type())
    model, tokenizer = save_benchmark_checkpoint(args)
    model.to(device)
    cfg = model.config
    print(f"bench_serve: depth {cfg.n_layer}, width {cfg.n_embd}, vocab {cfg.vocab_size}, device {device}, "
          f"{args.max_tokens} tokens per request, {args.requests_per_client} requests per client, "
          f"torch threads {args.threads} in-process / {args.replica_cpus:g} CPUs per replica", flush=True)

    in_process_before = asyncio.run(bench_in_process(model, tokenizer, args))
    results = {"in-process scheduler (before)": in_process_before}
    print("  in-process: done", flush=True)

    # A fresh local Ray: this is a one-machine benchmark, and the replicas read the temporary base dir.
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"NANOCHAT_BASE_DIR": os.environ["NANOCHAT_BASE_DIR"],
                                       "OMP_NUM_THREADS": str(max(1, int(args.replica_cpus)))}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    common = dict(model_tag=MODEL_TAG, device=args.device, replica_cpus=args.replica_cpus,
                  min_replicas=1, max_replicas=1)
    setups = {
        "serve, continuous batching": ("/batching", ChatAppArgs(max_batch_size=max(args.clients),
                                                                max_ongoing_requests=max(args.clients), **common)),
        "serve, one at a time": ("/one-at-a-time", ChatAppArgs(max_batch_size=1, max_ongoing_requests=1, **common)),
    }
    sampler = process_cpu.CPUSampler(main=process_cpu.MODEL_REPLICA_MAIN)
    sampler.start()
    try:
        for name, (route, app_args) in setups.items():
            # One app at a time: the other's idle replica would hold CPUs that this one may want.
            serve.run(build_app(app_args), name=route.strip("/"), route_prefix=route)
            results[name], _ = asyncio.run(bench_http(port, route, args))
            serve.delete(route.strip("/"))
    finally:
        sampler.stop()
        serve.shutdown()
        ray.shutdown()
    in_process_after = asyncio.run(bench_in_process(model, tokenizer, args))
    results["in-process scheduler (after)"] = in_process_after
    print("  in-process, again: done", flush=True)

    print(f"\n{'serving':<30} {'clients':>7} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'tokens/s':>10}")
    for name, by_clients in results.items():
        for clients, row in by_clients.items():
            print(f"{name:<30} {clients:>7} {row['ttft_p50_ms']:>12.1f} {row['ttft_p99_ms']:>12.1f} "
                  f"{row['tokens_per_s']:>10.1f}")
    clients = max(args.clients) if args.smoke else TARGET_CLIENTS
    if clients in args.clients:
        batching = results["serve, continuous batching"][clients]["tokens_per_s"]
        one_at_a_time = results["serve, one at a time"][clients]["tokens_per_s"]
        passes = [run[clients]["tokens_per_s"] for run in (in_process_before, in_process_after)]
        in_process = statistics.mean(passes)
        ratio = batching / one_at_a_time
        print(f"\nat {clients} clients: continuous batching {ratio:.2f}x the one-at-a-time replica; "
              f"{batching / in_process:.2f}x the in-process scheduler (the cost of HTTP, SSE and Ray; the "
              f"in-process passes before and after: {passes[0]:.1f} and {passes[1]:.1f} tokens/s)")
        census = process_cpu.census_or_none(sampler, *results["serve, continuous batching"][clients]["window"],
                                            f"the {clients}-client run")
        if census is not None:
            print("\n".join(process_cpu.report_lines(census, f"CPU while {clients} clients streamed from the "
                                                               f"continuous-batching app")))
        target = SMOKE_RATIO if args.smoke else TARGET_RATIO
        print(result_line(f"batching_vs_one_at_a_time_{clients}", ratio, ">=", target))
        if not args.smoke:  # at smoke sizes the model's work is too small to weigh the serving against
            print(result_line(f"serve_vs_inprocess_{clients}", batching / in_process, ">=", SERVE_VS_IN_PROCESS))
    return results


if __name__ == "__main__":
    main()
