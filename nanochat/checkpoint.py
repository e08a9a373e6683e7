"""Saving and loading checkpoints: model weights, per-rank optimizer shards, a JSON meta record
and a copy of the tokenizer, laid out so that any node that sees the folder can rebuild the model.

Layout, under the base dir (nanochat.files.get_base_dir()):

    <phase dir>/<model_tag>/model_<step:06d>.pt             model state dict (rank 0)
                            meta_<step:06d>.json            config, step, integrity record (rank 0)
                            optim_<step:06d>_rank<r>.pt     optimizer shard of rank r
                            optim_<step:06d>_rank<r>.json   its integrity record (rank r)
                            tokenizer/                      copy of the tokenizer's files

with phase dirs base -> base_checkpoints, sft -> chatsft_checkpoints, rl -> chatrl_checkpoints.

Why it is built this way:
- Every file is written under a temporary name and renamed into place, and the meta file is
  written last. A step exists only when its meta exists, so a crash in the middle of a save
  leaves the previous step as the last valid one instead of a half-written checkpoint.
- The meta records the byte size and sha256 of the model file, so a truncated or corrupted
  file (a full disk, a copy cut short) is reported as such instead of loading garbage.
- The checkpoint carries its tokenizer, identified by a sha256 over its files, because a model
  is meaningless with any other tokenizer and the node that loads it may never have trained one.
- The optimizer is sharded across ranks by the distributed optimizer, so each rank saves and
  loads only its own shard, followed by a small record of that shard's byte size and sha256.
  Rank 0's meta records how many ranks wrote shards, so check_step_files can tell a step whose
  every shard arrived from one where a rank crashed or its upload was cut short, and a resuming
  run falls back to the step before instead of failing on the same missing shard at every retry.
"""

import hashlib
import json
import os
import posixpath
import re

import pyarrow.fs
import torch

from nanochat.common import atomic_torch_save
from nanochat.files import atomic_write_bytes, get_base_dir
from nanochat.gpt import GPT, GPTConfig

PHASE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
# The job that produces each phase's checkpoints, named in "nothing to load" errors.
PHASE_COMMANDS = {"base": "python -m ray_jobs.base_train", "sft": "python -m ray_jobs.chat_sft",
                  "rl": "python -m ray_jobs.chat_rl"}
# Written into every meta file; a meta without it was not written by this module.
CHECKPOINT_FORMAT = "nanochat-checkpoint-v1"
TOKENIZER_SUBDIR = "tokenizer"
# Keys that save_checkpoint owns in the meta record; the caller's dict may not set them.
RESERVED_META_KEYS = ("format", "step", "model_file", "tokenizer", "optimizer_shards")

_STEP_FILE = re.compile(r"^(?:model|meta|optim)_(\d{6,})(?:[_.].*)?$")
_META_FILE = re.compile(r"^meta_(\d{6,})\.json$")
_DEPTH_TAG = re.compile(r"^d(\d+)$")
# torch.compile wraps a model and prefixes its state dict keys; checkpoints store the plain names.
_COMPILE_PREFIX = "_orig_mod."


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, corrupted, or not a nanochat checkpoint."""


class CheckpointNotFoundError(CheckpointError):
    """The requested checkpoint folder or step does not exist (a resuming job starts fresh)."""


def _model_path(ckpt_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir, f"model_{step:06d}.pt")


def _meta_path(ckpt_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir, f"meta_{step:06d}.json")


def _optim_path(ckpt_dir: str, step: int, rank: int) -> str:
    return os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank}.pt")


def _optim_record_path(ckpt_dir: str, step: int, rank: int) -> str:
    return os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank}.json")


_OPTIM_FILE = re.compile(r"^optim_\d+_rank(\d+)\.(pt|json)$")


def optimizer_shard_rank(filename: str) -> int | None:
    """The rank whose optimizer shard (or shard record) a checkpoint file is, None for the files
    that every rank reads (meta, model, tokenizer copy)."""
    match = _OPTIM_FILE.match(os.path.basename(filename))
    return int(match.group(1)) if match else None


def _how_to_create(path: str) -> str:
    """The command that writes checkpoints into `path`, judged by the phase dir in it."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    for source, phase_dir in PHASE_DIRS.items():
        if phase_dir in parts:
            return f"run `{PHASE_COMMANDS[source]}` first to create one"
    return "check the path, or train a model first (python -m ray_jobs.base_train)"


