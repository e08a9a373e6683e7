"""What every chat task shares: the Task base class, mixtures and sequences of tasks, the two
evaluation rules, and the downloader for the Hugging Face parquet files the real sets come from.

A Task is a list of conversations in the tokenizer's format
({"messages": [{"role": ..., "content": ...}, ...]}) plus, for the sets we evaluate on, a rule
that says whether the model's answer is right:

- categorical (MMLU, ARC): the user message lists lettered choices and the assistant answers with
  one letter; `conversation["letters"]` holds the letters, so an evaluator can restrict the model's
  logits to them. `evaluate` compares the letter.
- generative (GSM8K, arithmetic, SpellingBee, HumanEval): the model writes a free answer that the
  task checks, for the GSM8K-style tasks by the number on the final "#### <number>" line.
- None: training-only conversations (SmolTalk, identity, CustomJSON); `evaluate` refuses them.

`reward` is what RL maximizes: 1.0 for a right answer, 0.0 otherwise.

Tasks slice cheaply: `Task(start=, stop=, step=)` or `task[a:b:c]` is a view of the same loaded
rows, which is how jobs take "the first 500 problems" or one worker's share. The real sets are
shuffled once with a fixed seed when loaded, so such a slice is a fair sample (MMLU's rows, for
example, are sorted by subject) and every process sees the same order.

Downloads go to <base>/task_data/<owner>__<name>/<path in the repository> through
nanochat.download: they stream into a '.part' file that a later attempt resumes with an HTTP Range
request, must open as parquet, and only then are renamed into place. A file lock keeps the
training workers of one machine from downloading the same file at once.
"""

import abc
import bisect
import copy
import os
import random
import re
from decimal import Decimal, InvalidOperation

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.download import DownloadError, DownloadGaveUpError, DownloadNotFoundError, download_file
from nanochat.files import get_base_dir

EVAL_TYPES = ("generative", "categorical")

# Where datasets live on the Hugging Face hub. HF_ENDPOINT is the variable the hub's own tools
# read to use a mirror; a mirror serves the same paths.
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
TASK_DATA_DIR = "task_data"


class Task(abc.ABC):
    """A sliceable list of conversations with an optional evaluation rule.

    Subclasses define num_examples() and get_example(index) over the whole set; the view
    (start, stop, step) picks which of those examples len() and task[i] see. `stop` beyond the
    end of the set is clipped to it, as in Python slicing.
    """

    # 'generative', 'categorical', or None for training-only conversations.
    eval_type: str | None = None

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        for value, name in ((start, "start"), (step, "step")):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r} must be an int")
        if start < 0:
            raise ValueError(f"start={start} must be >= 0 (it is a position in the task's examples)")
        if step < 1:
            raise ValueError(f"step={step} must be >= 1")
        if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int) or stop < start):
            raise ValueError(f"stop={stop!r} must be None or an int >= start ({start})")
        self.start, self.stop, self.step = start, stop, step

    @abc.abstractmethod
    def num_examples(self) -> int:
        """How many examples the whole set has, whatever the view."""

    @abc.abstractmethod
    def get_example(self, index: int) -> dict:
        """The conversation at `index` of the whole set (0 <= index < num_examples())."""

    def _positions(self) -> range:
        """The indices into the whole set that this view covers."""
        total = self.num_examples()
        stop = total if self.stop is None else min(self.stop, total)
        return range(min(self.start, stop), stop, self.step)

    def __len__(self) -> int:
        return len(self._positions())

    def __getitem__(self, index):
        """task[i] is a conversation (negative i counts from the end); task[a:b:c] is a view."""
        positions = self._positions()
        if isinstance(index, slice):
            if index.step is not None and index.step < 1:
                raise ValueError(f"a task slice needs a positive step, not {index.step}")
            view = copy.copy(self)  # shares the loaded rows; only the view changes
            chosen = positions[index]
            view.start, view.stop, view.step = chosen.start, chosen.stop, chosen.step
            return view
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"task indices must be ints or slices, not {type(index).__name__}")
        if not -len(positions) <= index < len(positions):
            raise IndexError(f"index {index} is out of range for {type(self).__name__} "
                             f"with {len(positions)} examples")
        return self.get_example(positions[int(index)])

    def __iter__(self):
        for position in self._positions():
            yield self.get_example(position)

    def evaluate(self, conversation: dict, answer: str) -> bool:
        """Whether `answer`, the assistant's reply to `conversation`, is right."""
        raise TypeError(f"{type(self).__name__} has no evaluation rule: it holds training "
                        "conversations only (eval_type None); evaluate a task whose eval_type is "
                        f"one of {EVAL_TYPES}")

    def reward(self, conversation: dict, answer: str) -> float:
        """The RL reward of an answer: 1.0 when evaluate() calls it right, else 0.0."""
        return float(self.evaluate(conversation, answer))


