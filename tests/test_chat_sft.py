"""Tests of supervised fine-tuning (ray_jobs/chat_sft.py) on a tiny base checkpoint.

tests.tiny's random depth-2 GPT, after one optimizer step, is saved as a base checkpoint whose
meta records the base run's batch and learning rates and which keeps its (1-rank) optimizer
shard, as base_train writes them; chat_sft trains it on the offline mixture through the
session's local Ray, its optimizer starting from that shard:

    straight   6 steps, checkpoints at steps 3 and 6
    resumed    the same run, but its worker dies at step 4 with no restarts allowed, so the run
               stops with its newest checkpoint at step 3; then `--resume` finishes it

The straight run must lower the validation loss (assistant tokens only), export a checkpoint
that load_model("sft") reads back with the same loss, and record its report-card section. The
offline mixture is deterministic and a resumed run replays its data stream to the checkpoint's
step, so the resumed run must end with the straight run's weights. Two quick tests check on the
real renderer and packer that system/user tokens and padding are never targets.

nanochat's recipe, checked without a run where possible: `--mixture real` is its mixture (the
tasks replaced by stand-ins that need no download); the learning rates are the base run's flags
times --init-lr-frac, whatever the batch; the optimizer starts from the base checkpoint's shards
(momentum buffers kept, SFT's own learning rates, momentum and weight decay) and starts fresh with
a warning when the checkpoint has none or was sharded over another worker count; Muon's momentum
rises from 0.85 to 0.95 over 300 steps; base_train's export keeps every rank's optimizer shard.
"""

import collections
import contextlib
import dataclasses
import os
import types

import pytest
import ray.train
import torch

from nanochat import tasks
from nanochat.chat_packing import pack_conversations
from nanochat.checkpoint import (checkpoint_dir, find_last_step, load_checkpoint, load_model, load_optimizer_shard,
                                 save_checkpoint)
from nanochat.files import get_base_dir
from nanochat.report import Report
from nanochat.tasks import Task
from ray_jobs.chat_sft import (_train_batches, build_mixture, main, optimizer_warm_start, parse_args, resolve_config,
                               validation_rows, warm_start_optimizer)
from ray_jobs.train_common import export_final_model
from tests.tiny import random_gpt, save_tiny_checkpoint

MODEL_TAG = "sft_test_d2"
SEQ_LEN = 96
STEPS = 6
# The base run's settings chat_sft inherits: 2 rows of 96 tokens per step, and learning rates
# that move a tiny model within a few steps.
BASE_META = {"user_config": {"device_batch_size": 2, "embedding_lr": 2.0, "unembedding_lr": 0.4,
                             "matrix_lr": 0.5, "scalar_lr": 5.0},
             "horizon": {"total_batch_size": 2 * SEQ_LEN}}
FLAGS = ["--model-tag", MODEL_TAG, "--mixture", "offline", "--num-iterations", str(STEPS), "--eval-every", "-1",
         "--eval-tokens", str(4 * SEQ_LEN), "--save-every", "3", "--compile", "off"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(tokenizer, optimizer) of the base checkpoint: the tiny model after one step on a random
    batch, saved with that step's optimizer state (momentum buffers and Adam moments)."""
    tokenizer_dir = str(tmp_path_factory.mktemp("sft_tok"))
    model, tokenizer = save_tiny_checkpoint("base", MODEL_TAG, tokenizer_dir, sequence_len=SEQ_LEN, meta=BASE_META)
    optimizer = model.setup_optimizer(matrix_lr=0.01, embedding_lr=0.01, unembedding_lr=0.001, scalar_lr=0.01)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    model(x, x).backward()
    optimizer.step()
    save_checkpoint(checkpoint_dir("base", MODEL_TAG), 0, model.state_dict(),
                    {"model_config": dataclasses.asdict(model.config), **BASE_META},
                    optimizer_state=optimizer.state_dict(), tokenizer_dir=tokenizer_dir)
    return tokenizer, optimizer


@pytest.fixture(scope="module")
def tokenizer(base):
    return base[0]


@pytest.fixture(scope="module")
def straight(ray_local, tokenizer):
    return main(FLAGS + ["--run-name", "sft_straight"])


class StandIn(Task):
    """A task of `size` one-turn conversations that say which task and split they stand in for."""

    def __init__(self, name: str, split: str, size: int = 10000, **view):
        super().__init__(**view)
        self.name, self.split, self.size = name, split, size

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}],
                "source": (self.name, self.split)}


def _mixture_counts(monkeypatch, name: str, split: str) -> dict:
    for task_name in tasks.TASKS:
        monkeypatch.setitem(tasks.TASKS, task_name, lambda split, _n=task_name, **kw: StandIn(_n, split, **kw))
    return collections.Counter(conversation["source"] for conversation in build_mixture(name, split))


