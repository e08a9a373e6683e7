"""Evaluate a chat checkpoint on chat tasks and compute ChatCORE (when all five of its tasks ran), with the work
spread over Ray actors.

    python -m ray_jobs.chat_eval --source sft [--model-tag d20] [--step N]
        [--tasks arc-easy,arc-challenge,mmlu,gsm8k,humaneval,spellingbee] [--max-problems N]
        [--num-samples K] [--temperature T] [--top-k K] [--max-new-tokens N] [--seed S]
        [--num-actors N] [--use-gpu auto|on|off] [--gpu-wait-s S] [--batch-size B] [--require-sandbox]
        [--answer-matching exact|lenient] [--humaneval-harness nanochat|lenient]

How answers are scored (categorical by letter logits, generative by sampling, pass@k, ChatCORE)
is nanochat.chat_eval. The problems are cut into chunks that a pool of Ray
actors score, each actor holding one copy of the model (one actor per GPU on a cluster, two on a
CPU-only machine, as in base_eval; fewer when Serve or another job holds some of the GPUs: the pool
is what ray_jobs.gpus.actor_pool can reserve). A score does not depend on how the problems are cut: problem
i is always sampled with seed `seed + i`, and categorical batches always cover the same problems
(chunks start at multiples of the batch size), so 1 actor and 8 actors give the same numbers.

GSM8K, SpellingBee and arithmetic answers are compared as nanochat compares them (the text after
"#### ", exactly) unless --answer-matching lenient asks for equal numbers instead
(nanochat.tasks.common.ANSWER_MATCHING); the config, and so the report card, records which.

HumanEval runs the model's code in the sandbox of nanochat.execution, in nanochat's harness (the
prompt's imports, the answer's code, the tests) unless --humaneval-harness lenient asks for the
whole prompt to run before the answer (nanochat.tasks.humaneval.HUMANEVAL_HARNESSES); the config,
and so the report card, records which. An actor on a host where one
of the sandbox's kernel layers is missing logs that once; with --require-sandbox it refuses to run
the code there instead, and the job stops with the reason.

The results print as a table and are written to <base>/chat_eval/<source>_<model_tag>_<step>.json
for the report.
"""

import argparse
import json
import math
import os
import sys
import time

import ray
import torch
from ray.util import ActorPool

from nanochat.checkpoint import PHASE_DIRS, CheckpointNotFoundError, checkpoint_dir, find_largest_model, find_last_step
from nanochat.execution import SandboxUnavailableError
from nanochat.chat_eval import CHATCORE_TASKS, ModelAnswerer, Sampling, chatcore, score_problems, summarize
from nanochat.files import atomic_write_bytes, get_base_dir
from nanochat.report import Report
from nanochat.tasks import TASKS, Task, get_task
from nanochat.tasks.common import ANSWER_MATCHING, FinalAnswerTask
from nanochat.tasks.humaneval import HUMANEVAL_HARNESSES
from ray_jobs.base_eval import DEFAULT_CPU_ACTORS, CheckpointModel, actor_layout
from ray_jobs.gpus import DEFAULT_GPU_WAIT_S, GPUsUnavailableError, actor_pool, add_gpu_flags

