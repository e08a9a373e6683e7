"""HumanEval: 164 Python functions to complete from their signature and docstring, each checked by
hidden unit tests (Chen et al., 2021). Despite the name, it is a coding benchmark.

Source: the parquet file of the Hugging Face dataset openai/openai_humaneval,
  https://huggingface.co/datasets/openai/openai_humaneval/resolve/main/openai_humaneval/test-00000-of-00001.parquet
with the string columns task_id, prompt (imports, signature and docstring), canonical_solution
(the body), test (a `check(candidate)` function of asserts) and entry_point (the function's name).

The user message is the prompt; the reference answer is the whole function. An answer is scored
by running it with the tests in the sandbox of nanochat.execution: the prompt, then the code of
the answer (the first fenced code block when there is one), then the tests and
check(<entry point>). Right means the program ran to the end. With require_sandbox=True an
answer is only run where every kernel layer of the sandbox holds (SandboxUnavailableError
otherwise).
"""

import re

from nanochat.execution import execute_code
from nanochat.tasks.common import HFParquetTask

_FENCED_CODE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
COLUMNS = ["task_id", "prompt", "canonical_solution", "test", "entry_point"]


def code_of_answer(answer: str) -> str:
    """The first fenced code block of a chat answer, or the whole answer when it has none."""
    match = _FENCED_CODE.search(answer)
    return match.group(1) if match else answer


def program_for_answer(conversation: dict, answer: str) -> str:
    """The program that passes when `answer` solves the conversation's HumanEval problem.

    The answer's code comes after the whole prompt. That one layout serves both kinds of
    answer: a full function replaces the prompt's unfinished one (a def whose body is only its
    docstring is valid Python) and can use the prompt's imports and helper functions, while a
    bare body continues the prompt's function where it stops.
    """
    prompt = conversation["messages"][0]["content"]
    if not prompt.endswith("\n"):
        prompt += "\n"
    return (f"{prompt}{code_of_answer(answer)}\n\n{conversation['test']}\n\n"
            f"check({conversation['entry_point']})\n")


class HumanEval(HFParquetTask):
    """HumanEval problems, scored by running their unit tests in the sandbox."""

    repo_id = "openai/openai_humaneval"
    eval_type = "generative"

    def __init__(self, split: str = "test", timeout_s: float = 10.0, require_sandbox: bool = False,
                 **kwargs):
        if split != "test":
            raise ValueError(f"HumanEval has only the split 'test', not {split!r}")
        self.split = split
        self.timeout_s = timeout_s
        self.require_sandbox = require_sandbox
        super().__init__(["openai_humaneval/test-00000-of-00001.parquet"], COLUMNS, **kwargs)

    def conversation_from_row(self, row: dict) -> dict:
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation: dict, answer: str) -> bool:
        if not isinstance(answer, str):
            raise ValueError(f"the answer must be the assistant's text (a str), not {type(answer).__name__}")
        return execute_code(program_for_answer(conversation, answer), timeout=self.timeout_s,
                            require_sandbox=self.require_sandbox).success
