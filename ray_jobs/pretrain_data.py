"""The pretraining data stream on Ray Data: parquet shards -> tokenized documents -> best-fit
packed rows of T+1 tokens, one lane of the stream per Ray Train worker.

    read_datasource(ParquetRowGroupDatasource)  this lane's read tasks, ~4 MB of row groups each, in file order
      -> map_batches(tokenize_documents)  CPU tasks: BOS + tokens per document, parallel over the cluster
      -> map_batches(PackRows)            the lane's own stateful actor holding a best-fit buffer (nanochat.packing)
      -> {'tokens': int32 (T+1,), 'file_index': int32, 'stream_start': int32}   one packed row per record

Why not ray.data.read_parquet: in Ray 2.60 it packs small files into one read task (the whole
30 MB sample came out as a single block, so nothing streamed and no tokenizing ran in parallel),
its file partitioner may emit files out of the given order, and its file listing task asks for a
whole CPU. Read tasks over consecutive row groups of one file (at least READ_TASK_BYTES of text
each, so a tiny row group does not cost a task of its own; one row group, about 1000 documents, in
the Hugging Face sets) stream in small units, keep the file order exactly, and need a quarter of a
CPU. A read task is also the unit of tokenizing and packing (batch_size=None).

Lanes: the read units of the stream, in file order, are dealt round-robin to `num_lanes` lanes
(unit u goes to lane u % num_lanes), and each lane is a dataset of its own with its own packer
actor; base_train gives worker r lane r. Packing is sequential by nature (one best-fit buffer,
rows in the order of the documents), so a single packer for the whole cluster would make every
GPU wait on one Python process: one packer made about 9,000 rows of 2049 tokens (19 M tokens) per
second in bench_data's packing-only run here, what several 8-GPU nodes training a small model
consume. With a packer per lane the packing capacity grows with the workers, and the deal
depends only on the file list and the number of lanes, so the same flags give the same rows to
the same worker on every run.

Every row starts with BOS, has exactly T+1 tokens and no padding. A document lands in at most one
row (the part of a cropped document that does not fit is dropped, as the seed does), and a read
unit belongs to exactly one lane, so within an epoch a document reaches at most one worker. Each
epoch re-runs a lane over the same units in the same order; lanes hold slightly different
amounts of text, so their epochs end at different steps.

End of stream: Ray Data gives a map_batches actor no end-of-input call, so the packer is told how
many documents its lane holds (from the parquet footers, read on the driver) and drains its
buffer when it has seen them all: per lane and epoch only the last partial row (< T+1 tokens) is
lost, instead of the whole buffer (buffer_docs documents, which for a small validation shard can
be all of it). A packer that Ray restarted would have lost its buffer and its count, so the
packer actors are never restarted (max_restarts=0): a lost packer fails its worker's stream, and
Ray Train restarts the worker group from the newest checkpoint, whose position is exact.

Resume: a row carries the index of the shard its newest document came from, and the index of
the shard its stream started at (so a worker can place the row in the stream's file order). A
checkpoint records the position of the slowest worker (the smallest epoch and shard offset); a
resumed run starts every lane at that shard (the file list is rotated, so every epoch still
covers every shard once), and so does a run that Ray Train restarts after a worker failure
(base_train passes the trainer factories of the lanes, which Ray Train calls at every start of
the worker group, not the datasets themselves, which it would read again from the run's first
shard). What a resume or a restart repeats: the shards from the slowest worker's to the fastest
worker's, in part (the lanes move through neighbouring units in step, so about one shard per
worker at most). What it skips until the next epoch: the documents the packers had buffered but
not yet emitted when the checkpoint was taken (at most buffer_docs documents per lane, in
practice mostly long ones, which best-fit places last).

Order is deterministic (Ray Data's preserve_order, set on the driver's DataContext because Ray
Train takes its ingest options from there), so the same flags give the same stream and the
validation stream is the same on every build.
"""

import functools
import time
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.data.extensions import ArrowTensorArray

from nanochat.dataset import TEXT_COLUMN, resolve_source
from nanochat.packing import DEFAULT_MIN_BUFFER_DOCS, BestFitPacker
from nanochat.tokenizer import Tokenizer