# The tasks that have an evaluation rule, in the order the reference reports them; the default
# list is nanochat's five ChatCORE tasks (nanochat.chat_eval.CHATCORE_TASKS) and SpellingBee,
# which the report card shows on its own.
EVAL_TASKS = ("arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "spellingbee", "arithmetic")
DEFAULT_TASKS = (*CHATCORE_TASKS, "spellingbee")
EVAL_SPLIT = "test"
# The generated tasks are as long as one asks; the reference evaluates SpellingBee on 256 problems.
TASK_OPTIONS = {"spellingbee": {"size": 256}, "arithmetic": {"size": 256}}
# Chunks per actor and task: enough that an actor that drew slow problems does not hold up the end
# of the run, few enough that dispatching them costs nothing next to the model.
CHUNKS_PER_ACTOR = 4


@ray.remote
class ChatEvalActor:
    """Holds one copy of the model and scores chunks of problems with it."""

    def __init__(self, model_source, tasks: list[Task], sampling: Sampling, batch_size: int, seed: int):
        # Ray hides the GPUs an actor did not ask for, so this is its own GPU or the CPU.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = model_source.load(device)
        self.answerer = ModelAnswerer(model, tokenizer, sampling)
        self.tasks, self.batch_size, self.seed = tasks, batch_size, seed

    def ready(self) -> bool:
        """Answers once the model is loaded; the pool uses only actors that did."""
        return True

    def score(self, task_index: int, indices: list[int]) -> tuple[int, list[int], list[tuple[int, int]]]:
        outcomes = score_problems(self.tasks[task_index], indices, self.answerer, self.batch_size, self.seed)
        return task_index, indices, outcomes


def plan_chunks(tasks: list[Task], num_actors: int, batch_size: int) -> list[tuple[int, list[int]]]:
    """(task index, problem indices) work items, about CHUNKS_PER_ACTOR per actor and task.

    A categorical chunk is a whole number of batches starting at a multiple of batch_size, so
    every batch holds the same problems (and the same padding) however many actors there are."""
    chunks = []
    for task_index, task in enumerate(tasks):
        size = max(1, math.ceil(len(task) / (num_actors * CHUNKS_PER_ACTOR)))
        if task.eval_type == "categorical":
            size = math.ceil(size / batch_size) * batch_size
        chunks += [(task_index, list(range(start, min(start + size, len(task)))))
                   for start in range(0, len(task), size)]
    return chunks


def evaluate_on_actors(model_source, tasks: dict[str, Task], sampling: Sampling = Sampling(), batch_size: int = 8,
                       seed: int = 42, num_actors: int | None = None, num_gpus_per_actor: float | None = None,
                       use_gpu: str = "auto", gpu_wait_s: float = DEFAULT_GPU_WAIT_S) -> dict[str, dict]:
    """Score `tasks` (name -> Task) with the model of `model_source` (anything with
    .load(device) -> (model, tokenizer), e.g. base_eval.CheckpointModel) on a pool of actors that
    exist only for this call: base_eval.actor_layout's size, or fewer when not all can be reserved
    (ray_jobs.gpus.actor_pool). Returns name -> summarize's dict, in the order of `tasks`; prints a
    line per task as it completes."""
    names, task_list = list(tasks), list(tasks.values())
    num_actors, num_gpus = actor_layout(num_actors, num_gpus_per_actor, use_gpu)
    # The model source and the tasks go into the object store once and every actor reads them there.
    args = (ray.put(model_source), ray.put(task_list), sampling, batch_size, seed)
    outcomes: list[dict[int, tuple[int, int]]] = [{} for _ in task_list]
    results = {}
    with actor_pool(ChatEvalActor, args, num_actors, num_cpus=1, num_gpus=num_gpus, wait_s=gpu_wait_s,
                    what="chat_eval") as actors:
        print(f"scoring {sum(len(task) for task in task_list)} problems of {len(task_list)} tasks on {len(actors)} "
              f"actors ({num_gpus} GPU each)", flush=True)
        started = time.time()
        pool = ActorPool(actors)
        for task_index, indices, scored in pool.map_unordered(lambda actor, chunk: actor.score.remote(*chunk),
                                                              plan_chunks(task_list, len(actors), batch_size)):
            outcomes[task_index].update(zip(indices, scored))
            task = task_list[task_index]
            if len(outcomes[task_index]) == len(task):
                name = names[task_index]
                results[name] = summarize(name, task, [outcomes[task_index][i] for i in range(len(task))])
                print(f"  {name}: {results[name]['passed']}/{len(task)} passed ({task.eval_type}, "
                      f"{time.time() - started:.1f}s)", flush=True)
    return {name: results[name] for name in names}


# ----------------------------------------------------------------------------------------------
# The job


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a chat checkpoint on chat tasks and compute ChatCORE")
    parser.add_argument("--source", default="sft", choices=sorted(PHASE_DIRS), help="which checkpoints to evaluate")
    parser.add_argument("--model-tag", default=None, help="checkpoint folder (default: the deepest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated tasks, of {','.join(EVAL_TASKS)}")
    parser.add_argument("--max-problems", type=int, default=None, help="first N problems of each task (default: all)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens (0 = all)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="most tokens per generated answer")
    parser.add_argument("--seed", type=int, default=42, help="generative problem i is sampled with seed + i")
    parser.add_argument("--num-actors", type=int, default=None,
                        help=f"model copies (default: one per GPU, or {DEFAULT_CPU_ACTORS} on a CPU-only cluster); "
                        "fewer when not all can be reserved")
    add_gpu_flags(parser, "eval actors")
    parser.add_argument("--batch-size", type=int, default=8, help="categorical prompts per forward pass")
    parser.add_argument("--require-sandbox", action="store_true",
                        help="run model-written code (HumanEval) only where every kernel layer of the sandbox "
                        "holds; stop the job otherwise")
    parser.add_argument("--answer-matching", default="exact", choices=list(ANSWER_MATCHING),
                        help="how '####' answers (gsm8k, spellingbee, arithmetic) match the reference: exact, "
                        "as nanochat (the default), or lenient (equal numbers: 42.0 = 42), not comparable with nanochat")
    parser.add_argument("--humaneval-harness", default="nanochat", choices=list(HUMANEVAL_HARNESSES),
                        help="the program a HumanEval answer runs in: nanochat's (the prompt's imports, the answer's "
                        "code, the tests; the default), or lenient (the whole prompt first, so a bare function body "
                        "passes), not comparable with nanochat")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    unknown = [name for name in names if name not in EVAL_TASKS]
    if unknown or not names:
        parser.error(f"--tasks {args.tasks!r}: unknown or no tasks {unknown}; choose from {','.join(EVAL_TASKS)} "
                     "(smoltalk, identity and customjson are training sets with no answers to check)")
    if len(set(names)) != len(names):
        parser.error(f"--tasks {args.tasks!r} names a task twice")
    args.tasks = names
    for flag in ("max_problems", "num_samples", "max_new_tokens", "num_actors", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0 (0 = the whole vocabulary), got {args.top_k}")
    if args.step is not None and args.step < 0:
        parser.error(f"--step must be >= 0, got {args.step}")
    return args


def resolve_checkpoint(source: str, model_tag: str | None, step: int | None) -> tuple[str, int]:
    """The model tag and step to evaluate; raises CheckpointNotFoundError when there is none."""
    if model_tag is None:
        model_tag = find_largest_model(os.path.join(get_base_dir(), PHASE_DIRS[source]))
    if step is None:
        step = find_last_step(checkpoint_dir(source, model_tag))
    elif not os.path.exists(os.path.join(checkpoint_dir(source, model_tag), f"meta_{step:06d}.json")):
        raise CheckpointNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir(source, model_tag)}: "
                                      f"leave out --step to take the last one")
    return model_tag, step


def load_tasks(names: list[str], max_problems: int | None, require_sandbox: bool = False,
               answer_matching: str = "exact", humaneval_harness: str = "nanochat") -> dict[str, Task]:
    """The test split of each named task, cut to its first max_problems problems; require_sandbox
    and humaneval_harness go to the task that runs model-written code (HumanEval), answer_matching
    to those with a "####" answer (FinalAnswerTask)."""
    tasks = {}
    for name in names:
        options = dict(TASK_OPTIONS.get(name, {}))
        if name == "humaneval":
            options["require_sandbox"] = require_sandbox
            options["harness"] = humaneval_harness
        if issubclass(TASKS[name], FinalAnswerTask):
            options["answer_matching"] = answer_matching
        task = get_task(name, EVAL_SPLIT, **options)
        tasks[name] = task if max_problems is None else task[:max_problems]
    return tasks


def print_table(results: dict[str, dict], score: float | None, num_samples: int) -> None:
    extra = num_samples > 1
    header = f"{'task':<16} {'accuracy':>9} {'n':>6} {'chance':>7} {'centered':>9}"
    print(header + (f" {'pass@1':>7}" if extra else ""))
    for name, r in results.items():
        line = f"{name:<16} {r['accuracy']:>9.4f} {r['n']:>6} {r['chance']:>7.4f} {r['centered']:>9.4f}"
        print(line + (f" {r['pass@1']:>7.4f}" if extra else ""))
    if score is None:
        print(f"ChatCORE: not computed, it needs all of {','.join(CHATCORE_TASKS)}")
    else:
        print(f"{'ChatCORE':<16} {'':>9} {'':>6} {'':>7} {score:>9.4f}")
    if extra:
        print(f"(accuracy of generative tasks is pass@{num_samples}: any of {num_samples} samples right)", flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        model_tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    except CheckpointNotFoundError as exc:
        print(f"chat_eval: nothing to evaluate. {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    sampling = Sampling(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k or None)
    config = {**vars(args), "model_tag": model_tag, "step": step}
    print("chat_eval config: " + json.dumps(config), flush=True)
    if args.num_samples > 1 and args.temperature == 0:
        print("note: at --temperature 0 all samples of a problem are the same, so pass@k equals pass@1", flush=True)

    tasks = load_tasks(args.tasks, args.max_problems, args.require_sandbox, args.answer_matching,
                       args.humaneval_harness)
    if not ray.is_initialized():
        ray.init()  # joins the cluster of `ray job submit`, or starts a local one
    started = time.time()
    try:
        task_results = evaluate_on_actors(CheckpointModel(args.source, model_tag, step), tasks, sampling,
                                          args.batch_size, args.seed, args.num_actors, use_gpu=args.use_gpu,
                                          gpu_wait_s=args.gpu_wait_s)
    except GPUsUnavailableError as exc:
        print(f"chat_eval: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except SandboxUnavailableError as exc:
        # Raised in an actor: Ray's error carries the actor's traceback, its cause the reason.
        print(f"chat_eval: {getattr(exc, 'cause', exc)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    score = chatcore(task_results)
    print_table(task_results, score, args.num_samples)

    results = {"source": args.source, "model_tag": model_tag, "step": step, "config": config,
               "tasks": task_results, "chatcore": score, "wall_s": time.time() - started}
    out_path = os.path.join(get_base_dir(), "chat_eval", f"{args.source}_{model_tag}_{step}.json")
    atomic_write_bytes(out_path, json.dumps(results, indent=2).encode("utf-8"))
    print(f"results written to {out_path}", flush=True)
    metrics = {name: r["accuracy"] for name, r in task_results.items()}
    if score is not None:
        metrics["ChatCORE"] = score
    Report().log_stage("chat_eval", source=args.source, config=config, timings={"eval_s": results["wall_s"]},
                       metrics=metrics)
    return results


if __name__ == "__main__":
    main()
