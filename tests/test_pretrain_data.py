"""The Ray Data pretraining stream (ray_jobs.pretrain_data): the packing invariants after the data has
gone through Ray (BOS first, exact length, every token from a real document), the read units dealt
to one lane per worker so that no document reaches two workers within an epoch, each lane going on
over epochs with the same rows and giving them again when rebuilt, a validation stream that is the
same on every build, resume from a given shard with monotone position labels; and, without Ray, the
read tasks (every row group once, in file order), the packer's rows not depending on how Ray batches
documents, its end-of-stream drain and its log of crop fraction and tokens/s. Documents are
identified by construction: the test copies a small `sample` build into a `local` source whose every
text starts with a unique tag "[doc NNNNN]", so any piece of a row can be decoded and traced back to
its document and shard.
"""

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.dataset import build_sample_shards, iter_text
from nanochat.tokenizer import Tokenizer
from ray_jobs.pretrain_data import PackRows, ParquetRowGroupDatasource, packed_dataset, train_dataset

TAG = re.compile(r"^\[doc (\d{5})\] ")
SEQ_LEN = 512
BUFFER_DOCS = 100
WORKERS = 2


@dataclass
class Corpus:
    sample_dir: str
    tagged_dir: str
    tokenizer_dir: str
    tokenizer: Tokenizer
    doc_tokens: list[np.ndarray]  # tagged document n, tokenized with BOS
    doc_shard: list[int]          # the shard document n is in
    num_train_shards: int


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("pretrain_data")
    sample = build_sample_shards(str(root / "sample"), max_bytes=1_000_000, shard_bytes=200_000,
                                 row_group_bytes=40_000, num_workers=1)
    tokenizer = Tokenizer.train_from_iterator(iter_text(sample[:-1]), 512)
    tokenizer.save(str(root / "tokenizer"))
    tagged_dir = root / "tagged"
    tagged_dir.mkdir()
    texts, doc_shard = [], []
    for shard, path in enumerate(sample):
        tagged = [f"[doc {len(texts) + i:05d}] {text}" for i, text in enumerate(iter_text([path]))]
        pq.write_table(pa.table({"text": tagged}), str(tagged_dir / f"shard_{shard:05d}.parquet"),
                       row_group_size=50)
        texts += tagged
        doc_shard += [shard] * len(tagged)
    doc_tokens = [np.asarray(ids, dtype=np.int32)
                  for ids in tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id())]
    return Corpus(str(root / "sample"), str(tagged_dir), str(root / "tokenizer"), tokenizer, doc_tokens,
                  doc_shard, len(sample) - 1)


def _lane_rows(lanes: list, epochs: int) -> list[list[dict]]:
    """What each worker reads from its own lane, per epoch: result[epoch][worker] =
    {'tokens': (n, T+1), 'file_index': (n,)}. The lanes are read concurrently, as train workers
    read them."""
    def consume(lane):
        per_epoch = []
        for _ in range(epochs):
            batches = list(lane.iter_batches(batch_size=64, batch_format="numpy"))
            per_epoch.append({key: np.concatenate([b[key] for b in batches]) for key in ("tokens", "file_index")})
        return per_epoch

    with ThreadPoolExecutor(len(lanes)) as pool:
        per_worker = [f.result() for f in [pool.submit(consume, lane) for lane in lanes]]
    return [[per_worker[w][e] for w in range(len(lanes))] for e in range(epochs)]


