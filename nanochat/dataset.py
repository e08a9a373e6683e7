"""Where pretraining text comes from: lists of parquet shards, downloaded, given or built offline.

Every source ends up in the same shape, so the tokenizer trainer and the Ray Data pipeline never
care which one they read: a sorted list of parquet files with a 'text' column and several row
groups each, in which the LAST file is the validation split. Three sources produce that shape:

- hf: the real pretraining sets, fetched shard by shard from Hugging Face into
  <base>/base_data/<dataset>/. 'fineweb-edu' (the FineWeb-Edu-100B shuffle the seed names, the
  default) and 'climbmix' (ClimbMix-400B, the set the nanochat reference moved to later), with the
  reference's repositories and file names. A download (nanochat.download) streams into
  '<shard>.part', resumes a cut transfer with an HTTP Range request, checks that pyarrow can read
  the result, and only then renames it into place, so a partial file never counts as a shard.
- local: any folder or glob of parquet files the user already has.
- sample: real English text that every machine already carries, built offline into
  <base>/base_data/sample/ so that demos and tests need no network: the docstrings of the standard
  library, the pydoc topics, and the docstrings of the packages installed in the environment.
  Source files are parsed with `ast`, never imported (importing thousands of modules would be slow
  and would run their code). The build is deterministic: two builds in one environment give the
  same bytes.
"""

import ast
import bisect
import glob
import itertools
import json
import math
import multiprocessing
import os
import random
import sysconfig
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.download import DownloadError, DownloadNotFoundError, download_file
from nanochat.files import atomic_write_bytes, get_base_dir

TEXT_COLUMN = "text"
SHARD_SUFFIX = ".parquet"


def shard_filename(index: int) -> str:
    """File name of shard `index`, the naming both Hugging Face sets and the sample use."""
    return f"shard_{index:05d}{SHARD_SUFFIX}"


@dataclass(frozen=True)
class HFDataset:
    """A pretraining set on Hugging Face, stored as shard_00000.parquet ... by index."""

    name: str        # the --source value and the folder name under <base>/base_data/
    repo_id: str
    num_shards: int  # the shard with the highest index (num_shards - 1) is the validation split

    @property
    def base_url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo_id}/resolve/main"

    @property
    def val_index(self) -> int:
        return self.num_shards - 1


HF_DATASETS = {
    "fineweb-edu": HFDataset("fineweb-edu", "karpathy/fineweb-edu-100b-shuffle", 1823),
    "climbmix": HFDataset("climbmix", "karpathy/climbmix-400b-shuffle", 6543),
}
DEFAULT_HF_DATASET = "fineweb-edu"
# 'hf' alone means the default set; the dataset names select one explicitly.
SOURCES = ("sample", "local", "hf", *HF_DATASETS)


def _canonical_source(source: str) -> str:
    if source == "hf":
        return DEFAULT_HF_DATASET
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)} "
                         "('hf' is the default Hugging Face set, fineweb-edu)")
    return source


def get_hf_dataset(name: str) -> HFDataset:
    """The Hugging Face set called `name` ('hf' means the default, fineweb-edu)."""
    name = _canonical_source(name)
    if name not in HF_DATASETS:
        raise ValueError(f"{name!r} is not a Hugging Face dataset: choose one of {', '.join(HF_DATASETS)}")
    return HF_DATASETS[name]


def default_data_dir(source: str) -> str:
    """Where a source keeps its shards by default: <base>/base_data/<sample | dataset name>."""
    source = _canonical_source(source)
    if source == "local":
        raise ValueError("the 'local' source has no default folder: pass --data-dir with a folder "
                         "or a glob of parquet files")
    return os.path.join(get_base_dir(), "base_data", source)


# -----------------------------------------------------------------------------
# Listing and reading shards

