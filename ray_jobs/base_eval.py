"""Evaluate a base checkpoint: the CORE metric, bits per byte on train and val, and greedy samples.

    python -m ray_jobs.base_eval [--model-tag d20] [--step N] [--eval core,bpb,sample]
        [--max-per-task N] [--num-actors N] [--use-gpu auto|on|off] [--gpu-wait-s S]
        [--device-batch-size B] [--split-tokens N]
        [--source fineweb-edu|sample|local|...] [--data-dir PATH]

CORE runs 22 tasks of thousands of examples, one forward pass per example: on one device that is
the slow part of evaluating a model. Here the examples are cut into chunks and handed to a pool of
Ray actors, each of which loads the model once and then scores whatever chunk comes next, so a
cluster evaluates with its GPUs (one actor per GPU) and a laptop with a couple of CPU actors.
The pool is as large as can be reserved (ray_jobs.gpus.actor_pool): GPUs that Serve or another job
holds are left to them, and the run goes on with the actors that started.
Every example's prompt depends only on the example (see nanochat/core_eval.py), so the score is
the same for any number of actors. The bits-per-byte passes and the samples run on the same
actors, next to the model, because the machine that submits the job may have no GPU.

The results print as a table and are written to <base>/base_eval/<model_tag>_<step>.json for the
report. `evaluate_core_on_actors` is the same CORE pass for a model that is still in memory
(base_train's --core-metric-every).
"""

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import ray
import torch
from ray.util import ActorPool

from nanochat.checkpoint import (PHASE_DIRS, CheckpointNotFoundError, checkpoint_dir, find_largest_model,
                                 find_last_step, load_model)
from nanochat.core_eval import CoreTask, core_score, download_eval_bundle, judge_examples, load_core_tasks
from nanochat.dataset import SOURCES, iter_text, list_parquet_files
from nanochat.engine import Engine
from nanochat.files import atomic_write_bytes, get_base_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.packing import BestFitPacker
from nanochat.report import Report
from nanochat.tokenizer import compute_token_bytes
from ray_jobs.gpus import DEFAULT_GPU_WAIT_S, GPUsUnavailableError, actor_pool, add_gpu_flags, resolve_use_gpu

EVAL_MODES = ("core", "bpb", "sample")
DEFAULT_CPU_ACTORS = 2
# Chunks per actor: enough that an actor that drew slow chunks does not hold up the end of the
# run, few enough that dispatching them costs nothing next to the forward passes.
CHUNKS_PER_ACTOR = 4
SAMPLE_MAX_TOKENS = 16
SAMPLE_PROMPTS = [
    "The capital of Italy is",
    "Water boils at a temperature of",
    "The first month of the year is",
    "The opposite of up is",
    "Two plus three equals",
    "The largest ocean on Earth is the",
]


# ----------------------------------------------------------------------------------------------
# What an actor loads: a saved checkpoint, or weights handed over from a running trainer


@dataclass(frozen=True)
class CheckpointModel:
    """A checkpoint under the base dir, which every node must see (on a cluster: a shared path)."""
    phase: str  # 'base', 'sft' or 'rl', as nanochat.checkpoint.load_model takes it
    model_tag: str
    step: int

    def load(self, device: torch.device) -> tuple[GPT, object]:
        model, tokenizer, _ = load_model(self.phase, device, model_tag=self.model_tag, step=self.step)
        if tokenizer is None:
            raise ValueError(f"the {self.phase} checkpoint {self.model_tag} step {self.step} carries no "
                             "tokenizer, so its text can not be encoded: save it with tokenizer_dir")
        return model, tokenizer


@dataclass
class InMemoryModel:
    """Weights of a model that is not on disk: the GPTConfig fields, a CPU state dict, its tokenizer."""
    model_config: dict
    state_dict: dict
    tokenizer: object

    def load(self, device: torch.device) -> tuple[GPT, object]:
        with torch.device("meta"):
            model = GPT(GPTConfig.from_dict(self.model_config))
        model.to_empty(device=device)
        model.load_state_dict(self.state_dict, strict=True)
        model.eval()
        return model, self.tokenizer


# ----------------------------------------------------------------------------------------------
# The actor


