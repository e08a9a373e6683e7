"""SmolTalk (smol version): general chat conversations that Hugging Face assembled for training
small models (under 1B parameters); the bulk of the SFT mixture.

Source: the parquet files of the Hugging Face dataset HuggingFaceTB/smol-smoltalk,
  split 'train': https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk/resolve/main/data/train-0000{0..3}-of-00004.parquet
                 (about 460K conversations in four files)
  split 'test':  https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk/resolve/main/data/test-00000-of-00001.parquet
                 (about 24K conversations)
with the columns messages (list of structs {content: string, role: string}) and source (string).
A conversation may open with a system message, which the tokenizer folds into the first user turn.
"""

from nanochat.tasks.common import HFParquetTask

SPLIT_FILES = {
    "train": [f"data/train-{index:05d}-of-00004.parquet" for index in range(4)],
    "test": ["data/test-00000-of-00001.parquet"],
}


class SmolTalk(HFParquetTask):
    """smol-smoltalk conversations; training data only (no evaluation rule)."""

    repo_id = "HuggingFaceTB/smol-smoltalk"

    def __init__(self, split: str = "train", **kwargs):
        if split not in SPLIT_FILES:
            raise ValueError(f"SmolTalk split {split!r} does not exist: choose one of {list(SPLIT_FILES)}")
        self.split = split
        super().__init__(SPLIT_FILES[split], ["messages"], **kwargs)

    def conversation_from_row(self, row: dict) -> dict:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
