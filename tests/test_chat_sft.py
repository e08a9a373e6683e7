"""Tests of supervised fine-tuning (ray_jobs/chat_sft.py) on a tiny base checkpoint.

tests.tiny's random depth-2 GPT is saved as a base checkpoint whose meta records the base run's
batch and learning rates, as base_train writes them; chat_sft trains it on the offline mixture
through the session's local Ray:

    straight   6 steps, checkpoints at steps 3 and 6
    resumed    the same run, but its worker dies at step 4 with no restarts allowed, so the run
               stops with its newest checkpoint at step 3; then `--resume` finishes it

The straight run must lower the validation loss (assistant tokens only), export a checkpoint
that load_model("sft") reads back with the same loss, and record its report-card section. The
offline mixture is deterministic and a resumed run replays its data stream to the checkpoint's
step, so the resumed run must end with the straight run's weights. Two quick tests check on the
real renderer and packer that system/user tokens and padding are never targets.
"""

import contextlib
import os

import pytest
import torch

from nanochat.chat_packing import pack_conversations
from nanochat.checkpoint import find_last_step, load_model
from nanochat.common import get_base_dir
from nanochat.report import Report
from ray_jobs.chat_sft import _train_batches, build_mixture, main, validation_rows
from tests.tiny import save_tiny_checkpoint

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
def tokenizer(tmp_path_factory):
    _, tokenizer = save_tiny_checkpoint("base", MODEL_TAG, str(tmp_path_factory.mktemp("sft_tok")),
                                        sequence_len=SEQ_LEN, meta=BASE_META)
    return tokenizer


@pytest.fixture(scope="module")
def straight(ray_local, tokenizer):
    return main(FLAGS + ["--run-name", "sft_straight"])


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