# -----------------------------------------------------------------------------------------------
# Combining tasks


class _TaskCollection(Task):
    """Several tasks seen as one list: positions 0..sum(len) map to (member, index in member)."""

    def __init__(self, tasks, **view):
        super().__init__(**view)
        tasks = list(tasks)
        if not tasks:
            raise ValueError(f"{type(self).__name__} needs at least one task")
        not_tasks = [type(t).__name__ for t in tasks if not isinstance(t, Task)]
        if not_tasks:
            raise ValueError(f"{type(self).__name__} takes Task objects, got {not_tasks}")
        self.tasks = tasks
        self.lengths = [len(task) for task in tasks]
        # offsets[k] is the position of member k's first example in the concatenation.
        self.offsets = [0]
        for length in self.lengths:
            self.offsets.append(self.offsets[-1] + length)

    def num_examples(self) -> int:
        return self.offsets[-1]

    def _member_example(self, concatenated_index: int) -> dict:
        member = bisect.bisect_right(self.offsets, concatenated_index) - 1
        return self.tasks[member][concatenated_index - self.offsets[member]]


class TaskSequence(_TaskCollection):
    """The members one after another, in the order given (a curriculum)."""

    def get_example(self, index: int) -> dict:
        return self._member_example(index)


class TaskMixture(_TaskCollection):
    """All examples of the members in one order shuffled with a fixed seed, so that every part
    of training sees every member in proportion to its size. Pass a task twice to oversample it.
    The same members and seed always give the same order."""

    def __init__(self, tasks, seed: int = 42, **view):
        super().__init__(tasks, **view)
        order = list(range(self.num_examples()))
        # random.Random rather than numpy: its shuffle has given the same order for a seed
        # in every Python 3 release, and every training worker must agree on it.
        random.Random(seed).shuffle(order)
        self.order = np.asarray(order, dtype=np.int64)

    def get_example(self, index: int) -> dict:
        return self._member_example(int(self.order[index]))


# -----------------------------------------------------------------------------------------------
# Categorical tasks: lettered choices, answered with one letter

CHOICE_LETTERS = "ABCDEFGHIJ"


def render_multiple_choice(question: str, letters, choices) -> str:
    """The user message of a multiple-choice question, in nanochat's layout (its render_mc):

        Multiple Choice question: <question>
        - <choice>=<letter>
        - <choice>=<letter>

        Respond only with the letter of the correct answer.

    The letter comes after its choice, and right after the "=" with no space, so that it is the
    same token as the assistant's answer ("A", not " A"). The question and the choices are written
    as the dataset has them, spaces included.
    """
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


class MultipleChoiceTask(Task):
    """Conversations whose assistant message is the letter of the right choice."""

    eval_type = "categorical"

    def evaluate(self, conversation: dict, answer: str) -> bool:
        """Right when the answer, stripped of spaces, is the correct letter (any other text is wrong)."""
        if not isinstance(answer, str):
            raise ValueError(f"the answer must be a str (a letter), not {type(answer).__name__}")
        return answer.strip() == last_assistant_text(conversation).strip()