@ray.remote
class EvalActor:
    """Holds one copy of the model and scores CORE chunks, bits per byte and samples with it."""

    def __init__(self, model_source, tasks: list[CoreTask]):
        # Ray hides the GPUs an actor did not ask for, so this is its own GPU or the CPU.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = model_source.load(self.device)
        self.tasks = tasks

    def ready(self) -> str:
        """Answers once the model is loaded; the pool uses only actors that did."""
        return str(self.device)

    def judge(self, task_index: int, indices: list[int]) -> tuple[int, list[int], list[bool]]:
        """Whether the model gets each example of a chunk right."""
        task = self.tasks[task_index]
        return task_index, indices, judge_examples(self.model, self.tokenizer, task.data, self.device, task.meta,
                                                   indices)

    def bits_per_byte(self, shard_path: str, split_tokens: int, batch_size: int) -> dict:
        sequence_len = self.model.config.sequence_len
        num_steps = max(1, split_tokens // (batch_size * sequence_len))
        tokens_seen = 0

        def counted(batches):
            nonlocal tokens_seen
            for x, y in batches:
                tokens_seen += x.numel()
                yield x, y

        stream = counted(packed_batches(shard_path, self.tokenizer, batch_size, sequence_len))
        first = next(stream, None)
        if first is None:
            raise ValueError(f"{shard_path} holds less than one batch ({batch_size} rows of {sequence_len + 1} "
                             "tokens): lower --device-batch-size or use a larger shard")
        bpb = evaluate_bpb(self.model, itertools.chain([first], stream), num_steps,
                           compute_token_bytes(self.tokenizer))
        return {"bpb": bpb, "tokens": tokens_seen}

    def samples(self, prompts: list[str], max_tokens: int) -> list[str]:
        engine = Engine(self.model, self.tokenizer)
        completions = []
        for prompt in prompts:
            tokens = self.tokenizer.encode(prompt, prepend=self.tokenizer.get_bos_token_id())
            sequences, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=max_tokens, temperature=0)
            completions.append(self.tokenizer.decode(sequences[0][len(tokens):]))
        return completions


def packed_batches(shard_path: str, tokenizer, batch_size: int, sequence_len: int, docs_per_encode: int = 256):
    """(x, y) batches of a shard: documents with BOS packed best-fit into rows of sequence_len + 1
    tokens, as the training stream packs them (nanochat.packing), read in the shard's order.

    A plain generator instead of the Ray Data pipeline: an eval reads one shard once, start to end."""
    bos = tokenizer.get_bos_token_id()
    packer = BestFitPacker(sequence_len, bos)
    texts = iter_text([shard_path])
    pending = torch.empty((0, sequence_len + 1), dtype=torch.long)
    while True:
        chunk = list(itertools.islice(texts, docs_per_encode))
        if chunk:
            packer.add(tokenizer.encode(chunk, prepend=bos))
        rows = torch.from_numpy(packer.pop_rows(drain=not chunk)).long()
        pending = torch.cat([pending, rows])
        while len(pending) >= batch_size:
            batch, pending = pending[:batch_size], pending[batch_size:]
            yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        if not chunk:
            return


# ----------------------------------------------------------------------------------------------
# CORE over a pool of actors


