"""Tests of the karpathy/nanochat interop: importing the reference fixtures (written by nanochat's
own code, see tests/fixtures/nanochat_ref/README.md) gives the reference's logits and greedy
continuation, exporting writes what nanochat's loader reads, the two round-trip, older
checkpoints load, and bad input is refused without writing anything."""

import dataclasses
import json
import os
import pickle
import shutil

import pytest
import torch

from nanochat.checkpoint import (CheckpointError, build_model, checkpoint_dir, load_checkpoint, load_model,
                                 save_checkpoint)
from nanochat.engine import Engine, greedy_decode_without_cache
from nanochat.gpt import GPT, LEGACY_CONFIG, GPTConfig
from nanochat.tokenizer import Tokenizer
from ray_jobs import export_nanochat, import_nanochat
from tests.tiny import CHAT_TEXT

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "nanochat_ref")
STEP = 60


def fixture_checkpoint(name: str) -> str:
    return os.path.join(FIXTURES, name, "base_checkpoints", "d2")


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


@pytest.mark.parametrize("name", ["current", "legacy"])
def test_import_gives_the_reference_logits_and_greedy_continuation(base_dir, name, capsys):
    import_nanochat.main([fixture_checkpoint(name), "--phase", "base", "--model-tag", name])
    model, tokenizer, meta = load_model("base", "cpu", name)
    reference = json.load(open(os.path.join(FIXTURES, name, "reference.json")))
    expected = torch.load(os.path.join(FIXTURES, name, "reference_logits.pt"), weights_only=True)
    with torch.no_grad():
        logits = model(torch.tensor([reference["ids"]]))[0, reference["positions"]]
    assert logits.dtype == torch.float32
    assert (logits - expected).abs().max().item() <= 1e-5
    assert greedy_decode_without_cache(model, reference["prompt"], 32) == reference["greedy_continuation"]
    columns = Engine(model, tokenizer).generate(reference["prompt"], max_tokens=32, temperature=0.0)
    assert [column[0] for column, _ in columns] == reference["greedy_continuation"]
    assert meta["imported_from"]["step"] == STEP and model.config.smear == (name == "current")
    out = capsys.readouterr().out
    assert ("optimizer state imported" in out) == (name == "current")
    assert ("fresh optimizer" in out) == (name == "legacy")


def test_imported_optimizer_state_resumes_training(base_dir):
    import_nanochat.main([fixture_checkpoint("current"), "--phase", "base", "--model-tag", "d2"])
    model, _, _ = load_model("base", "cpu", "d2", phase="train")
    _, optimizer_state, _ = load_checkpoint(checkpoint_dir("base", "d2"), STEP, "cpu", load_optimizer=True)
    optimizer = model.setup_optimizer()
    optimizer.load_state_dict(optimizer_state)
    reference = torch.load(os.path.join(fixture_checkpoint("current"), f"optim_{STEP:06d}_rank0.pt"),
                           weights_only=True)
    wte = optimizer.state[model.transformer.wte.weight]
    assert wte["step"] == STEP
    torch.testing.assert_close(wte["exp_avg"], reference["state"][1]["exp_avg"].float(), rtol=0, atol=0)
    c_q = optimizer.state[model.transformer.h[0].attn.c_q.weight]
    assert c_q["momentum_buffer"].shape == model.transformer.h[0].attn.c_q.weight.shape
    ids = torch.tensor([json.load(open(os.path.join(FIXTURES, "current", "reference.json")))["ids"][:65]])
    model(ids[:, :-1], targets=ids[:, 1:]).backward()
    optimizer.step()


def test_export_has_the_keys_shapes_dtypes_and_meta_nanochat_loads(base_dir, tmp_path):
    import_nanochat.main([fixture_checkpoint("current"), "--phase", "sft", "--model-tag", "d2"])
    out = tmp_path / "exported"
    export_nanochat.main(["--phase", "sft", "--model-tag", "d2", str(out)])
    ckpt = out / "chatsft_checkpoints" / "d2"
    exported = torch.load(ckpt / f"model_{STEP:06d}.pt", weights_only=True)
    original = torch.load(os.path.join(fixture_checkpoint("current"), f"model_{STEP:06d}.pt"), weights_only=True)
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert exported[key].shape == tensor.shape and exported[key].dtype in (torch.float32, tensor.dtype)
        torch.testing.assert_close(exported[key], tensor.float(), rtol=0, atol=0)
    meta = json.load(open(ckpt / f"meta_{STEP:06d}.json"))
    reference_meta = json.load(open(os.path.join(fixture_checkpoint("current"), f"meta_{STEP:06d}.json")))
    assert meta["model_config"] == reference_meta["model_config"] and meta["step"] == STEP
    with open(out / "tokenizer" / "tokenizer.pkl", "rb") as f:
        encoding = pickle.load(f)  # our own file: nanochat reads it with a plain pickle.load
    assert type(encoding).__name__ == "Encoding" and encoding.n_vocab == 300
    token_bytes = torch.load(out / "tokenizer" / "token_bytes.pt", weights_only=True)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (300,)
    reference_bytes = torch.load(os.path.join(FIXTURES, "current", "tokenizer", "token_bytes.pt"), weights_only=True)
    assert torch.equal(token_bytes, reference_bytes)