def _check_source(source: str) -> str:
    if source not in PHASE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}: use one of {sorted(PHASE_DIRS)}")
    return PHASE_DIRS[source]


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return step


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_dir(source: str, model_tag: str) -> str:
    """The folder holding the checkpoints of `model_tag` for a phase ('base', 'sft' or 'rl')."""
    phase_dir = _check_source(source)
    if not model_tag or model_tag in (".", "..") or "/" in model_tag or os.sep in model_tag:
        raise ValueError(f"model_tag must be a plain folder name such as 'd12', got {model_tag!r}")
    return os.path.join(get_base_dir(), phase_dir, model_tag)


def _tokenizer_file_hashes(tokenizer_dir: str) -> dict[str, str]:
    """sha256 of every regular file directly inside `tokenizer_dir`, by file name."""
    if not os.path.isdir(tokenizer_dir):
        raise CheckpointError(f"tokenizer folder {tokenizer_dir} does not exist: pass the folder that "
                              "holds the trained tokenizer (tokenizer.pkl and token_bytes.pt)")
    # ".tmp." names are leftovers of interrupted atomic writes, not part of the tokenizer.
    names = sorted(name for name in os.listdir(tokenizer_dir)
                   if os.path.isfile(os.path.join(tokenizer_dir, name)) and ".tmp." not in name)
    if not names:
        raise CheckpointError(f"tokenizer folder {tokenizer_dir} holds no files: pass the folder "
                              "with tokenizer.pkl and token_bytes.pt")
    return {name: _sha256_file(os.path.join(tokenizer_dir, name)) for name in names}