def test_the_real_mixture_is_nanochats(monkeypatch):
    # SmolTalk once, MMLU's auxiliary train set ("train") 3 times, GSM8K 4 times; nothing else
    assert _mixture_counts(monkeypatch, "real", "train") == {
        ("smoltalk", "train"): 10000, ("mmlu", "train"): 3 * 10000, ("gsm8k", "train"): 4 * 10000}
    assert _mixture_counts(monkeypatch, "real", "val") == {
        ("smoltalk", "test"): 10000, ("mmlu", "test"): 5200, ("gsm8k", "test"): 420}
    # the seed's mixture keeps its own name, with SpellingBee and identity
    seed = _mixture_counts(monkeypatch, "seed", "train")
    assert seed[("mmlu", "train")] == 10000 and seed[("gsm8k", "train")] == 2 * 10000
    assert seed[("spellingbee", "train")] > 0 and seed[("identity", "train")] == 2 * 10000


def test_learning_rates_are_the_base_runs_flags_whatever_the_batch(tokenizer):
    for total_batch in (2 * SEQ_LEN, 8 * SEQ_LEN):  # the base run's batch, and 4 times it
        cfg, _ = resolve_config(parse_args(FLAGS + ["--total-batch-size", str(total_batch), "--use-gpu", "off"]))
        assert cfg["total_batch_size"] == total_batch
        assert cfg["lrs"] == {name: BASE_META["user_config"][name] for name in cfg["lrs"]}
        assert "lr_batch_scale" not in cfg


def test_sft_starts_from_the_base_optimizer_state_with_its_own_hyperparameters(base, tokenizer):
    _, base_optimizer = base
    assert resolve_config(parse_args(FLAGS + ["--use-gpu", "off"]))[0]["warm_start_optimizer"]
    assert not resolve_config(parse_args(FLAGS + ["--use-gpu", "off", "--load-optimizer", "0"]))[0][
        "warm_start_optimizer"]

    model = random_gpt(tokenizer.get_vocab_size(), sequence_len=SEQ_LEN)
    optimizer = model.setup_optimizer(matrix_lr=0.3, embedding_lr=0.7)
    for group in optimizer.param_groups:
        if group["kind"] == "muon":
            group["momentum"] = 0.85
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    warm_start_optimizer(optimizer, load_optimizer_shard(checkpoint_dir("base", MODEL_TAG), 0, 0, "cpu"))
    assert [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups] == fresh
    saved = list(base_optimizer.state.values())
    loaded = list(optimizer.state.values())
    assert len(loaded) == len(saved) > 0
    for ours, theirs in zip(loaded, saved):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(theirs[key])) for key in ours)


def test_a_fresh_optimizer_is_announced_with_the_reason():
    assert optimizer_warm_start({"optimizer_shards": 2}, True, 2)[0]
    fresh_reasons = [optimizer_warm_start({"optimizer_shards": 0}, True, 1),  # e.g. an imported model
                     optimizer_warm_start({}, True, 1),  # a meta older than shard records
                     optimizer_warm_start({"optimizer_shards": 8}, True, 2),
                     optimizer_warm_start({"optimizer_shards": 1}, False, 1)]
    assert not any(warm for warm, _ in fresh_reasons)
    assert "no optimizer shards" in fresh_reasons[0][1] and "--num-workers 8" in fresh_reasons[2][1]
    assert "--load-optimizer 0" in fresh_reasons[3][1]


def test_base_export_keeps_every_ranks_optimizer_shard(tmp_path, monkeypatch, tokenizer):
    tokenizer_dir = os.path.join(checkpoint_dir("base", MODEL_TAG), "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base_dir"))  # the exports stay out of the session's
    model = random_gpt(tokenizer.get_vocab_size(), sequence_len=SEQ_LEN)
    run_step = str(tmp_path / "step_000004")
    shards = [{"state": {}, "param_groups": [], "rank": rank} for rank in range(2)]
    for rank in (1, 0):
        save_checkpoint(run_step, 4, model.state_dict() if rank == 0 else None,
                        {"model_config": dataclasses.asdict(model.config)} if rank == 0 else None,
                        optimizer_state=shards[rank], rank=rank, world_size=2)
    result = types.SimpleNamespace(checkpoint=ray.train.Checkpoint.from_directory(run_step))
    for phase, tag in (("base", "sft_test_export"), ("sft", "sft_test_export")):
        exported = export_final_model(result, {"phase": phase, "model_tag": tag, "tokenizer_dir": tokenizer_dir})
        _, _, meta = load_checkpoint(exported, 4, "cpu")
        if phase == "base":
            assert meta["optimizer_shards"] == 2
            assert [load_optimizer_shard(exported, 4, rank, "cpu")["rank"] for rank in (0, 1)] == [0, 1]
        else:  # later stages' optimizer state stays in the run's storage
            assert meta["optimizer_shards"] == 0


