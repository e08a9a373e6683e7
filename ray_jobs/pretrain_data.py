"""The pretraining data stream on Ray Data: parquet shards -> tokenized documents -> best-fit
packed rows of T+1 tokens, streamed into the Ray Train workers.

    read_parquet(columns=['text'])        streaming, one row group at a time, never the whole set
      -> map_batches(tokenize_documents)  CPU tasks: BOS + tokens per document, parallel over the cluster
      -> map_batches(PackRows)            stateful actor holding the best-fit buffer (nanochat.packing)
      -> {'tokens': int32 (T+1,), 'file_index': int}   one packed row per record

Every row starts with BOS, has exactly T+1 tokens and no padding. Each document lands in at most
one row (the part of a cropped document that does not fit is dropped, as the seed does), and a
row goes to exactly one worker (`streaming_split`), so within an epoch a document reaches at most
one worker.

Resume: rows carry the index of the shard they came from. A checkpoint records the shard the
slowest worker had reached; a resumed run starts its stream at that shard (the file list is
rotated, so every epoch still covers every shard once). At most the shard in progress (and what
the packer buffered) is seen again; nothing is skipped.

The order of rows is deterministic (Ray Data's preserve_order), so the same flags give the same
stream, and the validation stream is the same on every run.
"""

import functools
import time

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.extensions import ArrowTensorArray

from nanochat.dataset import resolve_source
from nanochat.packing import BestFitPacker
from nanochat.tokenizer import Tokenizer

TEXT_COLUMN = "text"


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_dir: str) -> Tokenizer:
    """One tokenizer per worker process, loaded on first use (tasks reuse their processes)."""
    return Tokenizer.from_directory(tokenizer_dir)


def tokenize_documents(batch: pa.Table, tokenizer_dir: str, file_indices: dict[str, int]) -> pa.Table:
    """map_batches function (Ray tasks): text -> token ids with BOS prepended, plus shard index."""
    tokenizer = _tokenizer(tokenizer_dir)
    ids = tokenizer.encode(batch.column(TEXT_COLUMN).to_pylist(), prepend=tokenizer.get_bos_token_id(),
                           num_threads=1)
    file_index = [file_indices[_normalise(p)] for p in batch.column("path").to_pylist()]
    return pa.table({"ids": pa.array(ids, type=pa.list_(pa.int32())),
                     "file_index": pa.array(file_index, type=pa.int32())})


def _normalise(path: str) -> str:
    """Ray Data reports paths without a local filesystem's leading slash variations."""
    return path.lstrip("/")


class PackRows:
    """Stateful map_batches actor: keeps the best-fit buffer between batches and emits full rows.

    Rows are packed only while at least `buffer_docs` documents are buffered, so every best-fit
    choice has enough candidates; what is still buffered when the stream ends is dropped. A row is
    labelled with the shard of the newest document read when it was packed: the position a resumed
    run restarts from (the buffer may still hold up to `buffer_docs` older documents, which a
    resume skips, and the shard in progress is read again)."""

    def __init__(self, sequence_len: int, bos_id: int, buffer_docs: int, log_every_rows: int = 0):
        self.packer = BestFitPacker(sequence_len, bos_id, min_buffer_docs=buffer_docs)
        self.log_every_rows = log_every_rows
        self.rows_out = 0
        self.started = time.perf_counter()

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.packer.add(batch.column("ids").to_numpy(zero_copy_only=False))
        rows = self.packer.pop_rows()
        newest_file = batch.column("file_index")[-1].as_py() if batch.num_rows else 0
        self._maybe_log(len(rows))
        # An explicit tensor column: Ray's automatic conversion gives up on empty (0, T+1) batches.
        return pa.table({"tokens": ArrowTensorArray.from_numpy(rows),
                         "file_index": pa.array(np.full(len(rows), newest_file, dtype=np.int32))})

    def _maybe_log(self, new_rows: int) -> None:
        before, self.rows_out = self.rows_out, self.rows_out + new_rows
        if self.log_every_rows and before // self.log_every_rows != self.rows_out // self.log_every_rows:
            seconds = time.perf_counter() - self.started
            tokens = self.packer.tokens_emitted
            print(f"packer: {self.rows_out} rows, {tokens / seconds:,.0f} tokens/s, "
                  f"crop fraction {self.packer.crop_fraction:.3f}", flush=True)


def packed_dataset(files: list[str], tokenizer_dir: str, sequence_len: int, buffer_docs: int = 1000,
                   file_indices: dict[str, int] | None = None, read_concurrency: int | None = None,
                   tokenize_concurrency: int | None = None, packers: int = 1,
                   log_every_rows: int = 1000) -> ray.data.Dataset:
    """A Ray Dataset of packed rows over `files` (in this order)."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    file_indices = file_indices or {_normalise(path): i for i, path in enumerate(files)}
    bos_id = _tokenizer(tokenizer_dir).get_bos_token_id()
    # Fractional CPUs: on a CPU-only machine the train workers hold most CPUs, and a stage that
    # asked for a whole one (the packer actor holds its CPU for the whole epoch) could starve the rest.
    ds = ray.data.read_parquet(files, columns=[TEXT_COLUMN], include_paths=True, shuffle=None,
                               concurrency=read_concurrency, ray_remote_args={"num_cpus": 0.25})
    ds = ds.map_batches(tokenize_documents, fn_kwargs={"tokenizer_dir": tokenizer_dir, "file_indices": file_indices},
                        batch_format="pyarrow", batch_size=256, concurrency=tokenize_concurrency, num_cpus=0.5)
    ds = ds.map_batches(PackRows, fn_constructor_args=(sequence_len, bos_id, buffer_docs, log_every_rows),
                        batch_format="pyarrow", batch_size=256, concurrency=packers, num_cpus=0.25)
    return ds


def build_datasets(source: str, tokenizer_dir: str, sequence_len: int, data_dir: str | None = None,
                   buffer_docs: int = 1000, start_file: int = 0) -> tuple[dict[str, ray.data.Dataset], dict]:
    """{'train': ..., 'val': ...} for the trainer, and a description of the stream
    ({'num_train_files', 'start_file'}) that the workers use to track their position."""
    shards = resolve_source(source, data_dir)
    train_files = shards.train_files
    start_file = start_file % len(train_files)
    rotated = train_files[start_file:] + train_files[:start_file]
    indices = {_normalise(path): i for i, path in enumerate(train_files)}
    datasets = {
        "train": packed_dataset(rotated, tokenizer_dir, sequence_len, buffer_docs, file_indices=indices),
        "val": packed_dataset(shards.val_files, tokenizer_dir, sequence_len, buffer_docs),
    }
    return datasets, {"num_train_files": len(train_files), "start_file": start_file}
