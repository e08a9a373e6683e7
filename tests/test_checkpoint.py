"""Tests of nanochat.checkpoint: round trips of the model, the per-rank optimizer shards and the
carried tokenizer, the default model/step choice, pruning, the clear errors for missing,
truncated, half-saved and foreign checkpoints, and check_step_files, which accepts a step only
when every rank's shard arrived."""

import dataclasses
import json
import os

import pyarrow.fs
import pytest
import torch

from nanochat import checkpoint
from nanochat.checkpoint import (CheckpointError, CheckpointNotFoundError, build_model, check_step_files,
                                 checkpoint_dir, find_largest_model, find_last_step, load_checkpoint,
                                 load_model, prune_checkpoints, save_checkpoint, tokenizer_fingerprint)
from nanochat.gpt import GPT, GPTConfig

TINY = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


@pytest.fixture(autouse=True)
def own_base_dir(tmp_path, monkeypatch):
    """Each test gets an empty base dir, so default tag/step choices never see other tests' files."""
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


def make_model(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    # init_weights zeroes the output projections; random weights everywhere make the logits depend
    # on every tensor, so a weight that fails to load changes them.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def meta_for(model: GPT, **extra) -> dict:
    return {"model_config": dataclasses.asdict(model.config), **extra}


def save_model(ckpt_dir: str, step: int, model: GPT, **kwargs) -> None:
    save_checkpoint(ckpt_dir, step, model.state_dict(), meta_for(model), **kwargs)


def test_round_trip_gives_identical_logits_and_meta():
    model = make_model().eval()
    ckpt_dir = checkpoint_dir("base", "d2")
    meta = meta_for(model, data_position={"shard": 3, "row": 1234}, user_config={"depth": 2, "lr": 0.02})
    save_checkpoint(ckpt_dir, 7, model.state_dict(), meta)

    loaded, tokenizer, loaded_meta = load_model("base", "cpu")
    idx = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert tokenizer is None
    assert not loaded.training
    assert loaded_meta["step"] == 7
    assert loaded_meta["model_config"] == dataclasses.asdict(TINY)
    assert loaded_meta["data_position"] == {"shard": 3, "row": 1234}
    assert loaded_meta["user_config"] == {"depth": 2, "lr": 0.02}
    assert loaded_meta["model_file"]["bytes"] == os.path.getsize(os.path.join(ckpt_dir, "model_000007.pt"))

    trainable, _, _ = build_model(ckpt_dir, 7, "cpu", phase="train")
    assert trainable.training


def test_torch_compile_prefix_is_stripped_on_save():
    model = make_model()
    ckpt_dir = checkpoint_dir("base", "d2")
    compiled_names = {f"_orig_mod.{key}": value for key, value in model.state_dict().items()}
    save_checkpoint(ckpt_dir, 1, compiled_names, meta_for(model))
    model_state, _, _ = load_checkpoint(ckpt_dir, 1, "cpu")
    assert set(model_state) == set(model.state_dict())


def optimizer_state_after_one_step(model: GPT, seed: int) -> dict:
    optimizer = model.setup_optimizer()
    idx = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(idx, idx).backward()
    optimizer.step()
    return optimizer.state_dict()


def test_optimizer_state_round_trips_per_rank():
    ckpt_dir = checkpoint_dir("base", "d2")
    model = make_model()
    shards = {0: optimizer_state_after_one_step(model, seed=1), 1: optimizer_state_after_one_step(model, seed=2)}
    # Rank 1 first: it has no model state or meta to give, only its optimizer shard.
    save_checkpoint(ckpt_dir, 4, None, None, optimizer_state=shards[1], rank=1, world_size=2)
    save_checkpoint(ckpt_dir, 4, model.state_dict(), meta_for(model), optimizer_state=shards[0], rank=0,
                    world_size=2)

    loaded_shards = {rank: load_checkpoint(ckpt_dir, 4, "cpu", load_optimizer=True, rank=rank)[1]
                     for rank in shards}
    for rank, saved in shards.items():
        loaded = loaded_shards[rank]
        assert loaded["param_groups"] == saved["param_groups"]
        assert loaded["state"].keys() == saved["state"].keys()
        for param_id, param_state in saved["state"].items():
            for name, value in param_state.items():
                assert torch.equal(torch.as_tensor(loaded["state"][param_id][name]), torch.as_tensor(value))
    # Each rank got its own shard back, not the other's.
    lm_head_state = [loaded_shards[rank]["state"][0]["exp_avg"] for rank in (0, 1)]
    assert not torch.equal(*lm_head_state)

    _, no_optimizer, _ = load_checkpoint(ckpt_dir, 4, "cpu")
    assert no_optimizer is None
    with pytest.raises(CheckpointError, match="optim_000004_rank2.pt is missing"):
        load_checkpoint(ckpt_dir, 4, "cpu", load_optimizer=True, rank=2)


def test_default_tag_is_the_deepest_and_step_the_last():
    model = make_model()
    for step in (5, 10):
        save_model(checkpoint_dir("base", "d2"), step, model)
    save_model(checkpoint_dir("base", "d10"), 3, model)
    # A deeper tag whose only save crashed before its meta has no checkpoint and is not chosen.
    os.makedirs(checkpoint_dir("base", "d20"))
    open(os.path.join(checkpoint_dir("base", "d20"), "model_000001.pt"), "wb").close()

    phase_dir = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "base_checkpoints")
    assert find_largest_model(phase_dir) == "d10"  # by depth number, not by string order ("d10" < "d2")
    assert find_last_step(checkpoint_dir("base", "d2")) == 10
    _, _, meta = load_model("base", "cpu")
    assert meta["step"] == 3
    _, _, meta = load_model("base", "cpu", model_tag="d2")
    assert meta["step"] == 10
    _, _, meta = load_model("base", "cpu", model_tag="d2", step=5)
    assert meta["step"] == 5