def test_assistant_tokens_are_the_only_targets(tokenizer):
    conversation = {"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "What is 7 + 5?"},
                                 {"role": "assistant", "content": "It is 12."}]}
    ids, mask = tokenizer.render_conversation(conversation)
    answer = tokenizer.encode("It is 12.") + [tokenizer.encode_special("<|assistant_end|>")]
    assert ids[-len(answer):] == answer and mask == [0] * (len(ids) - len(answer)) + [1] * len(answer)
    [(inputs, targets)] = pack_conversations([(ids, mask)], row_len=len(ids) + 6, pad_id=tokenizer.get_bos_token_id())
    assert inputs.tolist()[:len(ids)] == ids
    # system and user text, the special tokens around them and the 6 padding tokens are never targets
    assert targets.tolist() == [-1] * (len(ids) - len(answer) - 1) + answer + [-1] * 6


def test_training_rows_target_only_assistant_tokens(tokenizer):
    mixture = build_mixture("offline", "train")
    x, y = next(_train_batches(mixture, tokenizer, SEQ_LEN + 1, 4, 0, 1, torch.device("cpu")))
    assert x.shape == y.shape == (4, SEQ_LEN)
    user_start, user_end = tokenizer.encode_special("<|user_start|>"), tokenizer.encode_special("<|user_end|>")
    inside_user = (torch.cumsum((x == user_start).int() - (x == user_end).int(), dim=1) > 0)
    assert (inside_user.sum() > 0) and (y[inside_user] == -1).all()  # no target inside a user turn
    assert (y >= 0).any()
    kept = y[:, :-1] >= 0
    assert torch.equal(y[:, :-1][kept], x[:, 1:][kept])  # a kept target is the next input token


def test_a_few_steps_lower_the_masked_loss_and_the_export_loads(straight, tokenizer):
    history = straight["history"]
    assert [r["step"] for r in history if "loss" in r] == list(range(1, STEPS + 1))
    assert straight["config"]["warm_start_optimizer"] and history[0]["optimizer_from_base"]  # the worker loaded it
    # Muon's momentum rises from 0.85 by 0.1 / 300 a step (nanochat's SFT ramp)
    assert [r["muon_momentum"] for r in history if "loss" in r] == pytest.approx(
        [0.85 + 0.1 * step / 300 for step in range(STEPS)])
    val_before, val_after = history[0]["val_loss"], straight["val_loss"]
    assert val_after < 0.8 * val_before, (val_before, val_after)
    assert straight["checkpoint_dir"].endswith(os.path.join("chatsft_checkpoints", MODEL_TAG))
    assert find_last_step(straight["checkpoint_dir"]) == STEPS

    model, loaded_tokenizer, meta = load_model("sft", "cpu", model_tag=MODEL_TAG)
    assert loaded_tokenizer.encode("It is 12.") == tokenizer.encode("It is 12.")
    assert meta["base_model"].endswith(os.path.join("base_checkpoints", MODEL_TAG))
    rows = torch.from_numpy(validation_rows(build_mixture("offline", "val"), tokenizer, SEQ_LEN + 1, 4))
    with torch.no_grad():
        loss = model(rows[:, 0], rows[:, 1], loss_reduction="sum") / (rows[:, 1] >= 0).sum()
    assert float(loss) == pytest.approx(val_after, rel=1e-4)  # the trainer's val loss, from the export

    [section] = [s for s in Report().sections() if s["stage"] == "chat_sft"]
    assert section["source"] == "sft" and section["metrics"]["val_loss"] == val_after
    assert section["metrics"]["train_loss"] == history[-2]["loss"]  # the last step's, before the final eval
    assert section["timings"]["wall_s"] > 0 and section["history"][0]["time"] == 0


def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_run(straight, capsys):
    flags = FLAGS + ["--run-name", "sft_resumed"]
    with pytest.raises(SystemExit):
        main(flags + ["--fail-at-step", "4", "--max-failures", "0"])
    assert "rerun with --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(flags)  # a run with checkpoints is continued only when asked to
    assert "--resume" in capsys.readouterr().err
    # Ray keeps its own record of a run's checkpoints, which misses one whose worker died right
    # after reporting it; the resume must come from the newest checkpoint in storage all the same.
    with contextlib.suppress(FileNotFoundError):  # absent when Ray took no report of the run at all
        os.remove(os.path.join(get_base_dir(), "ray_runs", "sft_resumed", "checkpoint_manager_snapshot.json"))
    resumed = main(flags + ["--resume"])
    history = resumed["history"]
    restored = [i for i, r in enumerate(history) if r.get("restored_from_checkpoint")]
    assert [history[i]["step"] for i in restored] == [3]
    assert [r["step"] for r in history[:restored[0]] if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in history[restored[0]:] if "loss" in r] == [4, 5, 6]
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-6)
