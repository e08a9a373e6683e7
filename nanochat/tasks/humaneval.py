"""HumanEval: 164 Python functions to complete from their signature and docstring, each checked by
hidden unit tests (Chen et al., 2021). Despite the name, it is a coding benchmark.

Source: the parquet file of the Hugging Face dataset openai/openai_humaneval,
  https://huggingface.co/datasets/openai/openai_humaneval/resolve/main/openai_humaneval/test-00000-of-00001.parquet
with the string columns task_id, prompt (imports, signature and docstring), canonical_solution
(the body), test (a `check(candidate)` function of asserts) and entry_point (the function's name).

The user message is the prompt; the reference answer is the whole function. An answer is scored
by running a program built from it in the sandbox of nanochat.execution, in one of two harnesses
(HUMANEVAL_HARNESSES; the report card says which one produced a score):

- "nanochat" (the default, nanochat's protocol): the import lines at the top of the prompt, the
  answer's code (the first ```/```python block, else the whole answer, stripped), the tests and
  check(<entry point>). The answer must be a whole function: the prompt's helper functions and
  its unfinished def are not in the program, so a bare function body fails.
- "lenient" (not nanochat's): the whole prompt, then the answer's code, the tests and the check.
  A full function replaces the prompt's unfinished one and may use its helpers, and a bare body
  continues the prompt's function, so some answers pass that fail under nanochat's harness.

Right means the program ran to the end within nanochat's limits: `timeout_s` (5 s by default; the
sandbox's interpreter starts in about 0.05 s of it) and 256 MB. With require_sandbox=True an answer
is only run where every kernel layer of the sandbox holds (SandboxUnavailableError otherwise).
"""

import re

from nanochat.execution import execute_code
from nanochat.tasks.common import HFParquetTask

# How an answer becomes the program that is run, and how the report card describes each way.
HUMANEVAL_HARNESSES = {
    "nanochat": "nanochat's (the prompt's imports, the answer's code, the tests)",
    "lenient": "lenient, not nanochat's (the whole prompt with its helpers, then the answer's code and the "
               "tests: a bare function body passes)",
}
# nanochat's reading of a code block: ``` or ```python, then a newline, the code, a newline and ```.
_NANOCHAT_CODE_BLOCK = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)
_FENCED_CODE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
COLUMNS = ["task_id", "prompt", "canonical_solution", "test", "entry_point"]


def code_of_answer(answer: str) -> str:
    """The lenient reading: the first fenced code block of a chat answer (```py and a closing fence
    on the code's last line accepted), or the whole answer when it has none."""
    match = _FENCED_CODE.search(answer)
    return match.group(1) if match else answer


def prompt_imports(prompt: str) -> str:
    """The import lines at the top of a prompt, as nanochat collects them: each line stripped, up
    to the first line that is neither blank, a comment nor an import ("import ..."/"from ...")."""
    imports = []
    for line in prompt.split("\n"):
        line = line.strip()
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(imports)


def nanochat_program(conversation: dict, answer: str) -> str:
    """nanochat's program for an answer: the prompt's imports, the answer's code (its first code
    block, else the whole answer; stripped), the tests and the check of the entry point."""
    match = _NANOCHAT_CODE_BLOCK.search(answer)
    code = (match.group(1) if match else answer).strip()
    return (f"{prompt_imports(conversation['messages'][0]['content'])}\n\n{code}\n\n"
            f"{conversation['test']}\ncheck({conversation['entry_point']})")


def lenient_program(conversation: dict, answer: str) -> str:
    """The lenient program: the answer's code after the whole prompt. A full function replaces the
    prompt's unfinished one (a def whose body is only its docstring is valid Python) and can use the
    prompt's imports and helper functions, while a bare body continues the prompt's function."""
    prompt = conversation["messages"][0]["content"]
    if not prompt.endswith("\n"):
        prompt += "\n"
    return (f"{prompt}{code_of_answer(answer)}\n\n{conversation['test']}\n\n"
            f"check({conversation['entry_point']})\n")


_PROGRAM_BUILDERS = {"nanochat": nanochat_program, "lenient": lenient_program}


class HumanEval(HFParquetTask):
    """HumanEval problems, scored by running their unit tests in the sandbox, in the harness
    `harness` (a key of HUMANEVAL_HARNESSES; nanochat's unless asked otherwise)."""

    repo_id = "openai/openai_humaneval"
    eval_type = "generative"

    def __init__(self, split: str = "test", timeout_s: float = 5.0, require_sandbox: bool = False,
                 harness: str = "nanochat", **kwargs):
        if split != "test":
            raise ValueError(f"HumanEval has only the split 'test', not {split!r}")
        if harness not in HUMANEVAL_HARNESSES:
            raise ValueError(f"harness={harness!r}: choose one of {', '.join(HUMANEVAL_HARNESSES)}")
        self.split = split
        self.timeout_s = timeout_s
        self.require_sandbox = require_sandbox
        self.harness = harness
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
        program = _PROGRAM_BUILDERS[self.harness](conversation, answer)
        return execute_code(program, timeout=self.timeout_s, require_sandbox=self.require_sandbox).success
