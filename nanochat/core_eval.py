"""The CORE metric of the DCLM paper (arXiv 2406.11794), computed the way the nanochat reference does.

CORE is a single number for how much a base model knows and can do in context: 22 small
in-context-learning tasks, each scored as an accuracy, each accuracy centered on its task's random
baseline (0 = chance, 1 = perfect), and the centered accuracies averaged. The tasks come from the
DCLM eval bundle: `core.yaml` lists them, `eval_meta_data.csv` gives each task's random baseline in
percent, and `eval_data/**/*.jsonl` holds the examples. There are three kinds of task:

- multiple_choice: one query, several candidate continuations; the model is right when the gold
  continuation has the lowest mean loss per token.
- schema: several candidate contexts, one shared continuation; the model is right when the
  continuation has the lowest mean loss after the gold context.
- language_modeling: one context and a continuation; the model is right when greedy decoding
  (argmax at every position) reproduces every token of the continuation.

Every decision made here follows the reference so that numbers compare: the examples of a task
are shuffled with the fixed seed 1337 before any subsampling, the few-shot examples of example i
are drawn with `random.Random(1234 + i)` from the other examples, the prompts are laid out
character for character as the reference's templates lay them out, and every prompt starts with
BOS. One deliberate difference: a prompt longer than the model's `sequence_len` is cut from the
left (the reference cuts only for models that declare a `max_seq_len`, which its own GPT does not),
because the model was never trained on positions beyond its context.

This module is plain Python and PyTorch. Spreading the tasks over machines is ray_jobs/base_eval.py.
"""

import csv
import json
import os
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import yaml

from nanochat.download import DownloadError, DownloadNotFoundError, download_file
from nanochat.files import get_base_dir

EVAL_BUNDLE_BASE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com"
EVAL_BUNDLE_FILE = "eval_bundle.zip"
EVAL_BUNDLE_DIR = "eval_bundle"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# The reference's seeds: one shuffle of every task's examples, and one few-shot draw per example.
SHUFFLE_SEED = 1337
FEWSHOT_SEED_BASE = 1234


# ----------------------------------------------------------------------------------------------
# The eval bundle on disk