def _combine_hashes(file_hashes: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(file_hashes):
        digest.update(f"{name}\0{file_hashes[name]}\n".encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer_dir: str) -> str:
    """One sha256 identifying a tokenizer by the names and contents of the files in its folder."""
    return _combine_hashes(_tokenizer_file_hashes(tokenizer_dir))


def _copy_tokenizer(tokenizer_dir: str, ckpt_dir: str) -> dict:
    """Copy the tokenizer's files into the checkpoint folder; returns its meta record."""
    file_hashes = _tokenizer_file_hashes(tokenizer_dir)
    target_dir = os.path.join(ckpt_dir, TOKENIZER_SUBDIR)
    for name, sha in file_hashes.items():
        target = os.path.join(target_dir, name)
        # Every step of a run carries the same tokenizer: skip files already copied intact.
        if os.path.isfile(target) and _sha256_file(target) == sha:
            continue
        with open(os.path.join(tokenizer_dir, name), "rb") as f:
            atomic_write_bytes(target, f.read())
    return {"sha256": _combine_hashes(file_hashes), "files": file_hashes}


def _json_bytes(meta: dict) -> bytes:
    try:
        return json.dumps(meta, indent=2).encode()
    except (TypeError, ValueError) as exc:
        bad = []
        for key, value in meta.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                bad.append(key)
        raise ValueError(f"checkpoint meta must be JSON-serializable; the values of {bad} are not "
                         f"({exc}): convert them to plain numbers, strings, lists and dicts") from exc


def save_checkpoint(ckpt_dir: str, step: int, model_state: dict | None, meta: dict | None,
                    optimizer_state: dict | None = None, rank: int = 0,
                    tokenizer_dir: str | None = None, world_size: int = 1) -> None:
    """Save one step. Rank 0 writes the model, the tokenizer copy and the meta; every rank writes
    its own optimizer shard, and then that shard's record (size and sha256), when
    `optimizer_state` is given. `world_size` is the number of ranks that save this step.

    `meta` must hold 'model_config' (the GPTConfig fields as a dict) and may hold anything else
    JSON-able (data position, the user's config). Ranks other than 0 may pass None for
    `model_state` and `meta`. The meta is written last, so the step only becomes visible to
    find_last_step / load_checkpoint once the model file is complete. It records
    'optimizer_shards': `world_size` when rank 0 saves an optimizer shard, else 0.

    Ranks write independently, with no collective: rank 0 cannot know the other shards' sizes
    when it writes the meta, so each rank vouches for its own shard in its own record. Gathering
    the sizes into rank 0's meta instead would put a collective into every save, which deadlocks
    once saving moves off the training thread (asynchronous checkpointing) and hangs the healthy
    ranks when one fails before it. A step whose meta exists may therefore still lack another
    rank's shard (a crash, an upload cut short): check_step_files reports it, and
    load_checkpoint(load_optimizer=True) refuses it.
    """
    step = _check_step(step)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= rank:
        raise ValueError(f"world_size must be an int above rank {rank}, got {world_size!r}")
    if rank == 0:
        if not isinstance(model_state, dict) or not model_state:
            raise ValueError("rank 0 must pass the model's state dict (model.state_dict()) as model_state")
        if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
            raise ValueError("meta must be a dict with 'model_config' set to the model's config as a "
                             "dict, e.g. {'model_config': dataclasses.asdict(model.config)}")
        clashing = [key for key in RESERVED_META_KEYS if key in meta and key != "step"]
        if clashing:
            raise ValueError(f"meta keys {clashing} are filled in by save_checkpoint: rename them")
        if "step" in meta and meta["step"] != step:
            raise ValueError(f"meta['step'] is {meta['step']} but step={step}: pass the same step or "
                             "leave 'step' out of meta")
        # Check serializability before anything touches the disk.
        _json_bytes(meta)

    os.makedirs(ckpt_dir, exist_ok=True)
    if optimizer_state is not None:
        # Re-saving a step: hide the old record first, or it would briefly describe the new shard.
        record_path = _optim_record_path(ckpt_dir, step, rank)
        if os.path.exists(record_path):
            os.remove(record_path)
        optim_path = _optim_path(ckpt_dir, step, rank)
        atomic_torch_save(optimizer_state, optim_path)
        atomic_write_bytes(record_path, _json_bytes({
            "format": CHECKPOINT_FORMAT, "step": step, "rank": rank,
            "file": {"name": os.path.basename(optim_path), "bytes": os.path.getsize(optim_path),
                     "sha256": _sha256_file(optim_path)}}))
    if rank != 0:
        return

    # Re-saving a step: hide the old meta first, or it would briefly describe the new model file.
    meta_path = _meta_path(ckpt_dir, step)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    tokenizer_record = _copy_tokenizer(tokenizer_dir, ckpt_dir) if tokenizer_dir else None
    plain_state = {key.removeprefix(_COMPILE_PREFIX): value for key, value in model_state.items()}
    model_path = _model_path(ckpt_dir, step)
    atomic_torch_save(plain_state, model_path)
    record = dict(meta)
    record.update(format=CHECKPOINT_FORMAT, step=step,
                  model_file={"name": os.path.basename(model_path), "bytes": os.path.getsize(model_path),
                              "sha256": _sha256_file(model_path)},
                  tokenizer=tokenizer_record,
                  optimizer_shards=world_size if optimizer_state is not None else 0)
    atomic_write_bytes(meta_path, _json_bytes(record))


def _complete_steps(ckpt_dir: str) -> list[int]:
    """Steps whose meta file exists, ascending."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointNotFoundError(f"no checkpoint folder at {ckpt_dir}: {_how_to_create(ckpt_dir)}")
    return sorted(int(m.group(1)) for m in map(_META_FILE.match, os.listdir(ckpt_dir)) if m)


def find_last_step(ckpt_dir: str) -> int:
    """The largest step in `ckpt_dir` whose save completed (its meta file exists)."""
    steps = _complete_steps(ckpt_dir)
    if not steps:
        raise CheckpointNotFoundError(f"no complete checkpoint in {ckpt_dir} (no meta_<step>.json; a "
                                      f"save that crashed leaves none): {_how_to_create(ckpt_dir)}")
    return steps[-1]


def find_largest_model(phase_dir: str) -> str:
    """The model tag in `phase_dir` to load by default, among tags with a complete checkpoint.

    Tags named d<depth> (as the training jobs name them) compare by depth and the deepest wins;
    when there are none, the most recently modified tag wins.
    """
    if not os.path.isdir(phase_dir):
        raise CheckpointNotFoundError(f"no checkpoint folder at {phase_dir}: {_how_to_create(phase_dir)}")
    tags = [name for name in os.listdir(phase_dir)
            if os.path.isdir(os.path.join(phase_dir, name)) and _complete_steps(os.path.join(phase_dir, name))]
    if not tags:
        raise CheckpointNotFoundError(f"no model with a complete checkpoint in {phase_dir}: "
                                      f"{_how_to_create(phase_dir)}")
    depth_tags = [tag for tag in tags if _DEPTH_TAG.match(tag)]
    if depth_tags:
        return max(depth_tags, key=lambda tag: int(_DEPTH_TAG.match(tag).group(1)))
    return max(tags, key=lambda tag: os.path.getmtime(os.path.join(phase_dir, tag)))


def _read_meta(ckpt_dir: str, step: int) -> dict:
    steps = _complete_steps(ckpt_dir)
    if step not in steps:
        available = ", ".join(map(str, steps)) or "none"
        raise CheckpointNotFoundError(f"no checkpoint for step {step} in {ckpt_dir} (no "
                                      f"{os.path.basename(_meta_path(ckpt_dir, step))}); steps "
                                      f"available: {available}")
    meta_path = _meta_path(ckpt_dir, step)
    with open(meta_path, "rb") as f:
        return _parse_meta(f.read(), meta_path, step)


def _parse_meta(data: bytes, meta_path: str, step: int) -> dict:
    """The meta record of `step` from the bytes of its file, checked to be one save_checkpoint wrote."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc}): it is not a nanochat checkpoint "
                              "meta file; remove it or point at a folder written by save_checkpoint") from exc
    problem = None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        problem = f"'format' is not {CHECKPOINT_FORMAT!r}"
    elif meta.get("step") != step:
        problem = f"'step' is {meta.get('step')!r}, not {step}"
    elif not isinstance(meta.get("model_config"), dict):
        problem = "'model_config' is missing"
    elif not isinstance(meta.get("model_file"), dict) or not {"bytes", "sha256"} <= set(meta["model_file"]):
        problem = "'model_file' integrity record is missing"
    elif not isinstance(meta.get("optimizer_shards", 0), int) or meta.get("optimizer_shards", 0) < 0:
        problem = f"'optimizer_shards' is {meta['optimizer_shards']!r}, not a count of ranks"
    if problem:
        raise CheckpointError(f"{meta_path} is not a nanochat checkpoint meta file ({problem}): "
                              "load only folders written by nanochat.checkpoint.save_checkpoint")
    return meta