def actor_layout(num_actors: int | None, num_gpus_per_actor: float | None, use_gpu: str = "auto") -> tuple[int, float]:
    """(actors asked for, GPUs per actor) of an eval pool. GPUs per actor: 1 when --use-gpu says GPUs
    (ray_jobs.gpus.resolve_use_gpu), else 0. Actors: one per GPU of the cluster (at least one, which
    an autoscaler may have to start a node for), or DEFAULT_CPU_ACTORS CPU actors. The pool then
    gets as many of them as can be reserved (ray_jobs.gpus.actor_pool)."""
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1 if resolve_use_gpu(use_gpu) else 0
    if num_actors is None:
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        num_actors = max(1, int(cluster_gpus // num_gpus_per_actor)) if num_gpus_per_actor else DEFAULT_CPU_ACTORS
    return num_actors, num_gpus_per_actor


def eval_actors(model_source, tasks: list[CoreTask], num_actors: int | None = None,
                num_gpus_per_actor: float | None = None, use_gpu: str = "auto",
                gpu_wait_s: float = DEFAULT_GPU_WAIT_S):
    """A `with` block's pool of EvalActors that each load `model_source` (anything with
    .load(device) -> (model, tokenizer)): actor_layout's size, or fewer when not all can be
    reserved within POOL_TRY_WAIT_S (at least one within gpu_wait_s, else GPUsUnavailableError).
    The model source and the tasks go into the object store once and every actor reads them there."""
    num_actors, num_gpus = actor_layout(num_actors, num_gpus_per_actor, use_gpu)
    return actor_pool(EvalActor, (ray.put(model_source), ray.put(tasks)), num_actors, num_cpus=1,
                      num_gpus=num_gpus, wait_s=gpu_wait_s, what="base_eval")


def plan_chunks(tasks: list[CoreTask], num_actors: int) -> list[tuple[int, list[int]]]:
    """(task index, example indices) work items of about equal size, CHUNKS_PER_ACTOR per actor."""
    total = sum(len(task.data) for task in tasks)
    size = max(1, math.ceil(total / (num_actors * CHUNKS_PER_ACTOR)))
    return [(task_index, list(range(start, min(start + size, len(task.data)))))
            for task_index, task in enumerate(tasks) for start in range(0, len(task.data), size)]


def run_core_on_actors(actors: list, tasks: list[CoreTask]) -> dict:
    """CORE of the model the actors hold; prints one line per task as it completes.

    Returns core_score's dict (results, centered_results, core_metric) and 'correct_examples':
    the indices of the examples the model got right, by task label."""
    judged: list[dict[int, bool]] = [{} for _ in tasks]
    started = time.time()
    pool = ActorPool(actors)
    for task_index, indices, outcomes in pool.map_unordered(lambda actor, chunk: actor.judge.remote(*chunk),
                                                            plan_chunks(tasks, len(actors))):
        judged[task_index].update(zip(indices, outcomes))
        task = tasks[task_index]
        if len(judged[task_index]) == len(task.data):
            print(f"  {task.label}: {sum(judged[task_index].values())}/{len(task.data)} correct "
                  f"({task.num_fewshot}-shot {task.task_type}, {time.time() - started:.1f}s)", flush=True)
    correct = {task.label: sorted(i for i, right in judged[t].items() if right) for t, task in enumerate(tasks)}
    scores = core_score(tasks, {task.label: len(correct[task.label]) / len(task.data) for task in tasks})
    return {**scores, "correct_examples": correct}


def evaluate_core_on_actors(model_source, tasks: list[CoreTask], num_actors: int | None = None,
                            num_gpus_per_actor: float | None = None, use_gpu: str = "auto",
                            gpu_wait_s: float = DEFAULT_GPU_WAIT_S) -> dict:
    """CORE of a model over a pool of actors that exist only for this call (run_core_on_actors' dict).

    For a model that is not on disk pass InMemoryModel(model_config, cpu_state_dict, tokenizer).
    On a GPU cluster whose GPUs are all taken, pass num_gpus_per_actor=0 (CPU actors) or a
    fraction that fits beside their holders, or the call fails after gpu_wait_s."""
    with eval_actors(model_source, tasks, num_actors, num_gpus_per_actor, use_gpu, gpu_wait_s) as actors:
        return run_core_on_actors(actors, tasks)


# ----------------------------------------------------------------------------------------------
# The job


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a base checkpoint: CORE, bits per byte, samples")
    parser.add_argument("--model-tag", default=None, help="checkpoint folder under base_checkpoints (default: the deepest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--eval", default=",".join(EVAL_MODES), help="comma-separated subset of core,bpb,sample")
    parser.add_argument("--max-per-task", type=int, default=-1, help="CORE examples per task (-1 = all)")
    parser.add_argument("--num-actors", type=int, default=None,
                        help=f"model copies (default: one per GPU, or {DEFAULT_CPU_ACTORS} on a CPU-only cluster); "
                        "fewer when not all can be reserved")
    add_gpu_flags(parser, "eval actors")
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass for bits per byte")
    parser.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens per split for bits per byte")
    parser.add_argument("--source", default="fineweb-edu", choices=SOURCES, help="the shards for bits per byte")
    parser.add_argument("--data-dir", default=None, help="folder or glob of parquet shards (local source)")
    parser.add_argument("--eval-bundle-url", default=None,
                        help="where eval_bundle.zip is served (default: the nanochat reference's bucket)")
    args = parser.parse_args(argv)
    modes = [mode.strip() for mode in args.eval.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(EVAL_MODES))
    if unknown or not modes:
        parser.error(f"--eval {args.eval!r}: unknown or no modes {unknown}; choose from {','.join(EVAL_MODES)}")
    args.eval = [mode for mode in EVAL_MODES if mode in modes]
    for flag in ("num_actors", "device_batch_size", "split_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.max_per_task == 0 or args.max_per_task < -1:
        parser.error(f"--max-per-task must be a positive number of examples or -1 for all, got {args.max_per_task}")
    return args


def resolve_checkpoint(model_tag: str | None, step: int | None) -> tuple[str, int]:
    """The model tag and step to evaluate; raises CheckpointNotFoundError when there is none."""
    if model_tag is None:
        model_tag = find_largest_model(os.path.join(get_base_dir(), PHASE_DIRS["base"]))
    if step is None:
        step = find_last_step(checkpoint_dir("base", model_tag))
    return model_tag, step


def print_core_table(core: dict) -> None:
    print(f"{'task':<40} {'accuracy':>10} {'centered':>10}")
    for label, accuracy in core["results"].items():
        print(f"{label:<40} {accuracy:>10.4f} {core['centered_results'][label]:>10.4f}")
    print(f"{'CORE':<40} {'':>10} {core['core_metric']:>10.4f}", flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        model_tag, step = resolve_checkpoint(args.model_tag, args.step)
    except CheckpointNotFoundError as exc:
        print(f"base_eval: nothing to evaluate. {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    print("base_eval config: " + json.dumps({**vars(args), "model_tag": model_tag, "step": step}), flush=True)

    tasks = []
    if "core" in args.eval:
        tasks = load_core_tasks(download_eval_bundle(args.eval_bundle_url), args.max_per_task)
    shards = list_parquet_files(args.source, args.data_dir) if "bpb" in args.eval else []

    if not ray.is_initialized():
        ray.init()  # joins the cluster of `ray job submit`, or starts a local one
    results = {"model_tag": model_tag, "step": step}
    try:
        with eval_actors(CheckpointModel("base", model_tag, step), tasks, args.num_actors, use_gpu=args.use_gpu,
                         gpu_wait_s=args.gpu_wait_s) as actors:
            # bpb and samples queue on the actors ahead of the CORE chunks and run beside them.
            pending = {}
            if "bpb" in args.eval:
                for i, (split, shard) in enumerate((("train", shards[0]), ("val", shards[-1]))):
                    pending[split] = actors[i % len(actors)].bits_per_byte.remote(
                        shard, args.split_tokens, args.device_batch_size)
            if "sample" in args.eval:
                pending["samples"] = actors[-1].samples.remote(SAMPLE_PROMPTS, SAMPLE_MAX_TOKENS)
            if "core" in args.eval:
                print(f"CORE: {len(tasks)} tasks, {sum(len(t.data) for t in tasks)} examples on {len(actors)} actors",
                      flush=True)
                results["core"] = run_core_on_actors(actors, tasks)
            done = {name: ray.get(ref) for name, ref in pending.items()}
    except GPUsUnavailableError as exc:
        print(f"base_eval: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None

    if "samples" in done:
        results["samples"] = [{"prompt": p, "completion": c} for p, c in zip(SAMPLE_PROMPTS, done["samples"])]
        for sample in results["samples"]:
            print(f"sample: {sample['prompt']!r} -> {sample['completion']!r}")
    if "bpb" in args.eval:
        results["bpb"] = {split: done[split]["bpb"] for split in ("train", "val")}
        for split in ("train", "val"):
            print(f"{split} bpb: {done[split]['bpb']:.6f} over {done[split]['tokens']:,} tokens")
    if "core" in results:
        print_core_table(results["core"])

    out_path = os.path.join(get_base_dir(), "base_eval", f"{model_tag}_{step}.json")
    atomic_write_bytes(out_path, json.dumps(results, indent=2).encode("utf-8"))
    print(f"results written to {out_path}", flush=True)
    metrics = {f"{split}_bpb": bpb for split, bpb in results.get("bpb", {}).items()}
    if "core" in results:
        # per-task names prefixed, so CORE's arc_easy is not taken for the chat eval's ARC-Easy in the table
        metrics = {"CORE": results["core"]["core_metric"], **metrics,
                   **{f"CORE {label} (centered)": value for label, value in results["core"]["centered_results"].items()}}
    Report().log_stage("base_eval", source="base", config={**vars(args), "model_tag": model_tag, "step": step},
                       metrics=metrics)
    return results


if __name__ == "__main__":
    main()
