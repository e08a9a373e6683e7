"""Tests of RL: the pure parts (nanochat/rl.py), the rollout fleet on a 3-node cluster, and the
whole job (ray_jobs/chat_rl.py) with a tiny model.

- pure: advantages are rewards minus the group mean; the batch masks the prompt, the tool output
  and the padding with -1; each completion's weight is nanochat's normalisation (advantage over
  its pass's tokens x passes x prompts), checked against a hand-computed example on which the
  seed's whole-step token normalisation gives other weights; the loss is the weighted policy
  gradient, and a step on it makes a rewarded completion likelier; a fixed test policy (answers scripted per sample) is scored by
  the arithmetic task's reward, right and wrong answers as they should be.
- cluster: `ray.cluster_utils.Cluster` with three 1-CPU nodes on this machine. The cluster needs a
  driver of its own and this process may already be connected to the session's `ray_local`, so
  its checks run in a subprocess (`python -m tests.test_chat_rl OUT.json`, the code at the end of
  this file) that writes what it saw to a JSON file; the tests assert on that. Checked: the
  rollout workers land on three nodes; after a sync every worker's weights are bit-identical to
  the learner's; a worker holding older weights has its rollouts rejected and sampled again; a
  node removed in the middle of a step costs its worker, which is replaced, and the step
  completes with the same groups an undisturbed step gives; the workers' rewards are the task's.
  The same over the collective weight sync (gloo standing in for NCCL), on a fleet of its own:
  bit-identical weights and the versions the workers say they hold, one group generation while
  the members stay, a stale worker caught up over a generation of its own, and a worker killed
  in a broadcast (after the group's rendezvous) costing about one timeout: it is replaced, the
  living get the weights again, and the replacement rejoins over a new generation.
- job: main() on the session's local Ray (two learner ranks, two rollout workers), three RL steps
  on a task a random model half passes, three times: straight; with the learner's rank 0 (the
  rollout fleet's owner) killed right after the step-2 checkpoint (--fail-at-step, fault
  injection) and restarted by Ray Train (--max-failures 1); with the other rank killed there and
  no restarts allowed, so the run stops with how to resume, then --resume. Rollouts are seeded
  by (step, prompt) and the learner is deterministic on CPUs, so both crashed runs must end as
  the straight one: the same reward and loss at every step, the same pass@1 and pass@k, the same
  weights to the bit. The killed rank 0's rollout placement group must not outlive it. Also the
  steps, export, history and report section. The cluster subprocess is started first and runs
  meanwhile. The weight sync benchmark at depth 1 on the same Ray.
"""

import contextlib
import functools
import io
import json
import math
import os
import sys

import pytest
import torch

from nanochat.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from nanochat.engine import Engine
from nanochat.files import get_base_dir
from nanochat.rl import (group_advantages, group_seed, pass_at_k, policy_gradient_loss, rollout_rows, rows_to_batch,
                         sample_group, trained_tokens)
from nanochat.tasks import Arithmetic, Task
from nanochat.tasks.common import extract_final_answer, last_assistant_text
from nanochat.tokenizer import Tokenizer
from ray_jobs.train_common import latest_run_checkpoint
from tests.cluster_driver import start_driver
from tests.tiny import CHAT_TEXT, random_gpt

MODEL_TAG = "chat_rl_test_d2"
SEQUENCE_LEN = 256
# The job's runs: RL steps, and the step whose checkpoint a learner rank dies right after.
RL_STEPS = 3
CRASH_STEP = 2
# The collective weight sync's timeout in the cluster checks: what a broadcast with a dead member costs.
COLLECTIVE_TIMEOUT_S = 8.0


class EvenLength(Task):
    """A generative task that a random model passes about half the time: the reward is 1 when the
    answer has an even number of characters."""

    eval_type = "generative"

    def __init__(self, size: int = 16, **view):
        super().__init__(**view)
        self.size = size

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Say something, number {index}."},
                             {"role": "assistant", "content": "ok"}]}

    def evaluate(self, conversation: dict, answer: str) -> bool:
        return len(answer) % 2 == 0


def _tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(CHAT_TEXT), 300)


# ---------------------------------------------------------------- pure parts