def _parse_optim_record(data: bytes, record_path: str, step: int, rank: int) -> dict:
    """The {'name', 'bytes', 'sha256'} record of rank `rank`'s optimizer shard, from its file's bytes."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"optimizer shard record {record_path} is not valid JSON ({exc}): its write "
                              "or upload was cut short; use an earlier step") from exc
    if (not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT or record.get("step") != step
            or record.get("rank") != rank or not isinstance(record.get("file"), dict)
            or not {"name", "bytes", "sha256"} <= set(record["file"])):
        raise CheckpointError(f"{record_path} is not the optimizer shard record of rank {rank} at step {step}: "
                              "load only folders written by nanochat.checkpoint.save_checkpoint")
    return record["file"]


def check_step_files(ckpt_dir: str, step: int, filesystem: pyarrow.fs.FileSystem | None = None) -> dict:
    """The meta of `step` once every file a resume needs is in `ckpt_dir` with its recorded size:
    the meta, the model file, the tokenizer copy's files, and the optimizer shard and its record
    of each of the meta's 'optimizer_shards' ranks. Raises CheckpointError naming the first file
    that is missing or has the wrong size.

    `filesystem` is a pyarrow filesystem (S3, GCS, ...) with `ckpt_dir` a path on it; None means
    the local disk. Only sizes are compared, from one listing of the folder, so checking a large
    checkpoint in remote storage reads the meta and the shard records, never the weights; the
    sha256 of the model file and of a rank's shard are checked when load_checkpoint reads them.
    A meta without 'optimizer_shards' (written before shards had records) is accepted when the
    model file and the tokenizer copy check out.
    """
    step = _check_step(step)
    if filesystem is None:
        filesystem, ckpt_dir = pyarrow.fs.LocalFileSystem(), os.path.abspath(ckpt_dir)
    ckpt_dir = ckpt_dir.rstrip("/")
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(ckpt_dir, recursive=True, allow_not_found=True))
    sizes = {posixpath.relpath(info.path, ckpt_dir): info.size for info in infos
             if info.type == pyarrow.fs.FileType.File}
    fix = "the save or its upload did not finish; use an earlier step"

    def read(name: str) -> bytes:
        try:
            if name in sizes:
                with filesystem.open_input_stream(f"{ckpt_dir}/{name}") as stream:
                    return stream.read()
        except FileNotFoundError:
            pass  # removed since the listing (the run's old checkpoints are being pruned)
        raise CheckpointError(f"{ckpt_dir}/{name} is missing: {fix}")

    def check_size(name: str, expected: int, described_by: str) -> None:
        if name not in sizes:
            raise CheckpointError(f"{ckpt_dir}/{name} is missing although {described_by} exists: {fix}")
        if sizes[name] != expected:
            raise CheckpointError(f"{ckpt_dir}/{name} has {sizes[name]} bytes but {described_by} records "
                                  f"{expected}: {fix}")

    meta_name = os.path.basename(_meta_path("", step))
    meta = _parse_meta(read(meta_name), f"{ckpt_dir}/{meta_name}", step)
    check_size(os.path.basename(_model_path("", step)), meta["model_file"]["bytes"], meta_name)
    for name in (meta.get("tokenizer") or {"files": {}})["files"]:
        if f"{TOKENIZER_SUBDIR}/{name}" not in sizes:
            raise CheckpointError(f"tokenizer file {ckpt_dir}/{TOKENIZER_SUBDIR}/{name} named in {meta_name} is "
                                  f"missing: {fix}")
    for rank in range(meta.get("optimizer_shards", 0)):
        record_name = os.path.basename(_optim_record_path("", step, rank))
        record = _parse_optim_record(read(record_name), f"{ckpt_dir}/{record_name}", step, rank)
        check_size(os.path.basename(_optim_path("", step, rank)), record["bytes"], record_name)
    return meta


def _verify_model_file(ckpt_dir: str, step: int, meta: dict, hash_check: bool = True) -> str:
    model_path = _model_path(ckpt_dir, step)
    fix = "the file is truncated or corrupted; load an earlier step or copy the checkpoint again"
    if not os.path.isfile(model_path):
        raise CheckpointError(f"{model_path} is missing although its meta exists: {fix}")
    expected = meta["model_file"]
    size = os.path.getsize(model_path)
    if size != expected["bytes"]:
        raise CheckpointError(f"{model_path} has {size} bytes but its meta records {expected['bytes']}: {fix}")
    if hash_check and _sha256_file(model_path) != expected["sha256"]:
        raise CheckpointError(f"{model_path} does not match the sha256 in its meta: {fix}")
    return model_path


def _verify_optimizer_shard(ckpt_dir: str, step: int, rank: int, meta: dict) -> None:
    """Check rank `rank`'s shard against the size and sha256 in its record; a checkpoint whose
    meta predates 'optimizer_shards' has no records, and its shard is loaded unchecked."""
    if "optimizer_shards" not in meta:
        return
    optim_path = _optim_path(ckpt_dir, step, rank)
    if rank >= meta["optimizer_shards"]:
        raise CheckpointError(f"{optim_path} is not part of this step: its meta records optimizer shards of "
                              f"{meta['optimizer_shards']} rank(s); resume with that many ranks")
    record_path = _optim_record_path(ckpt_dir, step, rank)
    if not os.path.isfile(record_path):
        raise CheckpointError(f"optimizer shard record {record_path} is missing: rank {rank} did not finish "
                              "saving this step; resume from an earlier step")
    with open(record_path, "rb") as f:
        record = _parse_optim_record(f.read(), record_path, step, rank)
    fix = "the file is truncated or corrupted; resume from an earlier step or without the optimizer state"
    size = os.path.getsize(optim_path)
    if size != record["bytes"]:
        raise CheckpointError(f"{optim_path} has {size} bytes but its record holds {record['bytes']}: {fix}")
    if _sha256_file(optim_path) != record["sha256"]:
        raise CheckpointError(f"{optim_path} does not match the sha256 in its record: {fix}")


def _verify_tokenizer_copy(ckpt_dir: str, meta: dict) -> str | None:
    """The checkpoint's tokenizer folder after checking it against the meta; None if it has none."""
    recorded = meta.get("tokenizer")
    if not recorded:
        return None
    tokenizer_dir = os.path.join(ckpt_dir, TOKENIZER_SUBDIR)
    fix = ("the tokenizer copy was changed or replaced after the save; restore the files, or "
           "re-save the model with the tokenizer it was trained with")
    for name, sha in recorded["files"].items():
        path = os.path.join(tokenizer_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"tokenizer file {path} named in the meta is missing: {fix}")
        if _sha256_file(path) != sha:
            raise CheckpointError(f"tokenizer file {path} does not match the sha256 in the meta: {fix}")
    if _combine_hashes(recorded["files"]) != recorded["sha256"]:
        raise CheckpointError(f"the tokenizer record in {_meta_path(ckpt_dir, meta['step'])} is "
                              f"inconsistent (file hashes do not add up to its sha256): {fix}")
    return tokenizer_dir