# Fractional CPUs: on a CPU-only machine the train workers hold most logical CPUs, and a stage that
# asked for a whole one (the packer actor holds its share for the whole epoch) would starve the rest.
READ_CPUS = 0.25
TOKENIZE_CPUS = 0.5
PACK_CPUS = 0.25
LOG_EVERY_ROWS = 1000
# The packer takes documents into its buffer in groups of this many, counted over the stream (the
# reference loader refills its buffer with tokenizer batches of 128).
PACK_GROUP_DOCS = 128
# Uncompressed text per read task: enough work to hide a task's overhead, small enough to stream.
READ_TASK_BYTES = 4 << 20


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_dir: str) -> Tokenizer:
    """One tokenizer per worker process, loaded on first use (tasks reuse their processes)."""
    return Tokenizer.from_directory(tokenizer_dir)


def read_row_groups(path: str, row_groups: list[int], file_index: int) -> Iterable[pa.Table]:
    """A read task's work: the texts of some row groups of one file, labelled with its shard's index."""
    texts = pq.ParquetFile(path).read_row_groups(row_groups, columns=[TEXT_COLUMN]).column(TEXT_COLUMN)
    return [pa.table({TEXT_COLUMN: texts, "file_index": pa.array(np.full(len(texts), file_index, dtype=np.int32))})]


class ParquetRowGroupDatasource(Datasource):
    """The 'text' column of parquet files, read in the order given, a few row groups per task.

    Only the footers are read on the driver: they say how many row groups and documents there are.
    Consecutive row groups of a file share a read task until it holds READ_TASK_BYTES of text.
    With num_lanes > 1 only the units of one lane are read: every num_lanes-th unit, from the
    lane-th (see the module's note on lanes)."""

    def __init__(self, files: list[str], file_indices: list[int], read_task_bytes: int = READ_TASK_BYTES,
                 lane: int = 0, num_lanes: int = 1):
        super().__init__()
        if not 0 <= lane < num_lanes:
            raise ValueError(f"lane {lane} does not exist: the stream has lanes 0 to {num_lanes - 1}")
        self.units = []  # (path, row groups, file index, documents, uncompressed bytes)
        for path, file_index in zip(files, file_indices, strict=True):
            metadata = pq.read_metadata(path)
            names = metadata.schema.to_arrow_schema().names
            if TEXT_COLUMN not in names:
                raise ValueError(f"{path} has no '{TEXT_COLUMN}' column (its columns: {names}); pretraining "
                                 f"shards need the documents in a string column named '{TEXT_COLUMN}'")
            groups, rows, size = [], 0, 0
            for row_group in range(metadata.num_row_groups):
                groups.append(row_group)
                rows += metadata.row_group(row_group).num_rows
                size += metadata.row_group(row_group).total_byte_size
                if size >= read_task_bytes or row_group == metadata.num_row_groups - 1:
                    self.units.append((path, groups, file_index, rows, size))
                    groups, rows, size = [], 0, 0
        if len(self.units) < num_lanes:
            raise ValueError(f"the {len(files)} file(s) make {len(self.units)} read unit(s) of up to "
                             f"{read_task_bytes / 2**20:.0f} MB of text, fewer than the {num_lanes} workers that "
                             "each need a lane of their own: use fewer workers, or more (or smaller) row groups")
        self.units = self.units[lane::num_lanes]

    @property
    def num_documents(self) -> int:
        return sum(unit[3] for unit in self.units)

    def estimate_inmemory_data_size(self) -> int:
        return sum(unit[4] for unit in self.units)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # One task per unit whatever parallelism Ray suggests: the units are what streams, in order.
        return [ReadTask(functools.partial(read_row_groups, path, row_groups, file_index),
                         BlockMetadata(num_rows=rows, size_bytes=size, exec_stats=None, input_files=[path]))
                for path, row_groups, file_index, rows, size in self.units]


def tokenize_documents(batch: pa.Table, tokenizer_dir: str) -> pa.Table:
    """map_batches function (Ray tasks): text -> token ids with BOS prepended; keeps the shard index."""
    tokenizer = _tokenizer(tokenizer_dir)
    # One thread: the task is given half a CPU, and parallelism comes from running many tasks.
    ids = tokenizer.encode(batch.column(TEXT_COLUMN).to_pylist(), prepend=tokenizer.get_bos_token_id(),
                           num_threads=1)
    return pa.table({"ids": pa.array(ids, type=pa.list_(pa.int32())), "file_index": batch.column("file_index")})