def _check_text_column(path: str) -> None:
    """Reject a file that is not parquet or has no 'text' column, reading only its footer."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a readable parquet file ({e}); remove it or fix the "
                         "folder/glob you passed") from e
    if TEXT_COLUMN not in schema.names:
        raise ValueError(f"{path} has no '{TEXT_COLUMN}' column (its columns: {schema.names}); "
                         f"pretraining shards need the documents in a string column named "
                         f"'{TEXT_COLUMN}'")


def _local_parquet_files(data_dir: str) -> list[str]:
    if os.path.isdir(data_dir):
        pattern = os.path.join(data_dir, "*" + SHARD_SUFFIX)
    else:
        pattern = os.path.expanduser(data_dir)
    paths = sorted(p for p in glob.glob(pattern, recursive=True)
                   if p.endswith(SHARD_SUFFIX) and os.path.isfile(p))
    for path in paths:
        _check_text_column(path)
    return paths


def list_parquet_files(source: str, data_dir: str | None = None) -> list[str]:
    """Sorted paths of a source's shards; the last one is the validation split.

    `source` is one of SOURCES; `data_dir` overrides a source's default folder and is required
    for 'local', where it may be a folder or a glob. Files still being written ('.part', '.tmp')
    are never listed. At least two shards are needed, one to train on and one to validate on.
    """
    source = _canonical_source(source)
    if source == "local":
        if not data_dir:
            raise ValueError("the 'local' source needs --data-dir: a folder or a glob of parquet files")
        paths = _local_parquet_files(data_dir)
    else:
        folder = data_dir or default_data_dir(source)
        names = os.listdir(folder) if os.path.isdir(folder) else []
        paths = sorted(os.path.join(folder, n) for n in names if n.endswith(SHARD_SUFFIX))
    if not paths:
        hint = {"local": "check the folder or glob you passed",
                "sample": "run python -m ray_jobs.download_data --source sample"}.get(
            source, f"run python -m ray_jobs.download_data --source {source} -n 8")
        raise FileNotFoundError(f"no parquet shards for source {source!r} in {data_dir or default_data_dir(source)}: {hint}")
    if len(paths) < 2:
        raise ValueError(f"source {source!r} has only one shard ({paths[0]}); at least two are needed "
                         "because the last shard is held out for validation")
    return paths


@dataclass(frozen=True)
class ShardFiles:
    """The shards of a resolved source, split the way every stage splits them."""

    source: str
    files: tuple[str, ...]

    @property
    def train_files(self) -> list[str]:
        return list(self.files[:-1])

    @property
    def val_files(self) -> list[str]:
        return list(self.files[-1:])

    def split(self, split: str) -> list[str]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        return self.train_files if split == "train" else self.val_files


def resolve_source(source: str, data_dir: str | None = None,
                   sample_max_bytes: int | None = None) -> ShardFiles:
    """What a job does with its --source/--data-dir flags: find the shards, building the
    offline sample first when it is asked for and missing (Hugging Face sets are never
    downloaded implicitly: that is ray_jobs.download_data's job)."""
    source = _canonical_source(source)
    if source == "sample":
        files = ensure_sample_shards(max_bytes=sample_max_bytes, data_dir=data_dir)
    else:
        files = list_parquet_files(source, data_dir)
    return ShardFiles(source, tuple(files))


def iter_text(paths: Iterable[str], max_chars: int | None = None,
              doc_cap: int | None = None) -> Iterator[str]:
    """Yield the documents of `paths` in order, one row group in memory at a time.

    doc_cap crops each document to that many characters (a tokenizer trainer wants many
    documents rather than a few huge ones); max_chars stops after that many characters in
    total, cropping the last document so the total is exact.
    """
    for bound, name in ((max_chars, "max_chars"), (doc_cap, "doc_cap")):
        if bound is not None and bound <= 0:
            raise ValueError(f"{name} must be a positive number of characters, not {bound}")
    chars_left = max_chars
    for path in paths:
        parquet_file = pq.ParquetFile(path)
        for row_group in range(parquet_file.num_row_groups):
            texts = parquet_file.read_row_group(row_group, columns=[TEXT_COLUMN]).column(0).to_pylist()
            for text in texts:
                if doc_cap is not None:
                    text = text[:doc_cap]
                if chars_left is not None:
                    text = text[:chars_left]
                    chars_left -= len(text)
                yield text
                if chars_left == 0:
                    return


# -----------------------------------------------------------------------------
# Downloading Hugging Face shards

class ShardNotFoundError(DownloadNotFoundError):
    """The server has no such shard (HTTP 404): retrying cannot help."""


class ShardDownloadError(DownloadError):
    """A shard could not be downloaded after all retries, or the server refused the request."""


def _shard_problem(path: str) -> str | None:
    """None when pyarrow can read the file's footer and it has the 'text' column, else what is wrong."""
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        names = []
    return None if TEXT_COLUMN in names else f"not a parquet file with a '{TEXT_COLUMN}' column"


def download_shard(index: int, dataset: str | HFDataset = DEFAULT_HF_DATASET, dest_dir: str | None = None,
                   base_url: str | None = None, retries: int = 5, backoff: float = 2.0,
                   timeout: float = 30.0) -> str:
    """Download shard `index` of a Hugging Face set into dest_dir and return its path.

    A shard already in place is not fetched again. The bytes stream into '<shard>.part'; after a
    dropped connection the next attempt resumes it with a Range request (a server that ignores
    Range sends the whole file and we start over). The finished file must open with pyarrow and
    have a 'text' column before it is renamed to its final name. Failed attempts are retried
    `retries` times, waiting backoff * 2**k seconds; a 404 is final, raises ShardNotFoundError at
    once and leaves no file behind. `base_url` replaces the dataset's URL (mirrors, tests).
    The transfer itself is nanochat.download.download_file.
    """
    dataset = dataset if isinstance(dataset, HFDataset) else get_hf_dataset(dataset)
    if not 0 <= index < dataset.num_shards:
        raise ValueError(f"{dataset.name} has shards 0..{dataset.val_index}, not {index}")
    filename = shard_filename(index)
    final_path = os.path.join(dest_dir or default_data_dir(dataset.name), filename)
    url = f"{(base_url or dataset.base_url).rstrip('/')}/{filename}"
    try:
        return download_file(url, final_path, retries=retries, backoff_s=backoff, timeout_s=timeout,
                             validate=_shard_problem)
    except DownloadNotFoundError as e:
        raise ShardNotFoundError(f"{e}: check the shard index (0..{dataset.val_index}) and the base URL") from e
    except DownloadError as e:
        raise ShardDownloadError(str(e)) from e


# -----------------------------------------------------------------------------
# The offline sample: docstrings and pydoc topics the machine already has

SAMPLE_MIN_CHARS = 200
SAMPLE_SEED = 1337
SAMPLE_SHARD_BYTES = 2 << 20       # about this much text per shard (never fewer than two shards)
SAMPLE_ROW_GROUP_BYTES = 128 << 10  # text per row group: the unit Ray Data and iter_text stream
SAMPLE_MANIFEST = "sample_manifest.json"
# Test suites hold few readable docstrings and are most of the standard library's source, so
# skipping them makes the build several times faster and the text better.
_SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages", "test", "tests"}


def _python_files_under(root: str) -> list[str]:
    """Every .py file under root, in a traversal order that does not depend on the file system."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return found


def docstrings_of_file(path: str, min_chars: int = SAMPLE_MIN_CHARS) -> list[str]:
    """Module, class and function docstrings of one source file with at least min_chars
    characters (cleaned of their indentation), without importing the file. Files that are not
    valid Python 3 (templates, old vendored code) give nothing."""
    try:
        with open(path, "rb") as f:
            source = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in third-party code
            tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError, OSError, RecursionError, MemoryError):
        return []
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = []
    for node in ast.walk(tree):
        if isinstance(node, documented):
            text = (ast.get_docstring(node, clean=True) or "").strip()
            if len(text) >= min_chars:
                docstrings.append(text)
    return docstrings


def _docstrings_of_files(paths: Sequence[str], min_chars: int) -> list[str]:
    return [text for path in paths for text in docstrings_of_file(path, min_chars)]


def pydoc_topic_texts(min_chars: int = SAMPLE_MIN_CHARS) -> list[str]:
    """The texts of pydoc_data.topics (the language reference help() shows), read by parsing the
    module's dict literal rather than importing it."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], "pydoc_data", "topics.py")
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "topics"):
            topics = ast.literal_eval(node.value)
            return [text.strip() for _, text in sorted(topics.items()) if len(text.strip()) >= min_chars]
    return []


