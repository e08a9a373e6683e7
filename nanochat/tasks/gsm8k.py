"""GSM8K: 8.5K grade-school math word problems with worked solutions (OpenAI, 2021).

Source: the parquet files of the Hugging Face dataset openai/gsm8k,
  https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/train-00000-of-00001.parquet (7,473 rows)
  https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet  (1,319 rows)
(and socratic/... for the variant whose solutions ask themselves sub-questions), with the string
columns 'question' and 'answer'.

Each solution marks its arithmetic with calculator annotations and ends with the result:

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.
    #### 24

We turn every <<expression=result>> into a python tool call and its output, the assistant parts
the tokenizer renders as <|python_start|>48/2<|python_end|><|output_start|>24<|output_end|>. The
model is trained to write the call (the calculator evaluates it at run time) and learns nothing
from the output tokens, which the tool supplies. The output is the annotation's, as in nanochat,
so it can differ from what the calculator forces in at run time ("24" here, "24.0" there). An answer is right when the text after its
"#### " equals the reference's, commas aside, as nanochat compares them ("#### 42.0" is wrong
when the reference says 42); `answer_matching="lenient"` compares the numbers instead
(nanochat.tasks.common.ANSWER_MATCHING). The RL reward uses the same rule.
"""

import re

from nanochat.calculator import use_calculator
from nanochat.tasks.common import FinalAnswerTask, HFParquetTask

_ANNOTATION = re.compile(r"<<([^<>]*)>>")
SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")


def assistant_parts_from_solution(solution: str) -> list[dict]:
    """The assistant message parts of a GSM8K-format solution: text, and for each <<expr=result>>
    a {"type": "python"} part with expr and a {"type": "python_output"} part with result."""
    parts = []
    cursor = 0
    for match in _ANNOTATION.finditer(solution):
        if match.start() > cursor:
            parts.append({"type": "text", "text": solution[cursor:match.start()]})
        annotation = match.group(1)
        if "=" in annotation:
            expression, result = annotation.rsplit("=", 1)
        else:
            # A few annotations lack their result; the output is then what the tool would say.
            expression, result = annotation, use_calculator(annotation) or ""
        parts.append({"type": "python", "text": expression.strip()})
        parts.append({"type": "python_output", "text": result.strip()})
        cursor = match.end()
    if cursor < len(solution):
        parts.append({"type": "text", "text": solution[cursor:]})
    return parts


def conversation_from_problem(question: str, solution: str) -> dict:
    """A GSM8K-format problem and solution as a user/assistant conversation."""
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": assistant_parts_from_solution(solution)}]}


class GSM8K(HFParquetTask, FinalAnswerTask):
    """GSM8K problems, split 'train' or 'test', subset 'main' or 'socratic'."""

    repo_id = "openai/gsm8k"

    def __init__(self, split: str = "train", subset: str = "main", **kwargs):
        if subset not in SUBSETS:
            raise ValueError(f"GSM8K subset {subset!r} does not exist: choose one of {SUBSETS}")
        if split not in SPLITS:
            raise ValueError(f"GSM8K split {split!r} does not exist: choose one of {SPLITS}")
        self.split, self.subset = split, subset
        super().__init__([f"{subset}/{split}-00000-of-00001.parquet"], ["question", "answer"], **kwargs)

    def conversation_from_row(self, row: dict) -> dict:
        return conversation_from_problem(row["question"], row["answer"])