class PackRows:
    """Stateful map_batches actor: keeps the best-fit buffer between batches and emits full rows.

    Documents join the buffer in groups of `group_docs`, counted over the whole stream, and after
    each group rows are made while at least `buffer_docs` documents are buffered, so every
    best-fit choice has enough candidates. Counting the groups over the stream, not taking Ray's
    batches as they come, makes the rows depend only on the order of the documents: how Ray Data
    bundles blocks into batches varies with timing. (Adding documents one at a time would do too,
    but then the buffer holds little besides the long documents best-fit leaves for last: on the
    sample at T=256 cropping took 0.52 of the tokens, against 0.38 in groups of 128.)

    When the last of the stream's `documents_in_stream` documents has arrived, the buffer is
    drained and a summary logged under `name`. A row is labelled with the shard of the newest
    document read when it was packed and with `stream_start`, the shard the stream started at
    (see the module's note on resume). Every `log_every_rows` rows (0 = only at the end) a line reports
    the crop fraction and the tokens/s the pipeline has delivered. The clock starts when the
    actor is made, which is when the pipeline starts: a rate timed from the first batch would
    count only the packer, because the stages before it run ahead while the actor starts up.
    """

    def __init__(self, sequence_len: int, bos_id: int, buffer_docs: int, documents_in_stream: int,
                 log_every_rows: int = LOG_EVERY_ROWS, group_docs: int = PACK_GROUP_DOCS, stream_start: int = 0,
                 name: str = "packer"):
        self.stream_start = stream_start
        self.name = name
        self.packer = BestFitPacker(sequence_len, bos_id, min_buffer_docs=buffer_docs)
        self.group_docs = group_docs
        self.group: list[np.ndarray] = []  # documents received, not yet in the packer's buffer
        self.documents_in_stream = documents_in_stream
        self.log_every_rows = log_every_rows
        self.documents_read = 0
        self.rows_out = 0
        self.started = time.perf_counter()

    def __call__(self, batch: pa.Table) -> pa.Table:
        made = [np.empty((0, self.packer.row_capacity), dtype=np.int32)]
        for doc in batch.column("ids").to_numpy(zero_copy_only=False):
            self.group.append(doc)
            if len(self.group) == self.group_docs:
                made.append(self._add_group())
        self.documents_read += batch.num_rows
        end_of_stream = self.documents_read >= self.documents_in_stream
        if end_of_stream:
            made.append(self._add_group(drain=True))
        rows = np.concatenate(made)
        newest_file = batch.column("file_index")[-1].as_py() if batch.num_rows else 0
        before, self.rows_out = self.rows_out, self.rows_out + len(rows)
        if end_of_stream:
            print(self.log_line("end of stream"), flush=True)
        elif self.log_every_rows and before // self.log_every_rows != self.rows_out // self.log_every_rows:
            print(self.log_line(), flush=True)
        # An explicit tensor column: Ray's automatic conversion gives up on empty (0, T+1) batches.
        return pa.table({"tokens": ArrowTensorArray.from_numpy(rows),
                         "file_index": pa.array(np.full(len(rows), newest_file, dtype=np.int32)),
                         "stream_start": pa.array(np.full(len(rows), self.stream_start, dtype=np.int32))})

    def _add_group(self, drain: bool = False) -> np.ndarray:
        self.packer.add(self.group)
        self.group = []
        return self.packer.pop_rows(drain=drain)

    def stats(self) -> dict:
        """Progress of this stream: documents and tokens in, rows and tokens out, crop fraction, rate."""
        seconds = time.perf_counter() - self.started
        return {"documents": self.documents_read, "rows": self.rows_out,
                "tokens_read": self.packer.tokens_read, "tokens_emitted": self.packer.tokens_emitted,
                "tokens_cropped": self.packer.tokens_cropped, "crop_fraction": self.packer.crop_fraction,
                "tokens_per_second": self.packer.tokens_emitted / seconds if seconds > 0 else 0.0}

    def log_line(self, label: str = "") -> str:
        s = self.stats()
        return (f"{self.name}{' ' + label if label else ''}: "
                f"{s['documents']:,}/{self.documents_in_stream:,} documents, "
                f"{s['rows']:,} rows, {s['tokens_per_second']:,.0f} tokens/s, "
                f"crop fraction {s['crop_fraction']:.4f}")