@pytest.mark.parametrize("name", ["current", "legacy"])
def test_export_then_import_round_trips_exactly(base_dir, tmp_path, name):
    import_nanochat.main([fixture_checkpoint(name), "--phase", "base", "--model-tag", "first"])
    export_nanochat.main(["--phase", "base", "--model-tag", "first", str(tmp_path / "out")])
    import_nanochat.main([str(tmp_path / "out" / "base_checkpoints" / "first"), "--phase", "base",
                          "--model-tag", "second"])
    first, first_tokenizer, _ = load_model("base", "cpu", "first")
    second, second_tokenizer, _ = load_model("base", "cpu", "second")
    assert first.config == second.config
    for (key, a), (other, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert key == other and torch.equal(a, b)
    assert first_tokenizer.encoding._mergeable_ranks == second_tokenizer.encoding._mergeable_ranks


def test_older_checkpoints_without_lambdas_and_window_pattern_load(base_dir, tmp_path):
    source = tmp_path / "old"
    shutil.copytree(fixture_checkpoint("legacy"), source)
    shutil.copytree(os.path.join(FIXTURES, "legacy", "tokenizer"), tmp_path / "tokenizer")
    state = torch.load(source / f"model_{STEP:06d}.pt", weights_only=True)
    for key in ("resid_lambdas", "x0_lambdas"):
        del state[key]
    torch.save({f"_orig_mod.{key}": value.bfloat16() for key, value in state.items()}, source / f"model_{STEP:06d}.pt")
    meta = json.load(open(source / f"meta_{STEP:06d}.json"))
    del meta["model_config"]["window_pattern"]
    json.dump(meta, open(source / f"meta_{STEP:06d}.json", "w"))
    import_nanochat.main([str(source), "--phase", "base", "--model-tag", "old", "--tokenizer-dir",
                          str(tmp_path / "tokenizer")])
    model, _, _ = load_model("base", "cpu", "old")
    assert model.config.window_pattern == "L" and all(left == -1 for left, _ in model.window_sizes)
    assert torch.equal(model.resid_lambdas, torch.ones(2)) and torch.equal(model.x0_lambdas, torch.zeros(2))
    assert model.transformer.wte.weight.dtype == torch.float32


def test_our_checkpoints_from_before_smear_and_backout_still_load(base_dir, tmp_path):
    fields = {**dataclasses.asdict(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2,
                                             n_embd=64)), **LEGACY_CONFIG}
    with torch.device("meta"):
        model = GPT(GPTConfig(**fields))
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.smear_gate is None and model.transformer.h[1].attn.ve_gate.weight.shape == (2, 32)
    old_fields = {key: value for key, value in fields.items() if key not in LEGACY_CONFIG}
    save_checkpoint(str(tmp_path / "ours"), 5, model.state_dict(), {"model_config": old_fields})
    loaded, _, _ = build_model(str(tmp_path / "ours"), 5, "cpu")
    assert loaded.config == model.config
    shutil.copytree(tmp_path / "ours", checkpoint_dir("base", "ours"))
    with pytest.raises(CheckpointError, match="no version of karpathy/nanochat"):
        export_nanochat.main(["--phase", "base", "--model-tag", "ours", str(tmp_path / "never")])
    assert not os.path.exists(tmp_path / "never")


def _broken_copy(tmp_path, what: str) -> tuple[str, list[str]]:
    """A copy of the current fixture broken in one way, and the extra arguments the import needs."""
    source = tmp_path / "source"
    shutil.copytree(fixture_checkpoint("current"), source)
    shutil.copytree(os.path.join(FIXTURES, "current", "tokenizer"), tmp_path / "tokenizer")
    extra = ["--tokenizer-dir", str(tmp_path / "tokenizer")]
    if what == "not a checkpoint":
        for name in os.listdir(source):
            os.remove(source / name)
        (source / "notes.txt").write_text("hello")
    elif what == "missing meta":
        os.remove(source / f"meta_{STEP:06d}.json")
    elif what == "vocab mismatch":
        other = Tokenizer.train_from_iterator(iter(CHAT_TEXT), vocab_size=280)
        other.save(str(tmp_path / "other_tokenizer"))
        extra = ["--tokenizer-dir", str(tmp_path / "other_tokenizer")]
    elif what == "truncated":
        path = source / f"model_{STEP:06d}.pt"
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    return str(source), extra