def test_advantages_are_rewards_minus_the_group_mean():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1.0, 0.0, 0.0, 0.0]) == [0.75, -0.25, -0.25, -0.25]
    assert group_advantages([1.0, 1.0]) == [0.0, 0.0]
    with pytest.raises(ValueError):
        group_advantages([])


def test_batch_masks_prompt_tool_output_and_padding_and_skips_groups_that_teach_nothing():
    # prompt [5, 6]; the first completion has a forced tool output token (8, mask 0) in the middle
    groups = [{"sequences": [[5, 6, 7, 8, 9], [5, 6, 9]], "masks": [[0, 0, 1, 0, 1], [0, 0, 1]], "rewards": [1.0, 0.0]},
              {"sequences": [[5, 1, 2]], "masks": [[0, 1, 0]], "rewards": [1.0]}]  # one sample: advantage 0
    rows = rollout_rows(groups, samples_per_pass=8, prompts_per_rank=1)
    # one pass per group: advantage / (the pass's 3 trained tokens x 1 pass x 1 prompt)
    assert [weight for _, _, weight in rows] == [0.5 / 3, -0.5 / 3]
    assert len(rollout_rows(groups, 8, 1, skip_zero_advantage=False)) == 3
    inputs, targets, weights = rows_to_batch(rows, pad_id=99)
    assert inputs.tolist() == [[5, 6, 7, 8], [5, 6, 9, 99]]
    # target t is token t+1, kept only where that token was sampled; the short row's padding is -1
    assert targets.tolist() == [[-1, 7, -1, 9], [-1, 9, -1, -1]]
    assert weights.tolist() == pytest.approx([0.5 / 3, -0.5 / 3])
    assert trained_tokens(groups[0]["masks"]) == 2 + 1


def _completion(trained: int) -> tuple[list[int], list[int]]:
    """A prompt of 2 tokens and `trained` sampled ones: (tokens, mask)."""
    return [1, 2] + [3] * trained, [0, 0] + [1] * trained


def test_each_pass_is_normalised_by_its_own_tokens_then_by_passes_and_prompts():
    # One prompt, 4 completions of 1, 3, 6 and 2 sampled tokens, rewards 1, 0, 0, 1 (advantages
    # +-0.5), 2 completions per pass, and a second prompt whose completions all failed.
    sequences, masks = zip(*(_completion(n) for n in (1, 3, 6, 2)))
    group = {"sequences": list(sequences), "masks": list(masks), "rewards": [1.0, 0.0, 0.0, 1.0]}
    failed = {"sequences": list(sequences), "masks": list(masks), "rewards": [0.0] * 4}
    rows = rollout_rows([group, failed], samples_per_pass=2, prompts_per_rank=2)
    # pass 1 has 1 + 3 = 4 tokens, pass 2 has 6 + 2 = 8; 2 passes per prompt, 2 prompts:
    # weights 0.5 / (4 * 2 * 2) = 1/32 and 0.5 / (8 * 2 * 2) = 1/64
    assert [weight for _, _, weight in rows] == [1 / 32, -1 / 32, -1 / 64, 1 / 64]
    # The seed's rule, the step's sum over all its 2 x 12 sampled tokens, would weigh them all alike:
    # 0.5 / 24 = 1/48. Here the short pass's tokens weigh twice the long pass's.
    assert 1 / 48 not in [abs(weight) for _, _, weight in rows]
    # Two ranks, each with one of the prompts (prompts_per_rank 1), sum after the optimizer's
    # average over ranks to the same gradient: each rank's weights are twice the single rank's.
    assert [w for _, _, w in rollout_rows([group], 2, 1)] == [2 * w for _, _, w in rows]
    # a pass is at most samples_per_pass completions: with 4 per pass, one pass of 12 tokens
    assert [w for _, _, w in rollout_rows([group], 4, 1)] == [0.5 / 12, -0.5 / 12, -0.5 / 12, 0.5 / 12]