def verify_model_file(ckpt_dir: str, step: int) -> None:
    """Check one step's model file against the size and sha256 in its meta (CheckpointError if not)."""
    step = _check_step(step)
    _verify_model_file(ckpt_dir, step, _read_meta(ckpt_dir, step))


def load_checkpoint(ckpt_dir: str, step: int, device: torch.device | str, load_optimizer: bool = False,
                    rank: int = 0, model_verified: bool = False) -> tuple[dict, dict | None, dict]:
    """(model_state, optimizer_state or None, meta) of one step, tensors on `device`.

    The model file is checked against the size and sha256 in the meta (only its size when
    `model_verified` says verify_model_file already passed, as one rank per node does for the
    others on restore: hashing a d20 model takes seconds), the tokenizer copy (if the checkpoint
    carries one) against its recorded hashes, and with `load_optimizer` this rank's optimizer
    shard against its record, before anything is returned.
    """
    step = _check_step(step)
    meta = _read_meta(ckpt_dir, step)
    model_path = _verify_model_file(ckpt_dir, step, meta, hash_check=not model_verified)
    _verify_tokenizer_copy(ckpt_dir, meta)
    try:
        model_state = torch.load(model_path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{model_path} could not be loaded by torch.load ({exc}): the file is "
                              "corrupted; load an earlier step or copy the checkpoint again") from exc
    if not isinstance(model_state, dict) or not all(isinstance(v, torch.Tensor) for v in model_state.values()):
        raise CheckpointError(f"{model_path} does not hold a state dict of tensors: it is not a nanochat "
                              "model checkpoint")
    optimizer_state = _load_optimizer_shard(ckpt_dir, step, rank, device, meta) if load_optimizer else None
    return model_state, optimizer_state, meta


