"""CustomJSON: conversations of your own from a JSONL file, one conversation per line.

A line is either a JSON list of messages or an object with a "messages" list:

    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, ...]}

after an optional system message, the roles alternate user, assistant, user, ... and the last
message is the assistant's. Contents are strings; an assistant's may also be a list of parts
{"type": "text" | "python" | "python_output", "text": ...}, the form the tokenizer renders.
Blank lines are skipped. The whole file is checked when the task is built, and every bad line is
reported at once with its line number, so a file can be fixed in one pass.
"""

import json
import os

from nanochat.tasks.common import Task
from nanochat.tokenizer import ASSISTANT_PART_TYPES

_MAX_REPORTED_PROBLEMS = 20


class CustomJSONError(ValueError):
    """A JSONL file of conversations has malformed lines; `problems` lists (line number, reason)."""

    def __init__(self, path: str, problems: list[tuple[int, str]]):
        self.path, self.problems = path, problems
        shown = "\n".join(f"  line {number}: {reason}" for number, reason in problems[:_MAX_REPORTED_PROBLEMS])
        more = len(problems) - _MAX_REPORTED_PROBLEMS
        super().__init__(f"{path} has {len(problems)} malformed line(s):\n{shown}"
                         + (f"\n  ... and {more} more" if more > 0 else "")
                         + "\nEach line must be a JSON list of messages (or {\"messages\": [...]}) with "
                         "roles alternating user, assistant, ... and ending with the assistant.")


def _part_problem(part) -> str | None:
    if not isinstance(part, dict) or part.get("type") not in ASSISTANT_PART_TYPES \
            or not isinstance(part.get("text"), str):
        return f"an assistant part must be {{\"type\": one of {list(ASSISTANT_PART_TYPES)}, \"text\": str}}"
    return None


def conversation_problem(messages) -> str | None:
    """Why `messages` is not a valid conversation, or None when it is."""
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty list of messages"
    turns = messages[1:] if isinstance(messages[0], dict) and messages[0].get("role") == "system" else messages
    if len(turns) < 2:
        return "a conversation needs at least a user message and an assistant reply"
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {position} must be an object with the keys 'role' and 'content'"
    if messages[0]["role"] == "system" and not isinstance(messages[0]["content"], str):
        return "the system message's content must be a string"
    offset = len(messages) - len(turns)
    for turn, message in enumerate(turns):
        expected = "user" if turn % 2 == 0 else "assistant"
        if message["role"] != expected:
            return (f"message {turn + offset} has role {message['role']!r} where {expected!r} is expected "
                    "(roles alternate user, assistant after an optional system message)")
        content = message["content"]
        if isinstance(content, str):
            continue
        if expected == "assistant" and isinstance(content, list) and content:
            problem = next((p for p in map(_part_problem, content) if p), None)
            if problem:
                return f"message {turn + offset}: {problem}"
            continue
        return f"message {turn + offset} has content of type {type(content).__name__}; it must be a string"
    if turns[-1]["role"] != "assistant":
        return "the last message must be the assistant's"
    return None


class CustomJSON(Task):
    """The conversations of a JSONL file, in file order; training data only."""

    def __init__(self, filepath: str, **view):
        super().__init__(**view)
        if not os.path.isfile(filepath):
            raise FileNotFoundError(f"no conversations file at {filepath}: pass the path of a JSONL "
                                    "file with one conversation per line")
        self.filepath = filepath
        self.conversations = []
        problems = []
        with open(filepath, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append((number, f"not valid JSON ({e.msg} at column {e.colno})"))
                    continue
                messages = record.get("messages") if isinstance(record, dict) else record
                problem = conversation_problem(messages)
                if problem:
                    problems.append((number, problem))
                else:
                    self.conversations.append({"messages": messages})
        if problems:
            raise CustomJSONError(filepath, problems)
        if not self.conversations:
            raise ValueError(f"{filepath} holds no conversations; add one JSON conversation per line")

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]