def _site_packages_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def _docstrings_in_parallel(paths: list[str], min_chars: int, num_workers: int) -> list[str]:
    """docstrings_of_file over many files, in file order whatever the number of workers."""
    chunk = 64
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    texts: list[str] = []
    if num_workers <= 1:
        for done, paths_chunk in enumerate(chunks, 1):
            texts.extend(_docstrings_of_files(paths_chunk, min_chars))
            _report_parse_progress(done, len(chunks), chunk, len(paths))
        return texts
    # spawn, not fork: the caller may be a threaded Ray driver, and forking threads is unsafe.
    with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done, chunk_texts in enumerate(pool.map(_docstrings_of_files, chunks, [min_chars] * len(chunks)), 1):
            texts.extend(chunk_texts)
            _report_parse_progress(done, len(chunks), chunk, len(paths))
    return texts


def _report_parse_progress(chunks_done: int, num_chunks: int, chunk: int, num_files: int) -> None:
    if chunks_done == num_chunks or chunks_done % 20 == 0:
        print(f"  parsed {min(chunks_done * chunk, num_files)}/{num_files} files", flush=True)


def collect_sample_documents(max_bytes: int | None = None, min_chars: int = SAMPLE_MIN_CHARS,
                             num_workers: int | None = None) -> list[str]:
    """All sample documents, unique and sorted: pydoc topics and standard-library docstrings
    first, then the installed packages' docstrings, which are read only when max_bytes asks for
    more text than the first group holds (they take most of the build time)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    documents = set(pydoc_topic_texts(min_chars))
    stdlib_files = _python_files_under(stdlib)
    print(f"sample: reading docstrings of {len(stdlib_files)} standard-library files", flush=True)
    documents.update(_docstrings_in_parallel(stdlib_files, min_chars, 1))

    def text_bytes() -> int:
        return sum(len(d.encode("utf-8")) for d in documents)

    if max_bytes is None or text_bytes() < max_bytes:
        site_files = [p for root in _site_packages_dirs() for p in _python_files_under(root)]
        workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
        print(f"sample: reading docstrings of {len(site_files)} installed-package files "
              f"with {workers} worker(s)", flush=True)
        documents.update(_docstrings_in_parallel(site_files, min_chars, workers))
    return sorted(documents)


def _cut_points(sizes: Sequence[int], num_parts: int) -> list[int]:
    """Indices that cut `sizes` (at least num_parts of them) into num_parts non-empty
    consecutive runs of about equal sum."""
    prefix = list(itertools.accumulate(sizes, initial=0))  # prefix[i] = sum(sizes[:i])
    cuts, previous = [], 0
    for part in range(1, num_parts):
        balanced = bisect.bisect_left(prefix, prefix[-1] * part / num_parts)
        # Each run keeps at least one item, so a few huge items cannot leave a run empty.
        cut = min(max(balanced, previous + 1), len(sizes) - (num_parts - part))
        cuts.append(cut)
        previous = cut
    return cuts


def _write_shard(path: str, texts: list[str], row_group_bytes: int) -> None:
    """One parquet shard, a row group per ~row_group_bytes of text, renamed into place."""
    sizes = [len(t.encode("utf-8")) for t in texts]
    num_groups = max(1, min(len(texts), math.ceil(sum(sizes) / row_group_bytes)))
    bounds = [0, *_cut_points(sizes, num_groups), len(texts)]
    schema = pa.schema([(TEXT_COLUMN, pa.string())])
    tmp_path = f"{path}.tmp.{os.getpid()}"
    with pq.ParquetWriter(tmp_path, schema, compression="zstd") as writer:
        for start, stop in zip(bounds, bounds[1:]):
            writer.write_table(pa.table({TEXT_COLUMN: texts[start:stop]}, schema=schema),
                               row_group_size=stop - start)
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def build_sample_shards(dest_dir: str | None = None, max_bytes: int | None = None, *,
                        min_chars: int = SAMPLE_MIN_CHARS, shard_bytes: int = SAMPLE_SHARD_BYTES,
                        row_group_bytes: int = SAMPLE_ROW_GROUP_BYTES, seed: int = SAMPLE_SEED,
                        num_workers: int | None = None) -> list[str]:
    """Build the offline sample in dest_dir (default <base>/base_data/sample) and return its shards.

    Documents are collected (see collect_sample_documents), shuffled with a fixed seed, cut to
    max_bytes of UTF-8 text, and written as at least two shards of about equal size (the last is
    validation), each with row groups of about row_group_bytes. A manifest written last marks the
    build complete. The same environment and arguments give byte-identical files.
    """
    for value, name in ((max_bytes, "max_bytes"), (shard_bytes, "shard_bytes"),
                        (row_group_bytes, "row_group_bytes"), (min_chars, "min_chars")):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, not {value}")
    dest_dir = dest_dir or default_data_dir("sample")
    os.makedirs(dest_dir, exist_ok=True)
    manifest_path = os.path.join(dest_dir, SAMPLE_MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the folder is incomplete until the new manifest is written

    started = time.time()
    documents = collect_sample_documents(max_bytes, min_chars, num_workers)
    random.Random(seed).shuffle(documents)
    chosen, sizes, total = [], [], 0
    for text in documents:
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            break
        chosen.append(text)
        sizes.append(size)
        total += size
    if len(chosen) < 2:
        raise ValueError(f"max_bytes={max_bytes} leaves {len(chosen)} document(s); the sample needs at "
                         "least two (train and validation): raise the cap")

    num_shards = min(len(chosen), max(2, math.ceil(total / shard_bytes)))
    bounds = [0, *_cut_points(sizes, num_shards), len(chosen)]
    names = [shard_filename(i) for i in range(num_shards)]
    for name, start, stop in zip(names, bounds, bounds[1:]):
        _write_shard(os.path.join(dest_dir, name), chosen[start:stop], row_group_bytes)
    # Shards of an earlier, larger build would otherwise be listed after ours and become "val".
    for stale in sorted(set(os.listdir(dest_dir)) - set(names)):
        if stale.startswith("shard_") and stale.endswith(SHARD_SUFFIX):
            os.remove(os.path.join(dest_dir, stale))
    manifest = {"files": names, "max_bytes": max_bytes, "min_chars": min_chars, "seed": seed,
                "shard_bytes": shard_bytes, "row_group_bytes": row_group_bytes,
                "num_documents": len(chosen), "text_bytes": total}
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode("utf-8"))
    print(f"sample: {len(chosen):,} documents, {total / 1e6:.1f} MB of text in {num_shards} shards "
          f"under {dest_dir} ({time.time() - started:.1f}s)", flush=True)
    return [os.path.join(dest_dir, name) for name in names]


def ensure_sample_shards(max_bytes: int | None = None, data_dir: str | None = None) -> list[str]:
    """The sample's shards, built first when missing or incomplete, or when `max_bytes` asks for
    another cap than the one they were built with (None takes whatever complete build exists)."""
    dest_dir = data_dir or default_data_dir("sample")
    manifest_path = os.path.join(dest_dir, SAMPLE_MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path, "rb") as f:
            manifest = json.loads(f.read())
        paths = [os.path.join(dest_dir, name) for name in manifest["files"]]
        if max_bytes in (None, manifest["max_bytes"]) and all(os.path.exists(p) for p in paths):
            return paths
    return build_sample_shards(dest_dir, max_bytes)