# -----------------------------------------------------------------------------------------------
# GSM8K-style generative tasks: the answer ends with a line "#### <number>"

# How a FinalAnswerTask compares the model's "####" answer with the reference's, and how the
# report card describes each way. "exact" is nanochat's protocol and the default everywhere (eval
# and RL reward); "lenient" is an explicit option whose numbers are not comparable with nanochat's.
ANSWER_MATCHING = {
    "exact": "exact, as nanochat (the text after '#### ', commas dropped: 42.0 is not 42)",
    "lenient": "lenient, not nanochat's (equal numbers match: 42.0, $42 and 42 are one answer)",
}
_EXACT_FINAL_ANSWER = re.compile(r"#### (-?[0-9.,]+)")
_FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?|-?\.[0-9]+)")


def extract_exact_final_answer(text: str) -> str | None:
    """The answer as nanochat reads it: the first "#### " (one space) followed by an optional minus
    and a run of digits, dots and commas; that run with its commas removed, compared as a string
    ("42.0", "42." and "42" are three answers), or None when `text` has no such run."""
    match = _EXACT_FINAL_ANSWER.search(text)
    return None if match is None else match.group(1).replace(",", "")


def extract_final_answer(text: str) -> str | None:
    """The lenient reading: the number after the first "####" of `text` in a canonical form
    ("1,200" and "1200.0" both give "1200"), or None when there is none. The first one counts, so
    that an answer cannot list several numbers and have one of them match."""
    match = _FINAL_ANSWER.search(text)
    if match is None:
        return None
    try:
        value = Decimal(match.group(1).replace(",", ""))
    except InvalidOperation:
        return None
    canonical = format(value.normalize(), "f")
    return "0" if canonical in ("-0", "0") else canonical