def test_loss_is_the_token_normalised_policy_gradient_and_a_step_favours_the_rewarded_completion():
    model = random_gpt(64, sequence_len=16, seed=1).train()
    rows = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 1], 0.2), ([1, 2, 6, 7], [0, 0, 1, 1], -0.2)]
    inputs, targets, weights = rows_to_batch(rows, pad_id=0)
    loss = policy_gradient_loss(model, inputs, targets, weights)
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs), dim=-1)
        expected = 0.0
        for row, (tokens, mask, weight) in enumerate(rows):
            for t in range(1, len(tokens)):
                if mask[t]:
                    expected -= weight * float(logp[row, t - 1, tokens[t]])
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-5)

    def logprob_of(row):
        with torch.no_grad():
            return -float(model(inputs[row:row + 1], targets[row:row + 1], loss_reduction="sum"))

    before = [logprob_of(0), logprob_of(1)]
    loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= 0.05 * parameter.grad
    assert logprob_of(0) > before[0]  # rewarded: likelier
    assert logprob_of(1) < before[1]  # below the mean: less likely


class ScriptedPolicy:
    """A fixed test policy: sample i of the prompt answers with texts[i]."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer, self.texts = tokenizer, texts

    def generate_batch(self, tokens, num_samples, **kwargs):
        sequences = [list(tokens) + self.tokenizer.encode(text) for text in self.texts[:num_samples]]
        masks = [[0] * len(tokens) + [1] * (len(s) - len(tokens)) for s in sequences]
        return sequences, masks


def test_rewards_of_a_fixed_test_policy_are_the_tasks_answers_checked():
    tokenizer = _tiny_tokenizer()
    task = Arithmetic("test", size=3)
    groups = []
    for index in range(len(task)):
        right = extract_final_answer(last_assistant_text(task[index]))
        texts = [f"It is {right}.\n#### {right}", f"#### {int(right) + 1}", "I do not know.", f"#### {right}"]
        group = sample_group(ScriptedPolicy(tokenizer, texts), task, index, num_samples=4, max_new_tokens=32,
                             temperature=1.0, top_k=None, seed=0)
        groups.append(group)
        assert group["rewards"] == [1.0, 0.0, 0.0, 1.0]
        assert group_advantages(group["rewards"]) == [0.5, -0.5, -0.5, 0.5]
        assert group["prompt_len"] == len(tokenizer.render_for_completion(task[index]))
        assert group["generated_tokens"] == sum(len(tokenizer.encode(text)) for text in texts)
    assert pass_at_k(groups) == {"pass@1": 0.5, "pass@k": 1.0, "k": 4}


def test_the_rl_reward_matches_answers_exactly_as_nanochat_and_the_eval_default_do():
    from ray_jobs import chat_rl
    tasks = chat_rl.rl_tasks("arithmetic")
    assert [tasks[split].answer_matching for split in ("train", "test")] == ["exact", "exact"]
    problem = tasks["train"][0]
    right = last_assistant_text(problem).rsplit("#### ", 1)[1]
    assert tasks["train"].reward(problem, f"#### {right}") == 1.0
    assert tasks["train"].reward(problem, f"#### {right}.0") == 0.0  # an equal number, another string


def test_group_seeds_differ_by_step_and_prompt():
    seeds = {group_seed(42, step, index) for step in range(50) for index in range(50)}
    assert len(seeds) == 2500
    assert group_seed(42, 3, 7) == group_seed(42, 3, 7)


# ---------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def cluster_driver(tmp_path_factory):
    """The subprocess that runs the 3-node cluster checks (tests.cluster_driver). Started before
    the job's runs (rl_runs asks for it) so that the two overlap."""
    driver = start_driver("tests.test_chat_rl", tmp_path_factory.mktemp("chat_rl_cluster"))
    yield driver
    driver.kill()