@pytest.mark.parametrize("what, message", [
    ("not a checkpoint", r"source is not a nanochat checkpoint folder: it holds no model_<step>\.pt"),
    ("missing meta", r"meta_000060\.json is missing"),
    ("vocab mismatch", r"vocab_size 300 in .*meta_000060\.json disagrees with the \d+ tokens of .*tokenizer\.pkl"),
    ("truncated", r"model_000060\.pt could not be read .*truncated or corrupted"),
])
def test_bad_input_is_refused_and_nothing_is_written(base_dir, tmp_path, what, message):
    source, extra = _broken_copy(tmp_path, what)
    with pytest.raises(CheckpointError, match=message):
        import_nanochat.main([source, "--phase", "base", "--model-tag", "d2", *extra])
    phase_dir = os.path.join(str(base_dir), "base_checkpoints")
    assert not os.path.exists(phase_dir) or os.listdir(phase_dir) == []


def test_import_refuses_to_overwrite_and_leaves_the_existing_model(base_dir):
    import_nanochat.main([fixture_checkpoint("current"), "--phase", "base", "--model-tag", "d2"])
    with pytest.raises(CheckpointError, match="already exists"):
        import_nanochat.main([fixture_checkpoint("legacy"), "--phase", "base", "--model-tag", "d2"])
    assert load_model("base", "cpu", "d2")[0].config.smear


def test_tokenizer_pickle_naming_any_other_class_is_refused(tmp_path):
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(os.getcwd))  # names a function
    with pytest.raises(ValueError, match="may hold only a tiktoken Encoding"):
        Tokenizer.from_directory(str(tmp_path))


def _as_two_rank_shards(single: dict) -> list[dict]:
    """nanochat's single-rank optimizer state split the way its 2-rank run shards it: AdamW
    tensors of 1024+ elements by rows, Muon group stacks in chunks of ceil(K / 2) (zero-padded)."""
    shards = []
    for rank in range(2):
        state = {}
        for group in single["param_groups"]:
            ids = group["params"]
            if group["kind"] == "muon":
                chunk = -(-len(ids) // 2)
                entry = {}
                for key, stacked in single["state"][ids[0]].items():
                    padded = torch.cat([stacked, stacked.new_zeros(2 * chunk - len(ids), *stacked.shape[1:])])
                    entry[key] = padded[rank * chunk:(rank + 1) * chunk].clone()
                state[ids[0]] = entry
            else:
                for idx in ids:
                    entry = dict(single["state"][idx])
                    if entry["exp_avg"].numel() >= 1024:
                        rows = entry["exp_avg"].size(0) // 2
                        for key in ("exp_avg", "exp_avg_sq"):
                            entry[key] = entry[key][rank * rows:(rank + 1) * rows].clone()
                    state[idx] = entry
        shards.append({"state": state, "param_groups": single["param_groups"]})
    return shards


def test_optimizer_shards_of_several_ranks_are_merged_into_one(base_dir, tmp_path):
    source = tmp_path / "two_ranks"
    shutil.copytree(fixture_checkpoint("current"), source)
    single = torch.load(source / f"optim_{STEP:06d}_rank0.pt", weights_only=True)
    for rank, shard in enumerate(_as_two_rank_shards(single)):
        torch.save(shard, source / f"optim_{STEP:06d}_rank{rank}.pt")
    import_nanochat.main([fixture_checkpoint("current"), "--phase", "base", "--model-tag", "one"])
    import_nanochat.main([str(source), "--phase", "base", "--model-tag", "two",
                          "--tokenizer-dir", os.path.join(FIXTURES, "current", "tokenizer")])
    one = load_checkpoint(checkpoint_dir("base", "one"), STEP, "cpu", load_optimizer=True)[1]
    two = load_checkpoint(checkpoint_dir("base", "two"), STEP, "cpu", load_optimizer=True)[1]
    assert one["state"].keys() == two["state"].keys() and len(one["state"]) == len(list(
        load_model("base", "cpu", "one")[0].parameters()))
    for idx, state in one["state"].items():
        assert state.keys() == two["state"][idx].keys()
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(two["state"][idx][key]))


def test_a_downloaded_model_folder_with_everything_side_by_side_imports(base_dir, tmp_path):
    folder = tmp_path / "nanochat-d2"  # as a Hugging Face model repository holds the files
    folder.mkdir()
    for name in (f"model_{STEP:06d}.pt", f"meta_{STEP:06d}.json"):
        shutil.copy(os.path.join(fixture_checkpoint("legacy"), name), folder)
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        shutil.copy(os.path.join(FIXTURES, "legacy", "tokenizer", name), folder)
    import_nanochat.main([str(folder), "--phase", "sft", "--model-tag", "d2"])
    model, tokenizer, _ = load_model("sft", "cpu", "d2")
    assert tokenizer.get_vocab_size() == model.config.vocab_size == 300
    assert sorted(os.listdir(os.path.join(checkpoint_dir("sft", "d2"), "tokenizer"))) == ["token_bytes.pt",
                                                                                          "tokenizer.pkl"]