def packed_dataset(files: list[str], tokenizer_dir: str, sequence_len: int,
                   buffer_docs: int = DEFAULT_MIN_BUFFER_DOCS, file_indices: list[int] | None = None,
                   log_every_rows: int = LOG_EVERY_ROWS, lane: int = 0, num_lanes: int = 1) -> ray.data.Dataset:
    """A Ray Dataset of packed rows over `files`, read in this order (with num_lanes > 1, over the
    read units of one lane only). file_indices gives the index each file's rows are labelled with
    (default: its position in `files`); the first file's index labels every row as the stream's
    start."""
    if not files:
        raise ValueError("no parquet files to read: the split is empty")
    if sequence_len <= 0:
        raise ValueError(f"sequence_len must be a positive number of tokens, not {sequence_len}")
    if buffer_docs <= 0:
        raise ValueError(f"buffer_docs must be a positive number of documents, not {buffer_docs}")
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    file_indices = list(range(len(files))) if file_indices is None else file_indices
    source = ParquetRowGroupDatasource(files, file_indices, lane=lane, num_lanes=num_lanes)
    bos_id = _tokenizer(tokenizer_dir).get_bos_token_id()
    ds = ray.data.read_datasource(source, num_cpus=READ_CPUS, override_num_blocks=len(source.units))
    # batch_size=None: one call per read task's block, the unit of tokenizing and packing too.
    ds = ds.map_batches(tokenize_documents, fn_kwargs={"tokenizer_dir": tokenizer_dir}, batch_format="pyarrow",
                        batch_size=None, num_cpus=TOKENIZE_CPUS)
    return pack_stage(ds, sequence_len, bos_id, buffer_docs, source.num_documents, stream_start=file_indices[0],
                      name=f"packer lane {lane}/{num_lanes}" if num_lanes > 1 else "packer",
                      log_every_rows=log_every_rows)


def pack_stage(tokenized: ray.data.Dataset, sequence_len: int, bos_id: int, buffer_docs: int, documents: int,
               stream_start: int = 0, name: str = "packer", log_every_rows: int = LOG_EVERY_ROWS) -> ray.data.Dataset:
    """The packing stage over a dataset of tokenized documents ({'ids', 'file_index'}, `documents`
    of them): one PackRows actor, never restarted (a restarted packer would go on without its
    buffer and its document count; see the module's note on the end of stream), that runs its
    calls in the order of the blocks. Ray Data lets an actor run a later call first when an
    earlier one's input is not ready (allow_out_of_order_execution, on by default in 2.60); its
    output order stays right, but a stateful packer would then pack the documents in another
    order, and the same flags would give different rows now and then."""
    return tokenized.map_batches(PackRows, batch_format="pyarrow", batch_size=None, num_cpus=PACK_CPUS,
                                 fn_constructor_args=(sequence_len, bos_id, buffer_docs, documents, log_every_rows,
                                                      PACK_GROUP_DOCS, stream_start, name),
                                 compute=ray.data.ActorPoolStrategy(size=1), max_restarts=0,
                                 allow_out_of_order_execution=False)


def train_dataset(source: str, tokenizer_dir: str, sequence_len: int, data_dir: str | None = None,
                  buffer_docs: int = DEFAULT_MIN_BUFFER_DOCS, start_file: int = 0, lane: int = 0,
                  num_lanes: int = 1) -> ray.data.Dataset:
    """Lane `lane` of `num_lanes` of the train stream, starting at shard `start_file` (modulo the
    number of train shards); rows are labelled with shard indices in the sorted train file list."""
    train_files = resolve_source(source, data_dir).train_files
    start_file = start_file % len(train_files)
    rotated = train_files[start_file:] + train_files[:start_file]
    indices = [(start_file + i) % len(train_files) for i in range(len(train_files))]
    return packed_dataset(rotated, tokenizer_dir, sequence_len, buffer_docs, file_indices=indices, lane=lane,
                          num_lanes=num_lanes)