@pytest.fixture(scope="module")
def rl_runs(ray_local, cluster_driver, tmp_path_factory):
    """Three RL runs of three steps from a tiny random 'SFT' checkpoint on EvenLength, with two
    learner ranks and two rollout workers: 'straight'; 'restarted', whose rank 0 (the owner of the
    rollout fleet) dies right after the step-2 checkpoint and which Ray Train restarts
    (--max-failures 1); 'resumed', whose other rank dies there with no restarts allowed, so the run
    stops ('stopped_error' is what it printed), then --resume. The exported weights of each run,
    the step-2 checkpoint of the stopped one, and the placement groups each run left."""
    from ray.util import placement_group_table

    from ray_jobs import chat_rl

    tokenizer = _tiny_tokenizer()
    tokenizer_dir = str(tmp_path_factory.mktemp("chat_rl_tokenizer"))
    tokenizer.save(tokenizer_dir)
    model = random_gpt(tokenizer.get_vocab_size(), sequence_len=SEQUENCE_LEN, seed=2)
    save_checkpoint(checkpoint_dir("sft", MODEL_TAG), 5, model.state_dict(), {"model_config": model.config_dict()},
                    tokenizer_dir=tokenizer_dir)
    patch = pytest.MonkeyPatch()
    patch.setattr(chat_rl, "rl_tasks", lambda name: {"train": EvenLength(16), "test": EvenLength(8)})
    flags = ["--model-tag", MODEL_TAG, "--task", "arithmetic", "--examples-per-step", "4", "--num-samples", "4",
             "--max-new-tokens", "12", "--eval-every", "2", "--eval-examples", "4", "--eval-k", "2",
             "--num-workers", "2", "--num-rollout-workers", "2", "--rollout-cpus", "0.25", "--cpus-per-worker", "0.5",
             "--save-every", "1", "--init-lr-frac", "1.0", "--num-steps", str(RL_STEPS)]
    crash = ["--fail-at-step", str(CRASH_STEP)]

    def live_placement_groups() -> set:
        return {pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"}

    runs, weights, leftover = {}, {}, {}
    try:
        for name, extra in [("straight", ["--max-failures", "0"]),
                            ("restarted", crash + ["--fail-rank", "0", "--max-failures", "1"])]:
            before = live_placement_groups()
            runs[name] = chat_rl.main(flags + extra + ["--run-name", f"rl_{name}"])
            weights[name] = load_checkpoint(checkpoint_dir("rl", MODEL_TAG), RL_STEPS, "cpu")[0]
            leftover[name] = live_placement_groups() - before
        resumed = flags + ["--run-name", "rl_resumed", "--max-failures", "0"]
        stderr = io.StringIO()
        with pytest.raises(SystemExit), contextlib.redirect_stderr(stderr):
            chat_rl.main(resumed + crash)
        path, _ = latest_run_checkpoint(os.path.join(get_base_dir(), "ray_runs"), "rl_resumed")
        weights["at_crash"] = load_checkpoint(path, CRASH_STEP, "cpu")[0]
        runs["resumed"] = chat_rl.main(resumed + crash + ["--resume"])
        weights["resumed"] = load_checkpoint(checkpoint_dir("rl", MODEL_TAG), RL_STEPS, "cpu")[0]
    finally:
        patch.undo()
    return {**runs, "weights": weights, "leftover_placement_groups": leftover, "stopped_error": stderr.getvalue()}


def _outcomes(run: dict) -> dict:
    """What a run's steps came to: each step's mean reward and loss, each evaluation's pass@1 and pass@k."""
    history = run["history"]
    return {"steps": [(entry["step"], entry["reward"], entry["loss"]) for entry in history if "reward" in entry],
            "evals": [(entry["step"], entry["pass_at_1"], entry["pass_at_k"]) for entry in history
                      if "pass_at_k" in entry],
            "final": (run["mean_reward"], run["pass@1"], run["pass@k"])}


def test_rl_job_steps_reports_and_exports(rl_runs):
    straight = rl_runs["straight"]
    steps = [entry for entry in straight["history"] if "reward" in entry]
    assert [entry["step"] for entry in steps] == list(range(RL_STEPS))
    for entry in steps:
        assert entry["version_lag"] == 0 and entry["stale_rejected"] == 0
        for key in ("rollout_seconds", "sync_seconds", "update_seconds", "rollout_tokens_per_second"):
            assert entry[key] > 0
    evals = [entry for entry in straight["history"] if "pass_at_k" in entry]
    assert [entry["step"] for entry in evals] == [0, 2, RL_STEPS]
    assert straight["pass@k"] == evals[-1]["pass_at_k"] and straight["mean_reward"] == steps[-1]["reward"]
    assert not any(entry.get("restored_from_checkpoint") for entry in straight["history"])


def test_rl_job_records_its_stage_with_the_reward_history(rl_runs):
    from nanochat.report import Report

    section = next(s for s in Report().sections() if s["stage"] == "chat_rl")
    assert section["source"] == "rl"
    # the last run logged is the resumed one: its section holds the whole run, the steps before the crash too
    assert [entry["step"] for entry in section["history"] if "reward" in entry] == list(range(RL_STEPS))
    assert set(section["metrics"]) >= {"mean_reward", "pass@k"}
    assert all(section["timings"][key] > 0 for key in ("wall_s", "rollout_s", "update_s", "sync_s"))


@pytest.mark.parametrize("run", ["restarted", "resumed"])
def test_a_learner_crashed_at_a_step_continues_from_its_checkpoint_to_the_straight_runs_outcome(rl_runs, run):
    """Rollouts are seeded by (seed, step, prompt) and the learner is deterministic on CPUs, so a
    run that restores the step-2 checkpoint (weights and optimizer state) samples the same groups
    and takes the same steps as the straight run: equal rewards, losses, pass@k and weights, to the bit."""
    history = rl_runs[run]["history"]
    restored = [entry["step"] for entry in history if entry.get("restored_from_checkpoint")]
    assert restored == [CRASH_STEP]
    assert _outcomes(rl_runs[run]) == _outcomes(rl_runs["straight"])
    straight, crashed = rl_runs["weights"]["straight"], rl_runs["weights"][run]
    assert set(crashed) == set(straight)
    assert [name for name in straight if not torch.equal(crashed[name], straight[name])] == []
    # the steps after the crash moved the weights, so their equality is not that of the checkpoint
    assert any(not torch.equal(rl_runs["weights"]["at_crash"][name], straight[name]) for name in straight)


def test_a_learner_crash_without_restarts_stops_the_run_with_how_to_resume(rl_runs):
    error = rl_runs["stopped_error"]
    assert "chat_rl: training failed after 0 restart(s)" in error and "rerun with --resume" in error


def test_a_restarted_run_leaves_no_rollout_workers_behind(rl_runs):
    """The crashed attempt's rollout fleet (its actors and their placement group) is gone: a
    placement group left behind would hold its CPUs for the rest of the session."""
    assert rl_runs["leftover_placement_groups"] == {"straight": set(), "restarted": set()}


def test_bad_flags_are_refused_with_the_reason(capsys):
    from ray_jobs.chat_rl import parse_args

    for argv, reason in [(["--num-samples", "1"], "advantages are rewards minus the mean"),
                         (["--temperature", "0"], "RL needs sampled completions"),
                         (["--rollout-wait-s", "0"], "--rollout-wait-s must be a positive number of seconds"),
                         (["--weight-sync", "nccl"], "invalid choice: 'nccl'"),
                         (["--weight-sync-timeout-s", "0"], "--weight-sync-timeout-s must be a positive number")]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert reason in capsys.readouterr().err


def test_weight_sync_is_the_collective_on_gpus_the_object_store_on_cpus_and_impossible_choices_are_refused():
    from ray_jobs.chat_rl import parse_args
    from ray_jobs.weight_sync import resolve_weight_sync

    assert resolve_weight_sync("auto", learner_on_gpu=True, rollout_on_gpu=True) == "collective"
    assert resolve_weight_sync("auto", learner_on_gpu=False, rollout_on_gpu=False) == "object-store"
    assert resolve_weight_sync("auto", learner_on_gpu=True, rollout_on_gpu=False) == "object-store"
    assert resolve_weight_sync("collective", learner_on_gpu=False, rollout_on_gpu=False) == "collective"  # gloo
    assert resolve_weight_sync("object-store", learner_on_gpu=True, rollout_on_gpu=True) == "object-store"
    with pytest.raises(ValueError, match="learner is on GPUs and the rollout workers on CPUs"):
        resolve_weight_sync("collective", learner_on_gpu=True, rollout_on_gpu=False)
    assert parse_args([]).weight_sync == "auto"


def test_weight_sync_benchmark_times_both_paths_and_ends_with_its_result_line(ray_local, capsys):
    from ray_jobs import bench_weight_sync

    result = bench_weight_sync.main(["--depth", "1", "--vocab-size", "512", "--repeats", "1"])
    assert result["parameters"] > 0
    for path in ("object-store", "collective"):
        assert result[path]["sync_seconds"] > 0 and result[path]["first_seconds"] > 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT weight_sync_collective_seconds_d1 ") and last.split()[-1] in ("PASS", "FAIL")


# ---------------------------------------------------------------- 3-node cluster (subprocess)


@pytest.fixture(scope="module")
def cluster_report(cluster_driver):
    return cluster_driver.report(timeout_s=240)


def test_rollout_workers_land_on_three_nodes(cluster_report):
    assert cluster_report["num_nodes"] == 3
    assert len(set(cluster_report["worker_nodes"])) == 3


def test_weights_after_a_sync_are_bit_identical_to_the_learners(cluster_report):
    assert cluster_report["bit_identical"] == [True, True, True]
    # and the sync really changed them: the published weights differ from the first ones
    assert cluster_report["second_weights_differ"]


def test_rollouts_of_stale_weights_are_rejected_and_sampled_again(cluster_report):
    stale = cluster_report["stale"]
    assert stale["stale_rejected"] >= 1
    assert stale["versions"] == [2] * stale["num_groups"]
    # every group, the rejected ones included, is what the current weights sample
    assert stale["equal_to_local_current_policy"]


def test_a_node_removed_in_the_middle_of_a_step_costs_a_worker_and_the_step_completes(cluster_report):
    removal = cluster_report["node_removal"]
    assert removal["done_before_removal"] < removal["num_groups"]
    assert removal["replaced"] >= 1
    assert removal["completed"] == removal["num_groups"]
    assert removal["versions"] == [removal["version"]] * removal["num_groups"]
    # the prompts of the lost worker were sampled elsewhere with their own seeds: same groups
    assert removal["same_as_undisturbed_step"]
    assert removal["step_after_removal_completed"]
    assert len(removal["worker_nodes_after"]) == 3 and removal["removed_node"] not in removal["worker_nodes_after"]
    assert set(removal["worker_nodes_after"]) <= set(removal["alive_nodes"])


def test_collective_weight_sync_is_bit_identical_and_keeps_its_group_while_the_members_stay(cluster_report):
    synced = cluster_report["collective"]["synced"]
    assert len(set(synced["nodes"])) == 3
    assert synced["bit_identical"] == [True, True, True]
    assert synced["versions"] == [2, 2, 2]  # what each worker says it holds
    assert synced["generation"] == 1  # version 2 went over the group version 1 built


def test_collective_weight_sync_rejects_stale_rollouts_and_catches_the_worker_up(cluster_report):
    stale = cluster_report["collective"]["stale"]
    assert stale["stale_rejected"] >= 1
    assert stale["versions"] == [2] * 6
    assert stale["equal_to_local_current_policy"]
    assert stale["generation"] == 2  # the stale worker alone, over a generation of its own


def test_a_worker_dying_in_a_broadcast_costs_a_timeout_and_its_replacement_rejoins(cluster_report):
    death = cluster_report["collective"]["death"]
    assert death["failed_broadcasts"] == 1 and death["replaced"] == 1 and death["victim_replaced"]
    # the learner waited about one timeout, then the living got the weights over a new generation
    assert death["sync_seconds"] < 3 * COLLECTIVE_TIMEOUT_S
    assert death["living_versions"] == [3, 3]
    # the failed round, then the replacement's; the living get the weights either in the failed round
    # (gloo sends to each member in turn, so those before the dead one may already hold them) or in a
    # round of their own, and a replacement that is up by then joins that round
    assert death["generation_after"] >= death["generation_before"] + 2
    assert death["bit_identical"] == [True, True, True] and death["versions"] == [3, 3, 3]
    assert death["group_versions"] == [3] * 6 and death["equal_to_local_current_policy"]


def test_rewards_computed_on_the_workers_are_the_tasks(cluster_report):
    rewards = cluster_report["rewards"]
    assert rewards["worker"] == rewards["recomputed"]
    assert 0 < sum(rewards["worker"]) < len(rewards["worker"])  # a mix, so the check can fail


# ---------------------------------------------------------------- the cluster driver


def _collective_checks(cluster, tokenizer, task, model, second: dict, local_groups) -> dict:
    """The same checks over the collective weight sync (gloo standing in for NCCL), on a fleet of
    its own: two versions broadcast, a worker with stale weights, and a worker killed after the
    group's rendezvous of a broadcast, before its transfer."""
    import time

    import ray

    from ray_jobs import chat_rl

    sampling = {"max_new_tokens": 32, "temperature": 1.0, "top_k": None}
    shared = ray.put({"tokenizer": tokenizer, "tasks": {"train": task}})
    fleet = chat_rl.RolloutFleet(3, (model.config_dict(), shared, sampling), num_cpus=0.3, num_gpus=0,
                                 start_timeout_s=120, stall_timeout_s=120, weight_sync="collective",
                                 sync_timeout_s=COLLECTIVE_TIMEOUT_S)

    def held():
        states = ray.get([slot.actor.state_dict.remote() for slot in fleet.slots])
        return {"versions": ray.get([slot.actor.held_version.remote() for slot in fleet.slots]),
                "bit_identical": [set(h) == set(weights) and all(torch.equal(h[k], weights[k])
                                                                 and h[k].dtype == weights[k].dtype for k in weights)
                                  for h in states]}

    report = {}
    try:
        first = {k: v.clone() for k, v in model.state_dict().items()}
        fleet.publish(first, 1)
        fleet.sync()
        weights = second
        fleet.publish(weights, 2)
        fleet.sync()
        report["synced"] = {**held(), "generation": fleet.generation, "nodes": fleet.nodes}

        # stale: worker 0 goes back to version 1 behind the fleet's back, and is caught up alone
        ray.get(fleet.slots[0].actor.load_weights.remote(1, [ray.put(first)]))
        jobs = [("train", i, 4, group_seed(7, 0, i)) for i in range(6)]
        groups = fleet.run(jobs)
        expected = local_groups(weights, jobs)
        report["stale"] = {"stale_rejected": fleet.stats["stale_rejected"], "generation": fleet.generation,
                           "versions": [g["version"] for g in groups],
                           "equal_to_local_current_policy": all(g["sequences"] == e["sequences"]
                                                                for g, e in zip(groups, expected))}

        # a member dies after the rendezvous, before the transfer: killed in place of the broadcast
        weights = random_gpt(tokenizer.get_vocab_size(), sequence_len=SEQUENCE_LEN, seed=4).state_dict()
        victim = fleet.slots[1].actor
        broadcast = chat_rl.broadcast_tensors

        def kill_then_broadcast(group, tensors):
            chat_rl.broadcast_tensors = broadcast
            ray.kill(victim)
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(victim.held_version.remote(), timeout=60)
            return broadcast(group, tensors)

        chat_rl.broadcast_tensors = kill_then_broadcast
        generation = fleet.generation
        fleet.publish(weights, 3)
        started = time.perf_counter()
        fleet.sync()
        sync_s = time.perf_counter() - started
        living = ray.get([slot.actor.held_version.remote() for slot in (fleet.slots[0], fleet.slots[2])])
        while not all(slot.up for slot in fleet.slots):
            fleet._pump()  # the replacement answers its first call
        fleet.sync()
        jobs = [("train", i, 4, group_seed(7, 3, i)) for i in range(6)]
        groups = fleet.run(jobs)
        report["death"] = {**held(), "sync_seconds": sync_s, "living_versions": living,
                           "replaced": fleet.stats["replaced"], "failed_broadcasts": fleet.stats["failed_broadcasts"],
                           "generation_before": generation, "generation_after": fleet.generation,
                           "victim_replaced": fleet.slots[1].actor is not victim,
                           "group_versions": [g["version"] for g in groups],
                           "equal_to_local_current_policy": all(g["sequences"] == e["sequences"] for g, e in
                                                                zip(groups, local_groups(weights, jobs)))}
    finally:
        fleet.stop()
    return report


def _cluster_checks(out_path: str) -> None:
    """Run in a subprocess: a 3-node cluster, a fleet of 3 rollout workers, and the checks."""
    import ray
    from ray.cluster_utils import Cluster

    from ray_jobs.chat_rl import RolloutFleet

    class FleetThatLosesANode(RolloutFleet):
        """Calls `remove` (once) when the second group of a run has come back."""
        remove = None

        def _pump(self):
            super()._pump()
            if self.remove is not None and len(self._results) >= 2:
                self.done_before_removal = len(self._results)
                remove, self.remove = self.remove, None
                remove()

    torch.set_num_threads(1)
    report = {}
    # Cluster records its address in /tmp/ray for a later bare ray.init() to find; other Ray users
    # of this machine could then join it by mistake. This driver passes the address explicitly.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    fleet = None
    try:
        report["num_nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        tokenizer = _tiny_tokenizer()
        task = EvenLength(24)
        model = random_gpt(tokenizer.get_vocab_size(), sequence_len=SEQUENCE_LEN, seed=2)
        sampling = {"max_new_tokens": 32, "temperature": 1.0, "top_k": None}
        shared = ray.put({"tokenizer": tokenizer, "tasks": {"train": task}})
        fleet = FleetThatLosesANode(3, (model.config_dict(), shared, sampling), num_cpus=0.3, num_gpus=0,
                                    start_timeout_s=120, stall_timeout_s=120)
        report["worker_nodes"] = fleet.nodes

        def local_groups(weights, jobs):
            local = random_gpt(tokenizer.get_vocab_size(), sequence_len=SEQUENCE_LEN)
            local.load_state_dict(weights)
            engine = Engine(local, tokenizer)
            return [sample_group(engine, task, index, n, sampling["max_new_tokens"], 1.0, None, seed)
                    for _, index, n, seed in jobs]

        # weights: publish version 1, then version 2 (other weights), compare bit for bit
        first = {k: v.clone() for k, v in model.state_dict().items()}
        fleet.publish(first, 1)
        fleet.sync()
        second = random_gpt(tokenizer.get_vocab_size(), sequence_len=SEQUENCE_LEN, seed=3).state_dict()
        report["second_weights_differ"] = any(not torch.equal(first[k], second[k]) for k in first)
        fleet.publish(second, 2)
        fleet.sync()
        held = ray.get([slot.actor.state_dict.remote() for slot in fleet.slots])
        report["bit_identical"] = [set(h) == set(second) and all(torch.equal(h[k], second[k])
                                                                 and h[k].dtype == second[k].dtype for k in second)
                                   for h in held]

        # stale: worker 0 goes back to version 1 behind the fleet's back (a late load, say)
        ray.get(fleet.slots[0].actor.load_weights.remote(1, [ray.put(first)]))
        jobs = [("train", i, 4, group_seed(7, 0, i)) for i in range(6)]
        groups = fleet.run(jobs)
        expected = local_groups(second, jobs)
        report["stale"] = {"stale_rejected": fleet.stats["stale_rejected"], "num_groups": len(groups),
                           "versions": [g["version"] for g in groups],
                           "equal_to_local_current_policy": all(g["sequences"] == e["sequences"]
                                                                and g["rewards"] == e["rewards"]
                                                                for g, e in zip(groups, expected))}
        report["rewards"] = {"worker": [r for g in groups for r in g["rewards"]],
                             "recomputed": [float(task.reward(task[g["index"]], tokenizer.decode(s[g["prompt_len"]:])))
                                            for g in groups for s in g["sequences"]]}

        report["collective"] = _collective_checks(cluster, tokenizer, task, model, second, local_groups)

        # node removal in the middle of a step: the fleet's loop removes it after the second group
        jobs = [("train", i, 4, group_seed(7, 1, i)) for i in range(12)]
        undisturbed = fleet.run(jobs)
        victim = next(n for n in nodes if n.node_id in fleet.nodes)
        fleet.remove = functools.partial(cluster.remove_node, victim)
        groups = fleet.run(jobs)
        after = fleet.run([("train", i, 4, group_seed(7, 2, i)) for i in range(6)])
        report["node_removal"] = {
            "num_groups": len(jobs), "completed": len(groups), "done_before_removal": fleet.done_before_removal,
            "replaced": fleet.stats["replaced"], "version": fleet.version, "versions": [g["version"] for g in groups],
            "same_as_undisturbed_step": all(g["sequences"] == u["sequences"] and g["rewards"] == u["rewards"]
                                            for g, u in zip(groups, undisturbed)),
            "step_after_removal_completed": len(after) == 6,
            # the replacement starts in the bundle Ray moved to a live node
            "worker_nodes_after": ray.get([slot.actor.node_id.remote() for slot in fleet.slots], timeout=90),
            "removed_node": victim.node_id,
            "alive_nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}
    finally:
        if fleet is not None:
            fleet.stop()
        ray.shutdown()
        cluster.shutdown()
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    _cluster_checks(sys.argv[1])
