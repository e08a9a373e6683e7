"""MMLU: four-choice questions on 57 subjects, from elementary mathematics to professional law
(Hendrycks et al., 2021), and its auxiliary training set of ~100K multiple-choice questions
gathered from other benchmarks (ARC, OBQA, RACE, MCTest), which SFT uses to teach the format.

Source: the parquet files of the Hugging Face dataset cais/mmlu,
  split 'train':      https://huggingface.co/datasets/cais/mmlu/resolve/main/auxiliary_train/train-00000-of-00001.parquet
                      (99,842 rows; its only column, 'train', is a struct holding the fields below)
  split 'test':       https://huggingface.co/datasets/cais/mmlu/resolve/main/all/test-00000-of-00001.parquet (14,042 rows)
  split 'validation': .../all/validation-00000-of-00001.parquet (1,531 rows)
  split 'dev':        .../all/dev-00000-of-00001.parquet (285 rows, 5 per subject, for few-shot prompts)
with the columns question (string), subject (string), choices (list of 4 strings) and answer
(int64, the index of the right choice).
"""

import pyarrow as pa

from nanochat.tasks.common import CHOICE_LETTERS, HFParquetTask, MultipleChoiceTask, render_multiple_choice

SPLIT_FILES = {
    "train": "auxiliary_train/train-00000-of-00001.parquet",
    "test": "all/test-00000-of-00001.parquet",
    "validation": "all/validation-00000-of-00001.parquet",
    "dev": "all/dev-00000-of-00001.parquet",
}
COLUMNS = ["question", "subject", "choices", "answer"]


class MMLU(HFParquetTask, MultipleChoiceTask):
    """MMLU questions as lettered multiple choice; 'train' is the auxiliary training set."""

    repo_id = "cais/mmlu"

    def __init__(self, split: str = "test", **kwargs):
        if split not in SPLIT_FILES:
            raise ValueError(f"MMLU split {split!r} does not exist: choose one of {list(SPLIT_FILES)} "
                             "('train' is the auxiliary training set)")
        self.split = split
        super().__init__([SPLIT_FILES[split]], COLUMNS, **kwargs)

    def prepare_table(self, table: pa.Table) -> pa.Table:
        # The auxiliary training file nests each row in a struct column named 'train'.
        if "train" in table.column_names and "question" not in table.column_names:
            nested = table.column("train")
            return pa.Table.from_arrays(nested.flatten(), names=[field.name for field in nested.type])
        return table

    def conversation_from_row(self, row: dict) -> dict:
        choices = row["choices"]
        letters = list(CHOICE_LETTERS[:len(choices)])
        if not 0 <= row["answer"] < len(choices):
            raise ValueError(f"an MMLU row has answer index {row['answer']} for {len(choices)} choices: "
                             "the cached file is damaged; delete it to download it again")
        return {
            "messages": [
                {"role": "user", "content": render_multiple_choice(row["question"], letters, choices)},
                {"role": "assistant", "content": letters[row["answer"]]},
            ],
            "letters": letters,
            "subject": row["subject"],
        }