def download_eval_bundle(base_url: str | None = None, max_attempts: int = 5, backoff_s: float = 2.0,
                         timeout_s: float = 60.0) -> str:
    """The path of <base>/eval_bundle, downloaded and unzipped first if it is not there yet.

    The zip is fetched from `<base_url>/eval_bundle.zip` (the reference's public bucket by
    default) with nanochat.download (retried with exponential backoff, a cut transfer resumed)
    into a temporary folder, extracted there and only then renamed into place: an interrupted
    download never leaves a half bundle that a later run would trust. Several processes may race;
    the first rename wins and the others use its result.
    """
    base_dir = get_base_dir()
    bundle_dir = os.path.join(base_dir, EVAL_BUNDLE_DIR)
    if os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
        return bundle_dir
    if os.path.exists(bundle_dir):
        raise FileExistsError(f"{bundle_dir} exists but holds no core.yaml: delete it so that the eval "
                              "bundle can be downloaded again")
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
    url = f"{(base_url or EVAL_BUNDLE_BASE_URL).rstrip('/')}/{EVAL_BUNDLE_FILE}"
    work_dir = tempfile.mkdtemp(prefix="eval_bundle.tmp.", dir=base_dir)
    try:
        print(f"downloading the CORE eval bundle from {url}", flush=True)
        try:
            zip_path = download_file(url, os.path.join(work_dir, EVAL_BUNDLE_FILE), retries=max_attempts - 1,
                                     backoff_s=backoff_s, timeout_s=timeout_s)
        except (DownloadNotFoundError, DownloadError) as exc:
            raise RuntimeError(f"could not download the CORE eval bundle from {url} ({exc}): check the "
                               f"network or the URL, or unzip {EVAL_BUNDLE_FILE} by hand into {base_dir}") from exc
        _extract_bundle(zip_path, url, os.path.join(work_dir, "extracted"), bundle_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return bundle_dir


def _extract_bundle(zip_path: str, url: str, extract_dir: str, bundle_dir: str) -> None:
    """Unzip into extract_dir (a fresh temporary path) and rename the bundle in it to bundle_dir."""
    if not zipfile.is_zipfile(zip_path):
        raise ValueError(f"{url} did not return a zip archive: check the URL of the eval bundle")
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(extract_dir)
    # The published zip wraps everything in an eval_bundle/ folder; accept a flat zip as well.
    candidates = [os.path.join(extract_dir, EVAL_BUNDLE_DIR), extract_dir]
    found = next((path for path in candidates if os.path.isfile(os.path.join(path, "core.yaml"))), None)
    if found is None:
        raise ValueError(f"the archive from {url} holds no core.yaml (neither at its top nor under "
                         f"{EVAL_BUNDLE_DIR}/): it is not a CORE eval bundle")
    try:
        os.rename(found, bundle_dir)
    except OSError:
        # Another process renamed its copy into place first; theirs is as good as ours.
        if not os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
            raise


@dataclass
class CoreTask:
    """One CORE task with its examples, as listed in core.yaml and eval_meta_data.csv."""
    label: str
    task_type: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # accuracy of guessing, in percent, as eval_meta_data.csv gives it
    data: list[dict]

    @property
    def meta(self) -> dict:
        """What evaluate_example needs to know about the task besides its data."""
        return {"label": self.label, "task_type": self.task_type, "num_fewshot": self.num_fewshot,
                "continuation_delimiter": self.continuation_delimiter}


def load_core_tasks(bundle_dir: str, max_per_task: int = -1) -> list[CoreTask]:
    """The tasks of core.yaml in order, each with its examples and random baseline.

    The examples are shuffled with the reference's fixed seed (always: the few-shot draws index
    into the shuffled list), then cut to the first `max_per_task` when it is positive, a quick
    approximation of the full metric.
    """
    config_path = os.path.join(bundle_dir, "core.yaml")
    meta_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    for path in (config_path, meta_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {bundle_dir} is not a complete CORE eval bundle; "
                                    "delete the folder and let download_eval_bundle fetch it again")
    if not isinstance(max_per_task, int) or max_per_task == 0 or max_per_task < -1:
        raise ValueError(f"max_per_task must be a positive int or -1 for all examples, got {max_per_task!r}")
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise ValueError(f"{config_path} has no 'icl_tasks' list: it is not the CORE task list")
    baselines = _read_random_baselines(meta_path)

    tasks = []
    for entry in config["icl_tasks"]:
        label = entry.get("label")
        missing = [key for key in ("label", "dataset_uri", "icl_task_type", "num_fewshot") if key not in entry]
        if missing:
            raise ValueError(f"task {label!r} in {config_path} lacks {missing}")
        if entry["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"task {label!r} in {config_path} has icl_task_type {entry['icl_task_type']!r}; "
                             f"the supported types are {list(TASK_TYPES)}")
        if label not in baselines:
            raise ValueError(f"task {label!r} has no row in {meta_path} ('Eval Task' column), so its random "
                             "baseline is unknown")
        # core.yaml lists the shot counts to run; CORE uses the first.
        shots = entry["num_fewshot"]
        num_fewshot = int(shots[0] if isinstance(shots, list) else shots)
        data_path = os.path.join(bundle_dir, "eval_data", entry["dataset_uri"])
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"the examples of task {label!r} are missing: no {data_path}")
        with open(data_path, encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
        random.Random(SHUFFLE_SEED).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]
        _check_fewshot_pool(label, len(data), num_fewshot)
        tasks.append(CoreTask(label=label, task_type=entry["icl_task_type"], num_fewshot=num_fewshot,
                              continuation_delimiter=entry.get("continuation_delimiter", " "),
                              random_baseline=baselines[label], data=data))
    return tasks


