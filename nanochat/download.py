"""One resumable HTTP downloader for every file the library fetches: pretraining shards, the
CORE eval bundle and the Hugging Face parquet files of the chat tasks.

A download streams into '<dest>.part'. When an attempt fails (a dropped connection, a timeout, a
server error) the next one asks for the rest with an HTTP Range request and appends it; a server
that ignores Range answers with the whole file and the .part starts over. The finished file is
checked by the caller's `validate` (a corrupt file is discarded, never resumed) and only then
renamed to its final name, so a file under that name is always complete. Attempts are retried
with exponential backoff; a 404 or any other final HTTP status is not retried.

Everything here is the standard library's urllib, so the library needs no HTTP package.
"""

import fcntl
import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable

PARTIAL_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"

# Status codes after which another attempt may succeed; any other HTTP error is final.
RETRYABLE_HTTP_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK_BYTES = 1 << 20


class DownloadNotFoundError(FileNotFoundError):
    """The server has no such file (HTTP 404): retrying cannot help."""


class DownloadError(RuntimeError):
    """A file could not be downloaded: the server refused it with a final HTTP status."""


class DownloadGaveUpError(DownloadError):
    """Every attempt failed. The .part file stays, so that a later call resumes it."""


class _RetryableError(Exception):
    """A transfer that ended early or produced an invalid file: worth another attempt."""


def _fetch_into(url: str, part_path: str, timeout_s: float) -> None:
    """Bring `part_path` up to the full content of `url`, continuing from its current size."""
    offset = os.path.getsize(part_path) if os.path.exists(part_path) else 0
    headers = {"User-Agent": "nanochat-ray"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Nothing left past our offset: the .part already holds the whole file (validation
            # passes) or it is longer than the file (validation fails and it starts over).
            e.close()
            return
        raise
    with response:
        resumed = offset > 0 and response.status == 206
        if not resumed:
            offset = 0  # a fresh download, or a server that ignored Range and sends the whole file
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with open(part_path, "ab" if resumed else "wb") as f:
            while chunk := response.read(_CHUNK_BYTES):
                f.write(chunk)
                received += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    # urllib returns a short read instead of raising when the peer closes early.
    if expected is not None and received < expected:
        raise _RetryableError(f"the connection closed after {offset + received} of {offset + expected} bytes")


def _download(url: str, dest_path: str, retries: int, backoff_s: float, timeout_s: float,
              validate: Callable[[str], str | None] | None) -> str:
    if os.path.exists(dest_path):  # another process may have finished it while we waited
        return dest_path
    part_path = dest_path + PARTIAL_SUFFIX

    def discard_part() -> None:
        if os.path.exists(part_path):
            os.remove(part_path)

    failures = 0
    while True:
        try:
            _fetch_into(url, part_path, timeout_s)
            problem = validate(part_path) if validate is not None else None
            if problem is not None:
                discard_part()  # resuming a corrupt file would only extend the corruption
                raise _RetryableError(f"the downloaded file is invalid: {problem}")
            os.replace(part_path, dest_path)
            return dest_path
        except urllib.error.HTTPError as e:
            if e.code == 404:
                discard_part()
                raise DownloadNotFoundError(f"{url} does not exist (HTTP 404)") from e
            if e.code not in RETRYABLE_HTTP_STATUS:
                discard_part()
                raise DownloadError(f"{url} was refused with HTTP {e.code} {e.reason}") from e
            error: Exception = e
        except (_RetryableError, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = e
        failures += 1
        if failures > retries:
            raise DownloadGaveUpError(f"giving up on {url} after {failures} attempts: {error}") from error
        delay_s = backoff_s * 2 ** (failures - 1)
        print(f"{url}: attempt {failures} of {retries + 1} failed ({error}); retrying in {delay_s:g}s",
              flush=True)
        time.sleep(delay_s)


def download_file(url: str, dest_path: str, *, retries: int = 5, backoff_s: float = 2.0, timeout_s: float = 60.0,
                  validate: Callable[[str], str | None] | None = None, lock: bool = False) -> str:
    """Download `url` to `dest_path` (creating its folder) and return dest_path.

    A file already at dest_path is not fetched again. A failed attempt is retried up to `retries`
    times, the k-th retry after backoff_s * 2**(k-1) seconds, resuming the .part where it stopped.
    `validate(path)` sees each finished transfer and returns None when the file is good, else a
    short description of what is wrong; an invalid file is deleted and the attempt counts as
    failed. `lock=True` takes an exclusive file lock on '<dest>.lock' for the whole download, so
    that processes of one machine that want the same file fetch it once (the lock file stays).

    Raises DownloadNotFoundError on HTTP 404 and DownloadError on any other final HTTP status,
    both at once and without leaving a .part; DownloadGaveUpError when every attempt failed.
    """
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, not {retries!r}")
    if os.path.exists(dest_path):
        return dest_path
    os.makedirs(os.path.dirname(os.path.abspath(dest_path)), exist_ok=True)
    if not lock:
        return _download(url, dest_path, retries, backoff_s, timeout_s, validate)
    with open(dest_path + LOCK_SUFFIX, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes, also on a crash
        return _download(url, dest_path, retries, backoff_s, timeout_s, validate)
