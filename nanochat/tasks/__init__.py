"""Chat tasks: the conversation sets that SFT trains on, RL rewards, and chat evaluation scores.

Every task is a nanochat.tasks.common.Task: sliceable, with an eval_type and evaluate/reward
where it has an answer to check. Jobs build them by name with `get_task(name, split, **kwargs)`,
so that a command line can list tasks as plain strings:

    smoltalk       SmolTalk(split)                 train | test              training conversations
    mmlu           MMLU(split)                     train (auxiliary) | test | validation | dev
    arc-easy       ARC("ARC-Easy", split)          train | validation | test
    arc-challenge  ARC("ARC-Challenge", split)     train | validation | test
    gsm8k          GSM8K(split)                    train | test
    humaneval      HumanEval(split)                test
    spellingbee    SpellingBee(split, size=)       train | test              offline
    arithmetic     Arithmetic(split, size=)        train | test              offline
    identity       Identity(split, size=)          train                     offline
    multiturn      MultiTurn(split, size=)         train | test              offline, chains the three above
    customjson     CustomJSON(filepath=)           train                     a local JSONL file

Extra keyword arguments go to the task: start/stop/step for every task, base_url for the
downloaded sets (a mirror of the Hugging Face hub), size and seed for the generated ones.
"""

from functools import partial

from nanochat.tasks.arc import ARC
from nanochat.tasks.arithmetic import Arithmetic
from nanochat.tasks.common import Task, TaskMixture, TaskSequence
from nanochat.tasks.customjson import CustomJSON
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.identity import Identity
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.multiturn import MultiTurn
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.spellingbee import SpellingBee


def _custom_json(split: str, **kwargs) -> CustomJSON:
    if split != "train":
        raise ValueError(f"customjson conversations are training data: use split 'train', not {split!r}")
    if "filepath" not in kwargs:
        raise ValueError("the customjson task needs filepath=<path of a JSONL file of conversations>")
    return CustomJSON(**kwargs)


TASKS = {
    "smoltalk": SmolTalk,
    "mmlu": MMLU,
    "arc-easy": partial(ARC, "ARC-Easy"),
    "arc-challenge": partial(ARC, "ARC-Challenge"),
    "gsm8k": GSM8K,
    "humaneval": HumanEval,
    "spellingbee": SpellingBee,
    "arithmetic": Arithmetic,
    "identity": Identity,
    "multiturn": MultiTurn,
    "customjson": _custom_json,
}


def get_task(name: str, split: str, **kwargs) -> Task:
    """The task called `name` (one of TASKS) for `split`, built with `kwargs`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name](split=split, **kwargs)


__all__ = ["ARC", "Arithmetic", "CustomJSON", "GSM8K", "HumanEval", "Identity", "MMLU", "MultiTurn", "SmolTalk",
           "SpellingBee", "TASKS", "Task", "TaskMixture", "TaskSequence", "get_task"]
