"""Start the chat service: `python -m serve`, then open the printed URL.

Runs the Serve app of serve/app.py on the Ray cluster this machine already belongs to (as
`ray start` or `ray up` left it), or on a new local Ray when there is none, and stays in the
foreground until Ctrl-C, which takes the app down again. For a long-lived deployment use
`serve deploy serve/config.yaml` instead.

`--api-key` (or NANOCHAT_API_KEY in the environment, which keeps the key out of the process list)
makes every endpoint but GET /health and the UI's page ask for `Authorization: Bearer <key>`;
listening beyond 127.0.0.1 (`--host 0.0.0.0`) without one prints a warning.

The checkpoint is looked up before Ray starts, so a machine without one learns in a second which
command makes one (exit status 1) instead of watching replicas fail to start.
"""

import argparse
import os
import sys
import time

from serve.api import API_KEY_ENV, api_key_digest, exposure_warning
from serve.app import APP_NAME, ChatAppArgs, build_app, resolve_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=("sft", "rl", "base"), default="sft",
                        help="which training phase's checkpoint to serve")
    parser.add_argument("--model-tag", help="checkpoint folder such as d20 (default: the largest model)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the last one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help=f"require `Authorization: Bearer <key>` (default: ${API_KEY_ENV}, else no key)")
    parser.add_argument("--min-replicas", type=int, default=1,
                        help="model replicas kept running (0: none while idle; the next request starts one)")
    parser.add_argument("--max-replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together per replica")
    parser.add_argument("--prefix-cache-tokens", type=int,
                        help="positions the prefix cache of a replica keeps (default: as many as its batch's rows "
                             "hold; 0 turns it off)")
    parser.add_argument("--no-transposed-weights", dest="transposed_weights", action="store_false",
                        help="on a CPU, decode without the transposed copies of the matmul weights that speed up "
                             "steps of up to 8 rows (saves one copy of those weights per replica)")
    parser.add_argument("--replica-gpus", type=float,
                        help="GPUs per replica (default: 1 if the cluster has or its autoscaler can add GPUs)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--max-queued-requests", type=int, default=64,
                        help="requests waiting for a model replica, per ingress replica; more get HTTP 503")
    parser.add_argument("--ingress-min-replicas", type=int, default=2, help="HTTP ingress replicas (no CPU each)")
    parser.add_argument("--ingress-max-replicas", type=int, default=4)
    parser.add_argument("--ingress-max-queued-requests", type=int, default=128,
                        help="requests waiting for an ingress replica, per Serve proxy; more get HTTP 503")
    parser.add_argument("--retry-after-s", type=int, default=2, help="the Retry-After header of an overload's 503s")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best the replica's node has)")
    parser.add_argument("--temperature", type=float, default=0.8, help="default for requests that set none")
    parser.add_argument("--top-k", type=int, default=50, help="default for requests that set none (0 = all)")
    parser.add_argument("--max-tokens", type=int, default=512, help="default for requests that set none")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pydantic import ValidationError

    from nanochat.checkpoint import CheckpointError
    from nanochat.files import get_base_dir

    try:
        model_tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    except (CheckpointError, ValueError) as error:
        print(f"error: nothing to serve: {error}", file=sys.stderr)
        return 1
    key = args.api_key or os.environ.get(API_KEY_ENV)
    try:
        app_args = ChatAppArgs(source=args.source, model_tag=model_tag, step=step, device=args.device,
                               max_batch_size=args.max_batch_size, prefix_cache_tokens=args.prefix_cache_tokens,
                               transposed_weights=args.transposed_weights,
                               min_replicas=args.min_replicas,
                               max_replicas=args.max_replicas, replica_gpus=args.replica_gpus,
                               replica_cpus=args.replica_cpus, max_queued_requests=args.max_queued_requests,
                               ingress_min_replicas=args.ingress_min_replicas,
                               ingress_max_replicas=args.ingress_max_replicas,
                               ingress_max_queued_requests=args.ingress_max_queued_requests,
                               retry_after_s=args.retry_after_s, temperature=args.temperature, top_k=args.top_k,
                               max_tokens=args.max_tokens, api_key_sha256=api_key_digest(key) if key else None)
    except ValidationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    warning = exposure_warning(args.host, app_args.api_key_sha256 is not None)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    import ray
    from ray import serve

    # Without an address, ray.init joins the cluster `ray start` made on this machine, or starts one.
    # The replicas load from the base dir in which the checkpoint was just found.
    ray.init(runtime_env={"env_vars": {"NANOCHAT_BASE_DIR": get_base_dir()}})
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"nanochat ({args.source}/{model_tag}, step {step}) is up: http://{shown_host}:{args.port}/")
    print("  API: POST /chat/completions (SSE), POST /v1/chat/completions (OpenAI), GET /stats. Ctrl-C stops it.")
    if app_args.api_key_sha256 is not None:
        print("  Every endpoint but GET /health and the UI's page wants the header Authorization: Bearer <key>.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the nanochat app")
        serve.delete(APP_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