def _read_random_baselines(meta_path: str) -> dict[str, float]:
    with open(meta_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"Eval Task", "Random baseline"} <= set(reader.fieldnames):
            raise ValueError(f"{meta_path} needs the columns 'Eval Task' and 'Random baseline', "
                             f"found {reader.fieldnames}")
        return {row["Eval Task"]: float(row["Random baseline"]) for row in reader}


def _check_fewshot_pool(label: str, num_examples: int, num_fewshot: int) -> None:
    if num_fewshot >= num_examples:
        raise ValueError(f"task {label!r} has {num_examples} examples but draws {num_fewshot} few-shot examples "
                         f"from the others; keep at least {num_fewshot + 1} examples (raise --max-per-task "
                         "or use -1 for all)")


# ----------------------------------------------------------------------------------------------
# Prompts: the same characters as the reference's templates


def render_prompts_mc(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per choice: the solved few-shot examples, then the query and that choice."""
    shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per context option, each followed by the shared continuation."""
    shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{shots}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """[prompt without the continuation, prompt with it].

    Contexts are stripped because some datasets store them with trailing spaces, and the prompt
    without the continuation is stripped again so that its tokens are a clean prefix of the
    tokens of the prompt with it (a trailing space would merge into the next token).
    """
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    prompt = f"{shots}{item['context'].strip()}{delimiter}"
    return [prompt.strip(), prompt + item["continuation"]]


def fewshot_examples(data: list[dict], index: int, num_fewshot: int) -> list[dict]:
    """The few-shot examples of example `index`: a draw seeded by the index, so the prompt of an
    example is the same whichever process evaluates it and in whatever order."""
    if num_fewshot == 0:
        return []
    others = [i for i in range(len(data)) if i != index]
    return [data[i] for i in random.Random(FEWSHOT_SEED_BASE + index).sample(others, num_fewshot)]


# ----------------------------------------------------------------------------------------------
# Token sequences and the span of each that is scored


def _common_prefix_length(sequences: list[list[int]]) -> int:
    shortest = min(len(seq) for seq in sequences)
    for i in range(shortest):
        if any(seq[i] != sequences[0][i] for seq in sequences):
            return i
    return shortest


def _common_suffix_length(sequences: list[list[int]]) -> int:
    return _common_prefix_length([seq[::-1] for seq in sequences])


def scored_spans(task_type: str, tokens: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """(sequences to run, start, end): the model is judged on tokens[start:end] of each sequence.

    multiple_choice: the choices share the prompt, so each scores what follows the common prefix.
    schema: the options share the continuation, so each scores the common suffix.
    language_modeling: only the prompt with the continuation runs; it scores what the prompt
    without it lacks.
    """
    if task_type == "multiple_choice":
        start = _common_prefix_length(tokens)
        return tokens, [start] * len(tokens), [len(seq) for seq in tokens]
    if task_type == "schema":
        suffix = _common_suffix_length(tokens)
        return tokens, [len(seq) - suffix for seq in tokens], [len(seq) for seq in tokens]
    if task_type == "language_modeling":
        without, with_continuation = tokens
        if len(without) >= len(with_continuation) or with_continuation[:len(without)] != without:
            raise ValueError("the language-modeling prompt without its continuation does not tokenize to a "
                             "prefix of the prompt with it; the example's continuation is empty or the "
                             "tokenizer merges across the boundary")
        return [with_continuation], [len(without)], [len(with_continuation)]
    raise ValueError(f"unknown task type {task_type!r}; the supported types are {list(TASK_TYPES)}")


def truncate_left(tokens: list[list[int]], starts: list[int], ends: list[int],
                  max_len: int) -> tuple[list[list[int]], list[int], list[int]]:
    """Keep the last `max_len` tokens of every sequence and shift its span to match.

    A span that would start at position 0 starts at 1 instead: its first token then has no context
    left to be predicted from, and so is not scored. That only happens when a continuation alone
    fills the whole context.
    """
    out_tokens, out_starts, out_ends = [], [], []
    for seq, start, end in zip(tokens, starts, ends):
        cut = max(0, len(seq) - max_len)
        out_tokens.append(seq[cut:])
        out_starts.append(max(1, start - cut))
        out_ends.append(end - cut)
    return out_tokens, out_starts, out_ends


# ----------------------------------------------------------------------------------------------
# Judging examples and tasks


@torch.no_grad()
def evaluate_example(index: int, model, tokenizer, data: list[dict], device, task_meta: dict) -> bool:
    """Whether `model` gets example `index` of a task right (see the module docstring for the rules)."""
    task_type = task_meta["task_type"]
    num_fewshot = task_meta["num_fewshot"]
    delimiter = task_meta["continuation_delimiter"]
    _check_fewshot_pool(task_meta.get("label", task_type), len(data), num_fewshot)
    item = data[index]
    shots = fewshot_examples(data, index, num_fewshot)
    render = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
              "language_modeling": render_prompts_lm}.get(task_type)
    if render is None:
        raise ValueError(f"unknown task type {task_type!r}; the supported types are {list(TASK_TYPES)}")
    prompts = render(item, delimiter, shots)
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    tokens, starts, ends = scored_spans(task_type, tokens)
    tokens, starts, ends = truncate_left(tokens, starts, ends, model.config.sequence_len)

    # Right-pad with BOS: the model is causal, so padding never changes the positions scored.
    width = max(len(seq) for seq in tokens)
    input_ids = torch.full((len(tokens), width), tokenizer.get_bos_token_id(), dtype=torch.long)
    for row, seq in enumerate(tokens):
        input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    input_ids = input_ids.to(device)
    logits = model(input_ids).float()
    # Position p predicts token p + 1, so the tokens [start, end) are judged at [start - 1, end - 1).
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")

    if task_type == "language_modeling":
        start, end = starts[0], ends[0]
        predicted = logits[0, start - 1:end - 1].argmax(dim=-1)
        return bool(torch.equal(predicted, input_ids[0, start:end]))
    mean_losses = [losses[row, start - 1:end - 1].mean().item() for row, (start, end) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def judge_examples(model, tokenizer, data: list[dict], device, task_meta: dict, indices=None) -> list[bool]:
    """Whether the model gets each example at `indices` (all by default) right, in that order."""
    indices = range(len(data)) if indices is None else indices
    return [evaluate_example(i, model, tokenizer, data, device, task_meta) for i in indices]


def count_correct(model, tokenizer, data: list[dict], device, task_meta: dict, indices=None) -> int:
    """How many of the examples at `indices` (all by default) the model gets right."""
    return sum(judge_examples(model, tokenizer, data, device, task_meta, indices))


def evaluate_task(model, tokenizer, data: list[dict], device, task_meta: dict, indices=None) -> float:
    """Accuracy on the examples at `indices` (all by default). The few-shot examples are always
    drawn from the whole of `data`, so splitting a task by indices leaves every prompt unchanged."""
    indices = list(range(len(data)) if indices is None else indices)
    if not indices:
        raise ValueError("evaluate_task got no examples to evaluate: pass a non-empty data list or indices")
    return count_correct(model, tokenizer, data, device, task_meta, indices) / len(indices)


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so that chance is 0 and perfect is 1; `random_baseline` is in percent."""
    chance = 0.01 * random_baseline
    return (accuracy - chance) / (1.0 - chance)


def core_score(tasks: list[CoreTask], accuracies: dict[str, float]) -> dict:
    """{'results': accuracy by label, 'centered_results': centered accuracy by label,
    'core_metric': the mean of the centered accuracies} for the accuracies of every task."""
    missing = [task.label for task in tasks if task.label not in accuracies]
    if missing or not tasks:
        raise ValueError(f"core_score needs an accuracy for every task; missing {missing or 'all (no tasks)'}")
    results = {task.label: accuracies[task.label] for task in tasks}
    centered = {task.label: centered_accuracy(accuracies[task.label], task.random_baseline) for task in tasks}
    return {"results": results, "centered_results": centered,
            "core_metric": sum(centered.values()) / len(centered)}