def _pieces(row: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(row == bos)
    return [row[a:b] for a, b in zip(starts, list(starts[1:]) + [len(row)])]


def _check_rows_and_identify(corpus: Corpus, rows: np.ndarray) -> tuple[list[tuple[int, int]], int]:
    """Assert the packing invariants on rows; return (document, row) for every piece that can be
    traced to its document, and the number of pieces in all (every piece is one document's)."""
    bos = corpus.tokenizer.get_bos_token_id()
    assert rows.dtype == np.int32 and rows.ndim == 2 and rows.shape[1] == SEQ_LEN + 1
    assert np.all(rows[:, 0] == bos)
    assert rows.min() >= 0 and rows.max() < corpus.tokenizer.get_vocab_size()
    tag_tokens = max(len(corpus.tokenizer.encode(f"[doc {n:05d}] ")) for n in (0, 11111, 99999))
    found, num_pieces = [], 0
    for row_number, row in enumerate(rows):
        for piece in _pieces(row, bos):
            num_pieces += 1
            match = TAG.match(corpus.tokenizer.decode(piece[1:].tolist()))
            if match is None:
                # only a crop too short to hold the whole tag is anonymous (best-fit crops the
                # shortest document to whatever space is left, which is often a few tokens)
                assert len(piece) <= 1 + tag_tokens, corpus.tokenizer.decode(piece.tolist())
                continue
            doc = int(match.group(1))
            # no padding, nothing invented: the piece is the start of its document, token for token
            np.testing.assert_array_equal(piece, corpus.doc_tokens[doc][:len(piece)])
            found.append((doc, row_number))
    return found, num_pieces


def _train_lanes(corpus: Corpus, start_file: int, num_lanes: int = WORKERS) -> list:
    return [train_dataset("local", corpus.tokenizer_dir, SEQ_LEN, data_dir=corpus.tagged_dir, buffer_docs=BUFFER_DOCS,
                          start_file=start_file, lane=lane, num_lanes=num_lanes) for lane in range(num_lanes)]


@pytest.mark.usefixtures("ray_local")
def test_train_lanes_pack_without_overlap_resume_and_repeat_their_rows_over_epochs(corpus):
    start_file = 1
    train_docs = {n for n, shard in enumerate(corpus.doc_shard) if shard < corpus.num_train_shards}
    # one read unit per shard here: from the rotated list [1, 2, 3, 0], lane 0 reads shards 1 and 3
    units = [ParquetRowGroupDatasource([f"{corpus.tagged_dir}/shard_{i:05d}.parquet"], [i]).units
             for i in range(corpus.num_train_shards)]
    assert all(len(u) == 1 for u in units)
    lane_shards = [{1, 3}, {2, 0}]

    def offset(shard):
        return (shard - start_file) % corpus.num_train_shards

    epochs = _lane_rows(_train_lanes(corpus, start_file), epochs=2)
    docs_per_epoch = []
    for epoch, workers in enumerate(epochs):
        seen: dict[int, int] = {}
        num_pieces = 0
        for worker, out in enumerate(workers):
            assert len(out["tokens"]) > 50, f"epoch {epoch}: worker {worker} got almost nothing"
            labels = out["file_index"]
            assert set(labels) == lane_shards[worker]  # the deal: every other read unit
            # position labels only move forward within an epoch (preserve_order)
            assert np.all(np.diff([offset(f) for f in labels]) >= 0)
            found, pieces = _check_rows_and_identify(corpus, out["tokens"])
            num_pieces += pieces
            for doc, row in found:
                assert doc not in seen, f"epoch {epoch}: document {doc} reached worker {seen[doc]} and {worker}"
                assert corpus.doc_shard[doc] in lane_shards[worker]
                seen[doc] = worker
        assert int(workers[0]["file_index"][0]) == start_file  # the stream starts at the resume shard
        assert set(seen) <= train_docs  # the validation shard is never trained on
        # every train document once: each piece is a different document, and only the end-of-stream
        # remainder of each lane (under one row) and the last partial batch are missing
        assert 0.98 * len(train_docs) <= num_pieces <= len(train_docs), (num_pieces, len(train_docs))
        assert len(seen) >= 0.8 * len(train_docs)
        docs_per_epoch.append(set(seen))
    # each lane went on into a second epoch with the same rows, and a new build of the lanes (what
    # Ray Train's restart calls) deals and packs the same rows to the same workers again
    assert docs_per_epoch[1] == docs_per_epoch[0]
    rebuilt = _lane_rows(_train_lanes(corpus, start_file), epochs=1)[0]
    for worker in range(WORKERS):
        np.testing.assert_array_equal(epochs[1][worker]["tokens"], epochs[0][worker]["tokens"])
        np.testing.assert_array_equal(rebuilt[worker]["tokens"], epochs[0][worker]["tokens"])


def test_lanes_need_a_read_unit_each_and_a_valid_index(corpus):
    with pytest.raises(ValueError, match=r"make 4 read unit\(s\).*fewer than the 5 workers"):
        _train_lanes(corpus, 0, num_lanes=5)
    with pytest.raises(ValueError, match="lane 2 does not exist"):
        ParquetRowGroupDatasource([f"{corpus.tagged_dir}/shard_00000.parquet"], [0], lane=2, num_lanes=2)


@pytest.mark.usefixtures("ray_local")
def test_val_stream_is_the_same_on_every_build_and_drained_at_its_end(corpus):
    val_file = f"{corpus.sample_dir}/shard_{corpus.num_train_shards:05d}.parquet"

    def val_rows():
        # the sample source's own validation shard; the default buffer (1000 documents) is larger
        # than the shard, so every val row comes from the end-of-stream drain
        dataset = packed_dataset([val_file], corpus.tokenizer_dir, SEQ_LEN)
        return np.concatenate([b["tokens"] for b in dataset.iter_batches(batch_size=None, batch_format="numpy")])

    first, second = val_rows(), val_rows()
    assert pq.read_metadata(val_file).num_rows < 1000
    assert len(first) > 50
    np.testing.assert_array_equal(first, second)
    bos = corpus.tokenizer.get_bos_token_id()
    assert first.shape[1] == SEQ_LEN + 1 and np.all(first[:, 0] == bos)


BOS = 7


def _batch(docs: list[list[int]], file_index: int) -> pa.Table:
    return pa.table({"ids": pa.array(docs, type=pa.list_(pa.int32())),
                     "file_index": pa.array([file_index] * len(docs), type=pa.int32())})


def test_packer_actor_drains_at_end_of_stream_and_logs_crop_fraction_and_rate(capsys):
    rng = np.random.default_rng(0)
    batches = [[[BOS] + rng.integers(100, 200, size=int(rng.integers(0, 40))).tolist() for _ in range(25)]
               for _ in range(4)]
    pack = PackRows(sequence_len=15, bos_id=BOS, buffer_docs=20, documents_in_stream=100, log_every_rows=10,
                    group_docs=10, stream_start=2)
    outputs = [pack(_batch(docs, file_index)) for file_index, docs in enumerate(batches)]

    for file_index, out in enumerate(outputs):
        rows = out.column("tokens").combine_chunks().to_numpy()
        assert rows.shape[1] == 16 and np.all(rows[:, 0] == BOS)
        assert out.column("file_index").to_pylist() == [file_index] * len(rows)
        assert out.column("stream_start").to_pylist() == [2] * len(rows)
    packer = pack.packer
    # after the last document only a partial row is left, and every document went into the buffer
    assert pack.group == [] and packer.tokens_read == sum(len(d) for docs in batches for d in docs)
    assert packer.tokens_read == packer.tokens_emitted + packer.tokens_cropped + packer.buffered_tokens
    assert packer.buffered_tokens < 16
    total_rows = sum(out.num_rows for out in outputs)
    assert packer.tokens_emitted == 16 * total_rows

    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 2  # periodic lines, then the summary
    summary = lines[-1]
    assert summary.startswith("packer end of stream: 100/100 documents")
    assert f"{total_rows:,} rows" in summary
    assert f"crop fraction {packer.crop_fraction:.4f}" in summary and 0 < packer.crop_fraction < 1
    rate = float(re.search(r"([\d,]+) tokens/s", summary).group(1).replace(",", ""))
    assert rate > 0
    stats = pack.stats()
    assert stats["rows"] == total_rows and stats["tokens_read"] == packer.tokens_read


def test_packer_actor_keeps_its_buffer_until_the_stream_ends():
    pack = PackRows(sequence_len=15, bos_id=BOS, buffer_docs=20, documents_in_stream=1000, log_every_rows=0,
                    group_docs=10)
    out = pack(_batch([[BOS] + [150] * 9 for _ in range(30)], 0))
    # 30 documents of 10 tokens, 2 to a row of 16 (one whole, one cropped to 6), in groups of 10:
    # after 20 one row (18 left), after 30 rows while at least 20 are buffered; no drain
    assert out.num_rows == 6 and pack.packer.num_buffered_docs == 18 and pack.group == []
    pack(_batch([[BOS] + [150] * 9 for _ in range(5)], 0))
    assert len(pack.group) == 5 and pack.packer.num_buffered_docs == 18  # waiting for a whole group


def test_packer_actor_rows_do_not_depend_on_how_documents_are_batched():
    rng = np.random.default_rng(1)
    docs = [[BOS] + rng.integers(100, 200, size=int(rng.integers(0, 60))).tolist() for _ in range(300)]
    results = []
    for batch_size in (300, 1, 7, 64):
        pack = PackRows(sequence_len=31, bos_id=BOS, buffer_docs=40, documents_in_stream=len(docs),
                        log_every_rows=0, group_docs=16)
        outs = [pack(_batch(docs[i:i + batch_size], 0)) for i in range(0, len(docs), batch_size)]
        results.append(np.concatenate([out.column("tokens").combine_chunks().to_numpy() for out in outs]))
    assert len(results[0]) > 100
    for rows in results[1:]:
        np.testing.assert_array_equal(rows, results[0])


def test_read_tasks_cover_every_row_group_once_in_file_order(tmp_path):
    paths = []
    for shard, groups in enumerate((3, 1, 4)):
        path = str(tmp_path / f"shard_{shard}.parquet")
        texts = [f"shard {shard} group {g} doc {d} " + "x" * 300 for g in range(groups) for d in range(5)]
        pq.write_table(pa.table({"text": texts}), path, row_group_size=5)
        paths.append(path)
    source = ParquetRowGroupDatasource(paths, [7, 8, 9], read_task_bytes=2500)
    # a task holds consecutive row groups of one file, at least 2500 bytes (two groups of ~1.6 kB)
    # or the file's last groups
    assert [(path[-9:], groups) for path, groups, *_ in source.units] == [
        ("0.parquet", [0, 1]), ("0.parquet", [2]), ("1.parquet", [0]), ("2.parquet", [0, 1]), ("2.parquet", [2, 3])]
    assert source.num_documents == 40
    blocks = [block for task in source.get_read_tasks(parallelism=1) for block in task()]
    texts = [t for block in blocks for t in block.column("text").to_pylist()]
    assert [t.split(" x")[0].rsplit(" doc", 1)[0] for t in texts[::5]] == [
        f"shard {s} group {g}" for s, groups in enumerate((3, 1, 4)) for g in range(groups)]
    labels = [i for block in blocks for i in block.column("file_index").to_pylist()]
    assert labels == [7] * 15 + [8] * 5 + [9] * 20

    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"body": ["no text column here"]}), bad)
    with pytest.raises(ValueError, match="has no 'text' column"):
        ParquetRowGroupDatasource([bad], [0])


def test_packed_dataset_rejects_bad_arguments_with_clear_messages(corpus):
    val_file = f"{corpus.sample_dir}/shard_{corpus.num_train_shards:05d}.parquet"
    with pytest.raises(ValueError, match="sequence_len"):
        packed_dataset([val_file], corpus.tokenizer_dir, 0)
    with pytest.raises(ValueError, match="buffer_docs"):
        packed_dataset([val_file], corpus.tokenizer_dir, 64, buffer_docs=0)
    with pytest.raises(ValueError, match="no parquet files"):
        packed_dataset([], corpus.tokenizer_dir, 64)
