"""The shared downloader against a local HTTP server on 127.0.0.1: a plain download, a dropped
connection resumed with a Range request, a server that ignores Range, 404 and other final
statuses, validation, giving up (and resuming later), an already complete .part, and the lock."""

import http.server
import os
import threading
import time

import pytest

from nanochat.download import (PARTIAL_SUFFIX, DownloadError, DownloadGaveUpError, DownloadNotFoundError,
                               download_file)
from tests.test_dataset import ShardRequestHandler

# Varied bytes, so that "half the body" is a real cut and a wrong resume shows.
BODY = bytes((i * 7919 + i // 251) % 256 for i in range(200_000))


class FileHandler(ShardRequestHandler):
    """The shard server's scenarios (ok, drop-once, ignore-range, always-drop; an unknown name
    answers 404; see tests/test_dataset.py) plus three: forbidden answers 403, slow pauses before
    answering as ok, and a Range that starts at or past the end answers 416."""

    def do_GET(self):
        scenario, _, name = self.path.strip("/").partition("/")
        range_header = self.headers.get("Range")
        body = self.server.files.get(name)
        past_end = body is not None and range_header is not None and \
            int(range_header.removeprefix("bytes=").rstrip("-")) >= len(body)
        if scenario == "forbidden" or past_end:
            self.server.requests.append((self.path, range_header))
            self.send_error(403 if scenario == "forbidden" else 416)
            return
        if scenario == "slow":
            time.sleep(0.3)
        super().do_GET()


@pytest.fixture
def server():
    """A running server on a free port; yields it with .url(scenario, name) and .requests."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FileHandler)
    httpd.daemon_threads = True
    httpd.lock = threading.Lock()
    httpd.requests, httpd.seen = [], {}
    httpd.files = {"file": BODY}
    httpd.url = lambda scenario, name="file": f"http://127.0.0.1:{httpd.server_address[1]}/{scenario}/{name}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_a_file_is_downloaded_in_place_and_not_fetched_again(server, tmp_path):
    dest = str(tmp_path / "sub" / "data.bin")
    assert download_file(server.url("ok"), dest, backoff_s=0) == dest
    assert open(dest, "rb").read() == BODY
    assert os.listdir(tmp_path / "sub") == ["data.bin"]
    assert download_file(server.url("ok"), dest, backoff_s=0) == dest
    assert server.requests == [("/ok/file", None)]


def test_a_dropped_connection_is_resumed_with_a_range_request(server, tmp_path):
    dest = str(tmp_path / "data.bin")
    download_file(server.url("drop-once"), dest, backoff_s=0)
    assert open(dest, "rb").read() == BODY
    assert [r for _, r in server.requests] == [None, f"bytes={len(BODY) // 2}-"]
    assert os.listdir(tmp_path) == ["data.bin"]


def test_a_server_that_ignores_range_makes_the_download_start_over(server, tmp_path):
    dest = str(tmp_path / "data.bin")
    download_file(server.url("ignore-range"), dest, backoff_s=0)
    # The second answer was the whole file (200): appending it to the half would corrupt the file.
    assert open(dest, "rb").read() == BODY
    assert [r for _, r in server.requests] == [None, f"bytes={len(BODY) // 2}-"]


def test_404_is_final_clear_and_leaves_no_file(server, tmp_path):
    dest = str(tmp_path / "data.bin")
    with open(dest + PARTIAL_SUFFIX, "wb") as f:
        f.write(b"stale")
    with pytest.raises(DownloadNotFoundError, match=r"/ok/missing does not exist \(HTTP 404\)") as info:
        download_file(server.url("ok", "missing"), dest, retries=5, backoff_s=0)
    assert isinstance(info.value, FileNotFoundError)
    assert len(server.requests) == 1  # not retried
    assert os.listdir(tmp_path) == []


def test_another_final_status_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="refused with HTTP 403") as info:
        download_file(server.url("forbidden"), str(tmp_path / "data.bin"), retries=5, backoff_s=0)
    assert not isinstance(info.value, DownloadGaveUpError)
    assert len(server.requests) == 1
    assert os.listdir(tmp_path) == []


def test_an_invalid_file_is_discarded_retried_and_never_renamed_into_place(server, tmp_path):
    dest = str(tmp_path / "data.bin")
    seen = []

    def reject(path):
        seen.append((os.path.basename(path), os.path.getsize(path), os.path.exists(dest)))
        return "not the file we wanted"

    with pytest.raises(DownloadGaveUpError, match="after 2 attempts: the downloaded file is invalid: not the file"):
        download_file(server.url("ok"), dest, retries=1, backoff_s=0, validate=reject)
    # Each attempt downloaded the whole file afresh (a rejected .part is not resumed).
    assert seen == [("data.bin" + PARTIAL_SUFFIX, len(BODY), False)] * 2
    assert [r for _, r in server.requests] == [None, None]
    assert os.listdir(tmp_path) == []


def test_a_valid_file_passes_validation_then_lands(server, tmp_path):
    dest = str(tmp_path / "data.bin")
    download_file(server.url("ok"), dest, validate=lambda path: None if open(path, "rb").read() == BODY else "bad")
    assert open(dest, "rb").read() == BODY


def test_giving_up_keeps_the_part_and_a_later_call_resumes_it(server, tmp_path):
    dest = str(tmp_path / "data.bin")
    with pytest.raises(DownloadGaveUpError, match="after 2 attempts: the connection closed after"):
        download_file(server.url("always-drop"), dest, retries=1, backoff_s=0)
    part = tmp_path / ("data.bin" + PARTIAL_SUFFIX)
    # Half of the file, then half of the remaining half.
    assert part.read_bytes() == BODY[:len(BODY) // 2 + len(BODY) // 4]
    assert not os.path.exists(dest)
    download_file(server.url("ok"), dest, backoff_s=0)
    assert open(dest, "rb").read() == BODY
    assert server.requests[-1] == ("/ok/file", f"bytes={len(BODY) // 2 + len(BODY) // 4}-")
    assert os.listdir(tmp_path) == ["data.bin"]


def test_a_complete_part_answered_with_416_is_validated_and_renamed(server, tmp_path):
    dest = str(tmp_path / "data.bin")
    with open(dest + PARTIAL_SUFFIX, "wb") as f:
        f.write(BODY)
    download_file(server.url("ok"), dest, backoff_s=0)
    assert open(dest, "rb").read() == BODY
    assert server.requests == [("/ok/file", f"bytes={len(BODY)}-")]


def test_the_lock_makes_concurrent_callers_fetch_the_file_once(server, tmp_path):
    dest = str(tmp_path / "data.bin")
    results, errors = [], []

    def fetch():
        try:
            results.append(download_file(server.url("slow"), dest, backoff_s=0, lock=True))
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [dest] * 3
    assert open(dest, "rb").read() == BODY
    assert len(server.requests) == 1
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "data.bin.lock"]


def test_a_negative_retry_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match="retries must be an int >= 0, not -1"):
        download_file("http://127.0.0.1:9/x", str(tmp_path / "x"), retries=-1)