def test_tags_without_depth_pick_the_most_recently_modified():
    model = make_model()
    for tag, mtime in (("alpha", 2_000_000_000), ("beta", 1_000_000_000)):
        save_model(checkpoint_dir("sft", tag), 1, model)
        os.utime(checkpoint_dir("sft", tag), (mtime, mtime))
    assert find_largest_model(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "chatsft_checkpoints")) == "alpha"


def test_truncated_or_corrupted_model_file_is_reported_with_its_name():
    model = make_model()
    ckpt_dir = checkpoint_dir("base", "d2")
    save_model(ckpt_dir, 1, model)
    model_path = os.path.join(ckpt_dir, "model_000001.pt")
    data = open(model_path, "rb").read()

    with open(model_path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model_000001\.pt has \d+ bytes but its meta records") as info:
        load_model("base", "cpu")
    assert "earlier step" in str(info.value)

    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    with open(model_path, "wb") as f:
        f.write(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"model_000001\.pt does not match the sha256"):
        load_checkpoint(ckpt_dir, 1, "cpu")


def save_crashing_before_meta(monkeypatch, ckpt_dir: str, step: int, model: GPT) -> None:
    """save_checkpoint that dies after the model file is in place, before the meta is written."""
    real_write = checkpoint.atomic_write_bytes

    def crash_on_meta(path, data):
        if os.path.basename(path).startswith("meta_"):
            raise KeyboardInterrupt("simulated crash before the meta is written")
        real_write(path, data)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(checkpoint, "atomic_write_bytes", crash_on_meta)
        save_model(ckpt_dir, step, model)


def test_crash_between_model_write_and_meta_write_keeps_previous_step(monkeypatch):
    model = make_model()
    ckpt_dir = checkpoint_dir("base", "d2")
    save_model(ckpt_dir, 1, model)

    save_crashing_before_meta(monkeypatch, ckpt_dir, 2, make_model(seed=1))

    assert os.path.exists(os.path.join(ckpt_dir, "model_000002.pt"))
    assert find_last_step(ckpt_dir) == 1
    loaded, _, meta = load_model("base", "cpu")
    assert meta["step"] == 1
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint for step 2 .*steps available: 1$"):
        load_checkpoint(ckpt_dir, 2, "cpu")


def test_resaving_a_step_replaces_it_and_a_crash_midway_hides_it(monkeypatch):
    ckpt_dir = checkpoint_dir("base", "d2")
    save_model(ckpt_dir, 1, make_model(seed=0))
    save_model(ckpt_dir, 2, make_model(seed=0))
    replacement = make_model(seed=1)
    save_model(ckpt_dir, 2, replacement)
    model_state, _, _ = load_checkpoint(ckpt_dir, 2, "cpu")
    assert torch.equal(model_state["lm_head.weight"], replacement.lm_head.weight)
    # The old meta must not survive to describe the new model file: the step is absent instead.
    save_crashing_before_meta(monkeypatch, ckpt_dir, 2, make_model(seed=2))
    assert find_last_step(ckpt_dir) == 1


def test_foreign_files_are_rejected():
    model = make_model()
    ckpt_dir = checkpoint_dir("base", "d2")
    save_model(ckpt_dir, 1, model)
    meta_path = os.path.join(ckpt_dir, "meta_000001.json")
    meta = json.load(open(meta_path))

    with open(meta_path, "w") as f:
        json.dump({"model_config": meta["model_config"], "step": 1}, f)
    with pytest.raises(CheckpointError, match=r"meta_000001\.json is not a nanochat checkpoint meta file"):
        load_checkpoint(ckpt_dir, 1, "cpu")

    with open(meta_path, "w") as f:
        f.write("not json at all")
    with pytest.raises(CheckpointError, match=r"meta_000001\.json is not valid JSON"):
        load_checkpoint(ckpt_dir, 1, "cpu")

    with open(meta_path, "w") as f:
        json.dump({**meta, "model_config": {**meta["model_config"], "n_experts": 8}}, f)
    with pytest.raises(CheckpointError, match="does not fit GPTConfig"):
        build_model(ckpt_dir, 1, "cpu")

    # Weights of a wider model under this config: the state dict does not match.
    wider = make_model(dataclasses.replace(TINY, n_embd=32))
    save_checkpoint(ckpt_dir, 2, wider.state_dict(), meta_for(model))
    with pytest.raises(CheckpointError, match=r"weights in .*model_000002\.pt do not match the model_config"):
        build_model(ckpt_dir, 2, "cpu")

    # A file torch cannot read, with a meta that describes it faithfully.
    junk_path = os.path.join(ckpt_dir, "model_000003.pt")
    save_model(ckpt_dir, 3, model)
    with open(junk_path, "wb") as f:
        f.write(b"this is not a torch file")
    meta3 = json.load(open(os.path.join(ckpt_dir, "meta_000003.json")))
    meta3["model_file"].update(bytes=os.path.getsize(junk_path), sha256=checkpoint._sha256_file(junk_path))
    with open(os.path.join(ckpt_dir, "meta_000003.json"), "w") as f:
        json.dump(meta3, f)
    with pytest.raises(CheckpointError, match=r"model_000003\.pt could not be loaded by torch.load"):
        load_checkpoint(ckpt_dir, 3, "cpu")


@pytest.mark.parametrize("source, command", [("base", "python -m ray_jobs.base_train"),
                                             ("sft", "python -m ray_jobs.chat_sft"),
                                             ("rl", "python -m ray_jobs.chat_rl")])
def test_missing_checkpoints_name_the_command_that_creates_them(source, command):
    with pytest.raises(CheckpointNotFoundError, match=f"run `{command}` first"):
        load_model(source, "cpu")
    with pytest.raises(CheckpointNotFoundError, match=f"run `{command}` first"):
        find_last_step(checkpoint_dir(source, "d2"))
    os.makedirs(checkpoint_dir(source, "d2"))
    with pytest.raises(CheckpointNotFoundError, match=f"no complete checkpoint.*run `{command}` first"):
        find_last_step(checkpoint_dir(source, "d2"))


def test_bad_arguments_raise_clear_errors_before_writing():
    model = make_model()
    ckpt_dir = checkpoint_dir("base", "d2")
    with pytest.raises(ValueError, match="'model_config'"):
        save_checkpoint(ckpt_dir, 1, model.state_dict(), {"depth": 2})
    with pytest.raises(ValueError, match=r"the values of \['run_started'\] are not"):
        save_checkpoint(ckpt_dir, 1, model.state_dict(), meta_for(model, run_started=object()))
    with pytest.raises(ValueError, match="filled in by save_checkpoint"):
        save_checkpoint(ckpt_dir, 1, model.state_dict(), meta_for(model, model_file="mine.pt"))
    assert not os.path.exists(ckpt_dir)
    with pytest.raises(ValueError, match="unknown checkpoint source 'pretrain'"):
        checkpoint_dir("pretrain", "d2")
    with pytest.raises(ValueError, match="plain folder name"):
        checkpoint_dir("base", "../d2")
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        load_checkpoint(ckpt_dir, "5", "cpu")


def test_prune_keeps_the_last_k_steps():
    model = make_model()
    ckpt_dir = checkpoint_dir("base", "d2")
    optimizer_state = {"state": {}, "param_groups": []}
    for step in range(1, 6):
        save_checkpoint(ckpt_dir, step, None, None, optimizer_state=optimizer_state, rank=1, world_size=2)
        save_model(ckpt_dir, step, model, optimizer_state=optimizer_state, world_size=2)
    # Leftovers of a crashed old save, and a newer save still in progress on another rank.
    for name in ("model_000000.pt", "model_000002.pt.tmp.4242", "model_000006.pt"):
        open(os.path.join(ckpt_dir, name), "wb").close()

    assert prune_checkpoints(ckpt_dir, keep_last=2) == [1, 2, 3]
    expected = {f"{kind}_{step:06d}{suffix}" for step in (4, 5)
                for kind, suffix in (("model", ".pt"), ("meta", ".json"), ("optim", "_rank0.pt"),
                                     ("optim", "_rank1.pt"), ("optim", "_rank0.json"), ("optim", "_rank1.json"))}
    assert set(os.listdir(ckpt_dir)) == expected | {"model_000006.pt"}
    assert find_last_step(ckpt_dir) == 5
    assert prune_checkpoints(ckpt_dir, keep_last=2) == []
    with pytest.raises(ValueError, match="keep_last must be an int >= 1"):
        prune_checkpoints(ckpt_dir, keep_last=0)


@pytest.fixture
def dummy_tokenizer_dir(tmp_path):
    folder = tmp_path / "dummy_tokenizer"
    folder.mkdir()
    (folder / "tokenizer.pkl").write_bytes(b"merges go here")
    (folder / "token_bytes.pt").write_bytes(bytes(range(40)))
    (folder / "tokenizer.pkl.tmp.99").write_bytes(b"leftover of an interrupted write")
    return folder


def test_tokenizer_folder_is_copied_and_hash_checked(dummy_tokenizer_dir):
    model = make_model()
    ckpt_dir = checkpoint_dir("base", "d2")
    save_model(ckpt_dir, 1, model, tokenizer_dir=str(dummy_tokenizer_dir))

    copy_dir = os.path.join(ckpt_dir, "tokenizer")
    assert sorted(os.listdir(copy_dir)) == ["token_bytes.pt", "tokenizer.pkl"]
    for name in os.listdir(copy_dir):
        assert open(os.path.join(copy_dir, name), "rb").read() == (dummy_tokenizer_dir / name).read_bytes()
    _, _, meta = load_checkpoint(ckpt_dir, 1, "cpu")
    fingerprint = tokenizer_fingerprint(str(dummy_tokenizer_dir))
    assert meta["tokenizer"]["sha256"] == fingerprint
    assert tokenizer_fingerprint(copy_dir) == fingerprint

    (dummy_tokenizer_dir / "token_bytes.pt").write_bytes(bytes(range(41)))
    assert tokenizer_fingerprint(str(dummy_tokenizer_dir)) != fingerprint

    with open(os.path.join(copy_dir, "tokenizer.pkl"), "ab") as f:
        f.write(b"tampered")
    with pytest.raises(CheckpointError, match=r"tokenizer[/\\]tokenizer\.pkl does not match the sha256"):
        load_checkpoint(ckpt_dir, 1, "cpu")
    os.remove(os.path.join(copy_dir, "tokenizer.pkl"))
    with pytest.raises(CheckpointError, match=r"tokenizer[/\\]tokenizer\.pkl named in the meta is missing"):
        load_checkpoint(ckpt_dir, 1, "cpu")


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    model = make_model()
    ckpt_dir = checkpoint_dir("base", "d2")
    with pytest.raises(CheckpointError, match="tokenizer folder .*nowhere does not exist"):
        save_model(ckpt_dir, 1, model, tokenizer_dir=str(tmp_path / "nowhere"))
    assert os.listdir(ckpt_dir) == []


def test_model_loads_with_the_tokenizer_it_carries(tmp_path):
    from nanochat.tokenizer import Tokenizer, compute_token_bytes, save_token_bytes

    trained = Tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    tokenizer_dir = tmp_path / "trained_tokenizer"
    trained.save(str(tokenizer_dir))
    save_token_bytes(compute_token_bytes(trained), str(tokenizer_dir))
    save_model(checkpoint_dir("sft", "d2"), 3, make_model(), tokenizer_dir=str(tokenizer_dir))
    # The original folder is gone, as on a node that never trained a tokenizer.
    for name in os.listdir(tokenizer_dir):
        os.remove(tokenizer_dir / name)

    _, tokenizer, _ = load_model("sft", "cpu")
    text = "the lazy fox"
    assert tokenizer.encode(text) == trained.encode(text)
    assert tokenizer.get_vocab_size() == trained.get_vocab_size()


def save_three_ranks(ckpt_dir: str, step: int, model: GPT, **kwargs) -> dict[int, dict]:
    """One step as three ranks save it: ranks 2 and 1 their optimizer shards, then rank 0 its
    shard, the model and the meta. Returns the shards by rank (each rank's differs)."""
    shards = {rank: {"state": {0: {"exp_avg": torch.full((4 + rank,), float(step))}},
                     "param_groups": [{"lr": 0.01 * (rank + 1), "params": [0]}]} for rank in range(3)}
    for rank in (2, 1):
        save_checkpoint(ckpt_dir, step, None, None, optimizer_state=shards[rank], rank=rank, world_size=3)
    save_model(ckpt_dir, step, model, optimizer_state=shards[0], world_size=3, **kwargs)
    return shards


def truncate(path: str) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_check_step_files_accepts_a_step_only_with_every_ranks_shard(dummy_tokenizer_dir):
    ckpt_dir = checkpoint_dir("base", "d2")
    save_three_ranks(ckpt_dir, 4, make_model(), tokenizer_dir=str(dummy_tokenizer_dir))
    meta = check_step_files(ckpt_dir, 4)
    assert meta["step"] == 4 and meta["optimizer_shards"] == 3
    records = [json.load(open(os.path.join(ckpt_dir, f"optim_000004_rank{rank}.json"))) for rank in range(3)]
    assert [record["file"]["bytes"] for record in records] == [
        os.path.getsize(os.path.join(ckpt_dir, f"optim_000004_rank{rank}.pt")) for rank in range(3)]

    shard = os.path.join(ckpt_dir, "optim_000004_rank2.pt")
    data = open(shard, "rb").read()
    os.remove(shard)
    with pytest.raises(CheckpointError, match=r"optim_000004_rank2\.pt is missing although "
                                              r"optim_000004_rank2\.json exists: the save or its upload"):
        check_step_files(ckpt_dir, 4)
    # The meta alone still makes the step look saved to the local scan.
    assert find_last_step(ckpt_dir) == 4

    truncate_to = len(data) // 2
    with open(shard, "wb") as f:
        f.write(data[:truncate_to])
    with pytest.raises(CheckpointError, match=rf"optim_000004_rank2\.pt has {truncate_to} bytes but "
                                              rf"optim_000004_rank2\.json records {len(data)}"):
        check_step_files(ckpt_dir, 4)

    with open(shard, "wb") as f:
        f.write(data)
    os.remove(os.path.join(ckpt_dir, "optim_000004_rank1.json"))
    with pytest.raises(CheckpointError, match=r"optim_000004_rank1\.json is missing"):
        check_step_files(ckpt_dir, 4)


def test_check_step_files_names_a_missing_model_meta_or_tokenizer_file(dummy_tokenizer_dir):
    ckpt_dir = checkpoint_dir("base", "d2")
    save_three_ranks(ckpt_dir, 1, make_model(), tokenizer_dir=str(dummy_tokenizer_dir))
    truncate(os.path.join(ckpt_dir, "model_000001.pt"))
    with pytest.raises(CheckpointError, match=r"model_000001\.pt has \d+ bytes but meta_000001\.json records"):
        check_step_files(ckpt_dir, 1)

    save_three_ranks(ckpt_dir, 2, make_model(), tokenizer_dir=str(dummy_tokenizer_dir))
    os.remove(os.path.join(ckpt_dir, "tokenizer", "token_bytes.pt"))
    with pytest.raises(CheckpointError, match=r"tokenizer/token_bytes\.pt named in meta_000002\.json is missing"):
        check_step_files(ckpt_dir, 2)

    with pytest.raises(CheckpointError, match=r"meta_000003\.json is missing: the save or its upload did not finish"):
        check_step_files(ckpt_dir, 3)


def test_check_step_files_reads_any_pyarrow_filesystem(tmp_path):
    # Paths on a SubTreeFileSystem are relative to its root, as bucket/key paths are on S3.
    ckpt_dir = str(tmp_path / "bucket" / "run" / "step_000005")
    save_three_ranks(ckpt_dir, 5, make_model())
    bucket = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())
    assert check_step_files("run/step_000005", 5, bucket)["optimizer_shards"] == 3
    os.remove(os.path.join(ckpt_dir, "optim_000005_rank2.pt"))
    with pytest.raises(CheckpointError, match=r"^run/step_000005/optim_000005_rank2\.pt is missing"):
        check_step_files("run/step_000005", 5, bucket)