def load_optimizer_shard(ckpt_dir: str, step: int, rank: int, device: torch.device | str) -> dict:
    """Rank `rank`'s optimizer shard of one step, checked against its record, without the model."""
    step = _check_step(step)
    return _load_optimizer_shard(ckpt_dir, step, rank, device, _read_meta(ckpt_dir, step))


def _load_optimizer_shard(ckpt_dir: str, step: int, rank: int, device: torch.device | str, meta: dict) -> dict:
    optim_path = _optim_path(ckpt_dir, step, rank)
    if not os.path.isfile(optim_path):
        raise CheckpointError(f"optimizer shard {optim_path} is missing: rank {rank} did not finish "
                              "saving this step (or the run used fewer ranks); resume from an earlier "
                              "step, with the same number of ranks, or without the optimizer state")
    _verify_optimizer_shard(ckpt_dir, step, rank, meta)
    try:
        return torch.load(optim_path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{optim_path} could not be loaded by torch.load ({exc}): the file is "
                              "corrupted; resume from an earlier step or without the optimizer "
                              "state") from exc


def build_model(ckpt_dir: str, step: int, device: torch.device | str,
                phase: str = "eval") -> tuple[GPT, object | None, dict]:
    """(model, tokenizer or None, meta): the GPT of one step, ready for `phase` ('eval' or 'train').

    The tokenizer comes from the copy the checkpoint carries; None when it carries none.
    """
    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', got {phase!r}")
    device = torch.device(device)
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device)
    meta_path = _meta_path(ckpt_dir, step)
    try:
        config = GPTConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the model_config in {meta_path} does not fit GPTConfig ({exc}): the "
                              "checkpoint was written by a different model version") from exc
    with torch.device("meta"):
        model = GPT(config)
    # GPT.to_empty recomputes the rotary tables, the only tensors not in the state dict, so the
    # random init is skipped: every weight comes from the checkpoint.
    model.to_empty(device=device)
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {_model_path(ckpt_dir, step)} do not match the model_config "
                              f"in {meta_path} ({exc}): it is not a checkpoint of this model") from exc
    model.train(phase == "train")

    tokenizer = None
    tokenizer_dir = _verify_tokenizer_copy(ckpt_dir, meta)
    if tokenizer_dir is not None:
        # Imported here so that loading weights alone needs none of the tokenizer's dependencies.
        from nanochat.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_directory(tokenizer_dir)
    return model, tokenizer, meta


