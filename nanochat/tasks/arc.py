"""ARC, the AI2 Reasoning Challenge: grade-school science questions with 3 to 5 choices (Clark et
al., 2018), in an Easy set and a Challenge set of the questions that simple retrieval and word
co-occurrence methods got wrong.

Source: the parquet files of the Hugging Face dataset allenai/ai2_arc,
  https://huggingface.co/datasets/allenai/ai2_arc/resolve/main/<subset>/<split>-00000-of-00001.parquet
  subset ARC-Easy:      train 2,251 rows, validation 570, test 2,376
  subset ARC-Challenge: train 1,119 rows, validation 299, test 1,172
with the columns id (string), question (string), choices (struct of 'text' and 'label', two lists
of strings) and answerKey (string, one of the labels).

Most questions are labelled A-D, a few 1-4 (and a few have 3 or 5 choices). As in nanochat, every
question keeps its own labels: they are the letters the prompt shows after each choice
(nanochat.tasks.common.render_multiple_choice), the answer is the answer key, and the evaluator
restricts the model to them, so a question labelled 1-4 is answered with a digit.
"""

from nanochat.tasks.common import HFParquetTask, MultipleChoiceTask, render_multiple_choice

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(HFParquetTask, MultipleChoiceTask):
    """ARC questions of one subset ('ARC-Easy' or 'ARC-Challenge') and split."""

    repo_id = "allenai/ai2_arc"

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", **kwargs):
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset {subset!r} does not exist: choose one of {SUBSETS}")
        if split not in SPLITS:
            raise ValueError(f"ARC split {split!r} does not exist: choose one of {SPLITS}")
        self.subset, self.split = subset, split
        super().__init__([f"{subset}/{split}-00000-of-00001.parquet"],
                         ["id", "question", "choices", "answerKey"], **kwargs)

    def conversation_from_row(self, row: dict) -> dict:
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        if row["answerKey"] not in labels or len(set(labels)) != len(labels):
            raise ValueError(f"ARC question {row['id']} has answer key {row['answerKey']!r} and labels "
                             f"{labels}: the cached file is damaged; delete it to download it again")
        return {
            "messages": [
                {"role": "user", "content": render_multiple_choice(row["question"], labels, texts)},
                {"role": "assistant", "content": row["answerKey"]},
            ],
            "letters": list(labels),
        }