def test_a_meta_from_before_shard_records_is_still_accepted():
    ckpt_dir = checkpoint_dir("base", "d2")
    shards = save_three_ranks(ckpt_dir, 3, make_model())
    # What save_checkpoint wrote before shard records: no 'optimizer_shards' and no optim_*.json.
    meta_path = os.path.join(ckpt_dir, "meta_000003.json")
    meta = json.load(open(meta_path))
    del meta["optimizer_shards"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    for rank in range(3):
        os.remove(os.path.join(ckpt_dir, f"optim_000003_rank{rank}.json"))

    assert "optimizer_shards" not in check_step_files(ckpt_dir, 3)
    _, loaded, _ = load_checkpoint(ckpt_dir, 3, "cpu", load_optimizer=True, rank=2)
    assert torch.equal(loaded["state"][0]["exp_avg"], shards[2]["state"][0]["exp_avg"])
    # Without records, a missing shard is found only when its rank loads it.
    os.remove(os.path.join(ckpt_dir, "optim_000003_rank2.pt"))
    check_step_files(ckpt_dir, 3)
    with pytest.raises(CheckpointError, match=r"optim_000003_rank2\.pt is missing"):
        load_checkpoint(ckpt_dir, 3, "cpu", load_optimizer=True, rank=2)


def test_load_checks_the_ranks_shard_against_its_record():
    ckpt_dir = checkpoint_dir("base", "d2")
    shards = save_three_ranks(ckpt_dir, 6, make_model())
    _, loaded, _ = load_checkpoint(ckpt_dir, 6, "cpu", load_optimizer=True, rank=1)
    assert loaded["param_groups"] == shards[1]["param_groups"]

    shard = os.path.join(ckpt_dir, "optim_000006_rank1.pt")
    data = open(shard, "rb").read()
    truncate(shard)
    with pytest.raises(CheckpointError, match=rf"optim_000006_rank1\.pt has {len(data) // 2} bytes but its "
                                              rf"record holds {len(data)}"):
        load_checkpoint(ckpt_dir, 6, "cpu", load_optimizer=True, rank=1)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    with open(shard, "wb") as f:
        f.write(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"optim_000006_rank1\.pt does not match the sha256 in its record"):
        load_checkpoint(ckpt_dir, 6, "cpu", load_optimizer=True, rank=1)

    # A stray shard of a fourth rank is not part of a three-rank step.
    save_checkpoint(ckpt_dir, 6, None, None, optimizer_state=shards[2], rank=3, world_size=4)
    with pytest.raises(CheckpointError, match=r"optim_000006_rank3\.pt is not part of this step: its meta "
                                              r"records optimizer shards of 3 rank\(s\)"):
        load_checkpoint(ckpt_dir, 6, "cpu", load_optimizer=True, rank=3)


def test_a_step_saved_without_optimizer_expects_no_shards():
    ckpt_dir = checkpoint_dir("base", "d2")
    save_model(ckpt_dir, 2, make_model())
    assert check_step_files(ckpt_dir, 2)["optimizer_shards"] == 0
    with pytest.raises(ValueError, match="world_size must be an int above rank 2, got 2"):
        save_checkpoint(ckpt_dir, 2, None, None, optimizer_state={}, rank=2, world_size=2)


def test_a_background_save_writes_the_state_as_it_was_when_saved_and_reports_its_errors(tmp_path):
    from ray_jobs.train_common import BackgroundSave, host_copy

    model = make_model(seed=3)
    optimizer = model.setup_optimizer()
    optimizer.load_state_dict(optimizer_state_after_one_step(make_model(seed=3), seed=4))
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    momentum = {index: {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
                for index, state in optimizer.state_dict()["state"].items()}
    write = BackgroundSave(5, host_copy(model.state_dict()), host_copy(optimizer.state_dict()), meta_for(model),
                           rank=0, world=1, tokenizer_dir=None)
    # training goes on at once, changing the live tensors in place while the thread writes
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value.mul_(-3.0)
    folder = write.wait()
    assert write.done() and find_last_step(folder) == 5
    model_state, optimizer_state, _ = load_checkpoint(folder, 5, "cpu", load_optimizer=True)
    assert model_state.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(model_state[key], value), key
    assert momentum and any(momentum.values())
    for index, state in momentum.items():
        for key, value in state.items():
            assert torch.equal(optimizer_state["state"][index][key], value), (index, key)

    # an error of the write (here a meta without model_config) reaches the caller's thread
    failing = BackgroundSave(6, host_copy(model.state_dict()), None, {"no": "model_config"}, rank=0, world=1,
                             tokenizer_dir=None)
    with pytest.raises(ValueError, match="model_config"):
        failing.wait()
    with pytest.raises(CheckpointNotFoundError):
        find_last_step(failing.folder)


def test_the_checkpoint_benchmark_times_both_saves_and_says_its_result(capsys):
    from ray_jobs import bench_checkpoint

    result = bench_checkpoint.main(["--depth", "1"])
    assert result["parameters"] > 0 and result["state_bytes"] > 4 * result["parameters"]
    assert result["in_step_seconds"] > 0
    assert 0 < result["background_stall_seconds"] < result["background_durable_seconds"]
    assert "RESULT checkpoint_stall_seconds_d1 " in capsys.readouterr().out