def last_assistant_text(conversation: dict) -> str:
    """The text of the conversation's last message, which must be the assistant's; of a list of
    parts, the parts joined (tool calls and outputs included) as the model would have written them."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the conversation must end with the assistant message that holds the "
                         "reference answer; pass the conversation as the task returned it")
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


class FinalAnswerTask(Task):
    """Generative tasks in the GSM8K format: the reference answer and the model's answer are
    compared by the number on their "####" line, read as `answer_matching` says (a key of
    ANSWER_MATCHING; nanochat's "exact" unless asked otherwise). reward() uses the same rule."""

    eval_type = "generative"

    def __init__(self, *, answer_matching: str = "exact", **view):
        if answer_matching not in ANSWER_MATCHING:
            raise ValueError(f"answer_matching={answer_matching!r}: choose one of {', '.join(ANSWER_MATCHING)}")
        super().__init__(**view)
        self.answer_matching = answer_matching

    def evaluate(self, conversation: dict, answer: str) -> bool:
        if not isinstance(answer, str):
            raise ValueError(f"the answer must be the assistant's text (a str), not {type(answer).__name__}")
        extract = extract_exact_final_answer if self.answer_matching == "exact" else extract_final_answer
        reference = extract(last_assistant_text(conversation))
        if reference is None:
            raise ValueError("the conversation's assistant message has no '#### <number>' line; "
                             "it is not an example of this task")
        return extract(answer) == reference


# -----------------------------------------------------------------------------------------------
# Hugging Face parquet files


class DatasetDownloadError(DownloadError):
    """A dataset file could not be downloaded after all retries, or the server refused it."""


def hf_file_url(repo_id: str, path_in_repo: str, base_url: str | None = None) -> str:
    """The download URL of a file of a Hugging Face dataset repository.

    base_url replaces the hub's address (a mirror, or a test server on 127.0.0.1) and must serve
    the hub's paths: <base_url>/datasets/<repo_id>/resolve/main/<path_in_repo>. Without it,
    $HF_ENDPOINT is used when set, else https://huggingface.co.
    """
    endpoint = (base_url or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
    return f"{endpoint}/datasets/{repo_id}/resolve/main/{path_in_repo}"


def task_data_path(repo_id: str, path_in_repo: str) -> str:
    """Where a dataset file is cached: <base>/task_data/<owner>__<name>/<path_in_repo>."""
    return os.path.join(get_base_dir(), TASK_DATA_DIR, repo_id.replace("/", "__"), *path_in_repo.split("/"))


def _parquet_problem(path: str) -> str | None:
    """None when pyarrow can open the file as parquet, else what is wrong with it."""
    try:
        pq.ParquetFile(path).close()
    except (pa.ArrowException, OSError):
        return "not a readable parquet file"
    return None


def download_hf_file(repo_id: str, path_in_repo: str, base_url: str | None = None, *,
                     retries: int = 5, backoff_s: float = 2.0, timeout_s: float = 60.0) -> str:
    """Download one parquet file of a Hugging Face dataset into the cache and return its path.

    A file already cached is not fetched again. Failed attempts are retried `retries` times,
    waiting backoff_s * 2**k seconds; a cut transfer is resumed. HTTP 404 is final and raises
    FileNotFoundError. See hf_file_url for base_url.
    """
    final_path = task_data_path(repo_id, path_in_repo)
    if os.path.exists(final_path):
        return final_path
    url = hf_file_url(repo_id, path_in_repo, base_url)
    print(f"downloading {url}", flush=True)
    try:
        download_file(url, final_path, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s,
                      validate=_parquet_problem, lock=True)
    except DownloadNotFoundError as e:
        raise FileNotFoundError(f"{e}: check the dataset name, split and base URL") from e
    except DownloadGaveUpError as e:
        # The .part stays behind so that the next run resumes it.
        raise DatasetDownloadError(f"{e}; check the network (or set HF_ENDPOINT to a mirror) "
                                   "and run again to resume") from e
    except DownloadError as e:
        raise DatasetDownloadError(str(e)) from e
    print(f"saved {final_path} ({os.path.getsize(final_path) / 1e6:.1f} MB)", flush=True)
    return final_path


class HFParquetTask(Task):
    """A task whose rows come from parquet files of one Hugging Face dataset repository.

    Subclasses name the repository, the files and the columns they need, and turn a row (a dict
    of Python values) into a conversation in `conversation_from_row`. All files are downloaded
    (or found in the cache) and loaded when the task is built; rows are converted one at a time
    when asked for. The rows are shuffled with `shuffle_seed` (None keeps the files' order).
    """

    repo_id: str

    def __init__(self, files: list[str], columns: list[str], *, base_url: str | None = None,
                 shuffle_seed: int | None = 42, **view):
        super().__init__(**view)
        tables = []
        for path_in_repo in files:
            local_path = download_hf_file(self.repo_id, path_in_repo, base_url)
            table = self.prepare_table(pq.read_table(local_path))
            missing = [c for c in columns if c not in table.column_names]
            if missing:
                raise ValueError(f"{local_path} lacks the columns {missing} (it has {table.column_names}): "
                                 f"it is not the {self.repo_id} file {path_in_repo}; delete it and "
                                 "check the base URL")
            tables.append(table.select(columns))
        # One chunk per column, so that looking up a row is an offset, not a search over chunks.
        self.table = pa.concat_tables(tables).combine_chunks()
        order = list(range(self.table.num_rows))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
        self.order = np.asarray(order, dtype=np.int64)

    def prepare_table(self, table: pa.Table) -> pa.Table:
        """A hook for files whose layout needs reshaping before the columns are selected."""
        return table

    @abc.abstractmethod
    def conversation_from_row(self, row: dict) -> dict:
        """The conversation of one row."""

    def num_examples(self) -> int:
        return self.table.num_rows

    def row(self, index: int) -> dict:
        """Row `index` of the shuffled set as a dict of Python values."""
        row_index = int(self.order[index])
        return {name: self.table.column(name)[row_index].as_py() for name in self.table.column_names}

    def get_example(self, index: int) -> dict:
        return self.conversation_from_row(self.row(index))