def load_model(source: str, device: torch.device | str, model_tag: str | None = None,
               step: int | None = None, phase: str = "eval") -> tuple[GPT, object | None, dict]:
    """build_model for a phase ('base', 'sft', 'rl'): the largest model tag and its last step
    unless `model_tag` / `step` are given."""
    phase_dir = os.path.join(get_base_dir(), _check_source(source))
    if model_tag is None:
        model_tag = find_largest_model(phase_dir)
    ckpt_dir = checkpoint_dir(source, model_tag)
    if step is None:
        step = find_last_step(ckpt_dir)
    return build_model(ckpt_dir, step, device, phase=phase)


def prune_checkpoints(ckpt_dir: str, keep_last: int) -> list[int]:
    """Remove every file of the steps older than the last `keep_last` complete ones, including
    leftovers of saves that crashed; returns the removed complete steps.

    Files of steps newer than the last complete one are left alone: another rank may be writing them.
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    steps = _complete_steps(ckpt_dir)
    if len(steps) <= keep_last:
        return []
    oldest_kept = steps[-keep_last]
    removed = steps[:-keep_last]
    # Metas go first: a crash mid-prune then leaves orphaned files, never a meta without its model.
    for step in removed:
        os.remove(_meta_path(ckpt_dir, step))
    for name in sorted(os.listdir(ckpt_dir)):
        match = _STEP_FILE.match(name)
        if match and int(match.group(1)) < oldest_kept:
            os.remove(os.path.join(ckpt_dir, name))
    return removed
