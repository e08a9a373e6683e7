"""Shard sources: downloads against a local HTTP server on 127.0.0.1 (resume after a dropped
connection, a server that ignores Range, 404, corrupt files), local folders and globs, the
offline sample (format, determinism, filtering), and the Ray download job end to end."""

import http.server
import io
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import (ShardDownloadError, ShardNotFoundError, build_sample_shards, download_shard,
                              ensure_sample_shards, iter_text, list_parquet_files, resolve_source)


def parquet_bytes(texts: list[str], row_group_size: int = 50, column: str = "text") -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({column: texts}), sink, row_group_size=row_group_size)
    return sink.getvalue()


def shard_texts(index: int, count: int = 200) -> list[str]:
    # Varied text so the file does not compress to nothing and "half the bytes" is a real cut.
    return [f"shard {index} document {i}: " + " ".join(str(i * j % 9973) for j in range(40)) for i in range(count)]


class ShardRequestHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files under /<scenario>/<name>. Scenarios: ok (honours Range), drop-once (the
    first request for a name sends half the body then closes), ignore-range (drop-once, then
    answers every request with the whole file), always-drop; a name not in files answers 404."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        scenario, _, name = self.path.strip("/").partition("/")
        range_header = self.headers.get("Range")
        with self.server.lock:
            self.server.requests.append((self.path, range_header))
            first_request = self.server.seen.setdefault(self.path, 0) == 0
            self.server.seen[self.path] += 1
        body = self.server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if range_header and scenario != "ignore-range":
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
        drop = scenario == "always-drop" or (first_request and scenario in ("drop-once", "ignore-range"))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        self.wfile.write(payload[:len(payload) // 2] if drop else payload)
        self.wfile.flush()
        self.close_connection = drop

    def log_message(self, format, *args):
        pass  # keep the test output clean


@pytest.fixture
def shard_server():
    """A local server holding five shards (indices 0, 1, 2, fineweb's val index 1822 and
    ClimbMix's 6542) and a corrupt file; yields (base_url, server)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ShardRequestHandler)
    server.daemon_threads = True
    server.lock = threading.Lock()
    server.requests, server.seen = [], {}
    val_indices = [dataset.HF_DATASETS[name].val_index for name in ("fineweb-edu", "climbmix")]
    server.files = {dataset.shard_filename(i): parquet_bytes(shard_texts(i)) for i in (0, 1, 2, *val_indices)}
    server.files[dataset.shard_filename(3)] = b"this is not a parquet file" * 100
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_shard_writes_the_served_bytes_and_skips_it_next_time(shard_server, tmp_path):
    base_url, server = shard_server
    path = download_shard(0, "fineweb-edu", str(tmp_path), base_url=f"{base_url}/ok")
    assert path == str(tmp_path / "shard_00000.parquet")
    assert open(path, "rb").read() == server.files["shard_00000.parquet"]
    assert os.listdir(tmp_path) == ["shard_00000.parquet"]
    assert download_shard(0, "fineweb-edu", str(tmp_path), base_url=f"{base_url}/ok") == path
    assert len(server.requests) == 1  # the second call found the shard in place


def test_climbmix_is_nanochats_set_with_its_validation_shard_last(shard_server, tmp_path):
    """The gpt2 preset's data: nanochat's ClimbMix-400B repository and file names, 170 training
    shards and the last shard of the set (6542) as validation, through the same resumable download."""
    from ray_jobs.download_data import shard_indices
    climbmix = dataset.get_hf_dataset("climbmix")
    assert climbmix.base_url == "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    assert shard_indices("climbmix", 170) == [*range(170), 6542]
    base_url, server = shard_server
    for index in (0, 1, 6542):
        download_shard(index, "climbmix", str(tmp_path), base_url=f"{base_url}/drop-once", backoff=0.01)
    files = resolve_source("climbmix", str(tmp_path))
    assert [os.path.basename(p) for p in files.train_files] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [os.path.basename(p) for p in files.val_files] == ["shard_06542.parquet"]
    assert open(files.val_files[0], "rb").read() == server.files["shard_06542.parquet"]
    assert sum(range_header is not None for _, range_header in server.requests) == 3  # each cut one resumed


def test_a_dropped_connection_is_resumed_with_a_range_request(shard_server, tmp_path):
    base_url, server = shard_server
    body = server.files["shard_00001.parquet"]
    path = download_shard(1, "fineweb-edu", str(tmp_path), base_url=f"{base_url}/drop-once", backoff=0.01)
    assert open(path, "rb").read() == body
    assert [r for _, r in server.requests] == [None, f"bytes={len(body) // 2}-"]
    assert pq.read_table(path).column("text").to_pylist() == shard_texts(1)


def test_a_server_that_ignores_range_makes_the_download_start_over(shard_server, tmp_path):
    base_url, server = shard_server
    path = download_shard(2, "fineweb-edu", str(tmp_path), base_url=f"{base_url}/ignore-range", backoff=0.01)
    assert open(path, "rb").read() == server.files["shard_00002.parquet"]
    assert len(server.requests) == 2


def test_404_fails_at_once_with_a_clear_error_and_leaves_no_file(shard_server, tmp_path):
    base_url, server = shard_server
    with pytest.raises(ShardNotFoundError, match="HTTP 404.*shard index"):
        download_shard(5, "fineweb-edu", str(tmp_path), base_url=f"{base_url}/ok", retries=5, backoff=0.01)
    assert len(server.requests) == 1  # not retried
    assert os.listdir(tmp_path) == []


def test_a_partial_download_is_kept_for_resume_but_never_listed(shard_server, tmp_path):
    base_url, server = shard_server
    for i in (0, 1):
        download_shard(i, "fineweb-edu", str(tmp_path), base_url=f"{base_url}/ok")
    with pytest.raises(ShardDownloadError, match="after 2 attempts"):
        download_shard(2, "fineweb-edu", str(tmp_path), base_url=f"{base_url}/always-drop", retries=1, backoff=0.01)
    assert sorted(os.listdir(tmp_path)) == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet.part"]
    assert [os.path.basename(p) for p in list_parquet_files("fineweb-edu", str(tmp_path))] == \
        ["shard_00000.parquet", "shard_00001.parquet"]
    # A later run resumes the .part (which holds half then a quarter of the file) to completion.
    download_shard(2, "fineweb-edu", str(tmp_path), base_url=f"{base_url}/ok")
    assert open(tmp_path / "shard_00002.parquet", "rb").read() == server.files["shard_00002.parquet"]
    assert not (tmp_path / "shard_00002.parquet.part").exists()


def test_a_corrupt_download_is_discarded_and_retried(shard_server, tmp_path):
    base_url, server = shard_server
    with pytest.raises(ShardDownloadError, match="not a parquet file"):
        download_shard(3, "fineweb-edu", str(tmp_path), base_url=f"{base_url}/ok", retries=2, backoff=0.01)
    assert len(server.requests) == 3
    assert os.listdir(tmp_path) == []


def test_download_shard_rejects_an_index_outside_the_dataset(tmp_path):
    with pytest.raises(ValueError, match="0..6542"):
        download_shard(6543, "climbmix", str(tmp_path))
    with pytest.raises(ValueError, match="unknown data source"):
        download_shard(0, "fineweb", str(tmp_path))


def test_local_source_accepts_folders_and_globs_and_names_a_file_without_text(tmp_path):
    for i in range(3):
        (tmp_path / f"part-{i}.parquet").write_bytes(parquet_bytes(shard_texts(i, 10)))
    paths = list_parquet_files("local", str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert list_parquet_files("local", str(tmp_path / "part-[12].parquet")) == paths[1:]
    files = resolve_source("local", str(tmp_path))
    assert files.train_files == paths[:2] and files.val_files == paths[2:]

    (tmp_path / "part-3.parquet").write_bytes(parquet_bytes(["x"] * 10, column="content"))
    with pytest.raises(ValueError, match=r"part-3\.parquet has no 'text' column"):
        list_parquet_files("local", str(tmp_path))
    with pytest.raises(ValueError, match="only one shard"):
        list_parquet_files("local", str(tmp_path / "part-0.parquet"))
    with pytest.raises(ValueError, match="needs --data-dir"):
        list_parquet_files("local")
    with pytest.raises(FileNotFoundError, match="download_data --source climbmix"):
        list_parquet_files("climbmix", str(tmp_path / "empty"))


def test_iter_text_reads_all_row_groups_and_honours_the_caps(tmp_path):
    texts = [f"document number {i} " * (i + 1) for i in range(120)]
    path = tmp_path / "a.parquet"
    path.write_bytes(parquet_bytes(texts, row_group_size=16))
    assert pq.ParquetFile(path).num_row_groups == 8
    assert list(iter_text([str(path)] * 2)) == texts * 2
    assert list(iter_text([str(path)], doc_cap=10)) == [t[:10] for t in texts]
    capped = list(iter_text([str(path)], max_chars=1000))
    assert sum(map(len, capped)) == 1000 and "".join(capped) == "".join(texts)[:1000]


SAMPLE_CAP = 1_000_000  # the standard library alone holds more, so the packages need not be parsed


@pytest.fixture(scope="module")
def sample_build(tmp_path_factory):
    dest = tmp_path_factory.mktemp("sample")
    return dest, build_sample_shards(str(dest), SAMPLE_CAP, row_group_bytes=64 << 10)


def test_sample_shards_have_the_shard_format_and_clean_documents(sample_build):
    dest, paths = sample_build
    assert paths == list_parquet_files("sample", str(dest))
    assert len(paths) >= 2
    documents = []
    for path in paths:
        parquet_file = pq.ParquetFile(path)
        assert parquet_file.schema_arrow.names == ["text"]
        assert parquet_file.num_row_groups > 1
        documents.extend(parquet_file.read().column("text").to_pylist())
    assert min(map(len, documents)) >= dataset.SAMPLE_MIN_CHARS
    assert len(set(documents)) == len(documents)
    total = sum(len(d.encode("utf-8")) for d in documents)
    assert 0.9 * SAMPLE_CAP < total <= SAMPLE_CAP
    # the validation shard holds its share, not a leftover crumb
    val_rows = pq.ParquetFile(paths[-1]).metadata.num_rows
    assert val_rows > 0.3 * len(documents) / len(paths)
    # real English prose from docstrings, e.g. the standard library's "Return" sentences
    assert sum("Return" in d for d in documents) > 50


def test_sample_build_is_byte_identical_and_ensure_reuses_it(sample_build, tmp_path):
    dest, first = sample_build
    second = build_sample_shards(str(tmp_path), SAMPLE_CAP, row_group_bytes=64 << 10)
    assert [os.path.basename(p) for p in second] == [os.path.basename(p) for p in first]
    for a, b in zip(first, second):
        assert open(a, "rb").read() == open(b, "rb").read()
    stamps = [os.stat(p).st_mtime_ns for p in second]
    assert ensure_sample_shards(SAMPLE_CAP, data_dir=str(tmp_path)) == second
    assert [os.stat(p).st_mtime_ns for p in second] == stamps  # not rebuilt


def test_docstrings_are_read_without_importing_the_file(tmp_path):
    source = tmp_path / "module.py"
    long_text = "Explains the module at length. " * 10
    source.write_text(f'"""{long_text}"""\nraise SystemExit("imported!")\n'
                      f'class Thing:\n    """short"""\n    def go(self):\n        """{long_text}more"""\n')
    assert dataset.docstrings_of_file(str(source)) == [long_text.strip(), (long_text + "more").strip()]
    (tmp_path / "broken.py").write_text("def (:\n")
    assert dataset.docstrings_of_file(str(tmp_path / "broken.py")) == []
    topics = dataset.pydoc_topic_texts()
    assert len(topics) > 50 and all(len(t) >= dataset.SAMPLE_MIN_CHARS for t in topics)


def test_download_job_fans_out_over_ray_and_skips_present_shards(ray_local, shard_server, tmp_path, capsys):
    from ray_jobs import download_data
    base_url, server = shard_server
    argv = ["--source", "fineweb-edu", "-n", "2", "--data-dir", str(tmp_path),
            "--base-url", f"{base_url}/ok", "--num-workers", "2"]
    paths = download_data.main(argv)
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet",
                                                    "shard_01822.parquet"]
    for path in paths:
        assert open(path, "rb").read() == server.files[os.path.basename(path)]
    output = capsys.readouterr().out
    assert "num_shards: 2" in output and "[3/3]" in output
    assert download_data.main(argv) == paths
    assert len(server.requests) == 3  # the second run found all three in place
    assert "3 already present, 0 to download" in capsys.readouterr().out
