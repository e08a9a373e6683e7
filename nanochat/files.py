"""The base directory and crash-safe file writes. Free of PyTorch, so that the processes that only
read, tokenize or route (Ray Data workers, the tokenizer, the Serve ingress) import them without
paying for torch's import, a second of every process's start."""

import os
from collections.abc import Callable
from typing import BinaryIO


def get_base_dir() -> str:
    """Where data, tokenizers, checkpoints and reports live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat.

    On a cluster, point NANOCHAT_BASE_DIR at a path every node sees (an NFS mount).
    """
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Call `write` on a temporary file beside `path`, fsync it, then rename it into place, so
    that a crash never leaves a partial file under that name."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write(data))
