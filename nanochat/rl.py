"""Reinforcement learning on chat tasks, the parts that need no cluster: sampling and scoring a
group of completions, group-mean advantages, the batch the learner trains on, the policy-gradient
loss and pass@k. ray_jobs.chat_rl runs them on rollout actors and Ray Train workers.

The recipe is nanochat's on-policy, REINFORCE-like "GRPO":

- a prompt's `num_samples` completions form a group; the advantage of a completion is its reward
  minus the mean reward of its group (no division by the standard deviation). A group whose
  completions all score the same teaches nothing and has advantage 0 everywhere;
- the objective is sum over sampled tokens of advantage * log p(token), with no KL term, no PPO
  ratio and no clipping: every rollout comes from the current weights, so there is no old policy
  to stay close to;
- nanochat's normalisation, token-level within a pass: a group's completions are taken
  `samples_per_pass` at a time (nanochat's device batch of 8, one forward/backward there), each
  pass's sum is divided by that pass's sampled tokens, and the step's objective is the mean over
  all passes of all prompts (divided by passes per group x prompts per step). So a token weighs
  more in a pass of short completions than in one of long ones, and every prompt weighs the same.
  (The seed divided the step's whole sum by all its sampled tokens instead, which weighs every
  token alike and a prompt by how long its completions are.) The weight of each completion,
  advantage / (its pass's tokens x passes x prompts), is computed up front, so the learner may
  batch completions across passes and groups and leave out those with advantage 0.

Only tokens the model chose count: the prompt and the python tool's forced output have mask 0
(nanochat.engine) and get target -1, which the model's cross-entropy ignores.
"""

import torch


def group_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of prompt `index` at `step`: the same group whichever worker samples it,
    so a group that is sampled again after a worker failure comes out the same."""
    return ((seed * 1_000_003 + step) * 1_000_003 + index) % (2 ** 63)


def sample_group(engine, task, index: int, num_samples: int, max_new_tokens: int, temperature: float,
                 top_k: int | None, seed: int) -> dict:
    """Sample `num_samples` completions of problem `index` of `task` (with tool use) and score them
    with task.reward. Returns {'index', 'sequences' (prompt + completion ids), 'masks' (1 on sampled
    tokens), 'rewards', 'prompt_len', 'generated_tokens'}."""
    conversation = task[index]
    tokenizer = engine.tokenizer
    prompt = tokenizer.render_for_completion(conversation)
    sequences, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                             temperature=temperature, top_k=top_k, seed=seed)
    rewards = [float(task.reward(conversation, tokenizer.decode(sequence[len(prompt):])))
               for sequence in sequences]
    return {"index": index, "sequences": sequences, "masks": masks, "rewards": rewards, "prompt_len": len(prompt),
            "generated_tokens": sum(len(sequence) - len(prompt) for sequence in sequences)}


def group_advantages(rewards: list[float]) -> list[float]:
    """Each reward minus the mean reward of the group."""
    if not rewards:
        raise ValueError("a group needs at least one reward")
    mean = sum(rewards) / len(rewards)
    return [reward - mean for reward in rewards]


def trained_tokens(masks: list[list[int]]) -> int:
    """How many tokens of these completions the loss counts: the sampled ones that are predicted
    (every masked-in position but the first of a sequence, which nothing predicts)."""
    return sum(sum(mask[1:]) for mask in masks)


def rollout_rows(groups: list[dict], samples_per_pass: int, prompts_per_rank: float,
                 skip_zero_advantage: bool = True) -> list[tuple[list[int], list[int], float]]:
    """(tokens, mask, weight) per completion of `groups`: weight = advantage / (trained tokens of
    its pass, at least 1, x passes per group x `prompts_per_rank`), a pass being `samples_per_pass`
    consecutive completions of a group (the module docstring). `prompts_per_rank` is the step's
    prompts over the world size, since the optimizer averages the ranks' gradients. Rows whose
    advantage is exactly 0 add nothing to the gradient; with skip_zero_advantage they are left out
    (a group that all failed or all passed costs no forward pass), but their tokens still count in
    their pass."""
    if samples_per_pass < 1 or prompts_per_rank <= 0:
        raise ValueError(f"samples_per_pass ({samples_per_pass}) and prompts_per_rank ({prompts_per_rank}) "
                         "must be positive")
    rows = []
    for group in groups:
        advantages = group_advantages(group["rewards"])
        num_passes = -(-len(advantages) // samples_per_pass)
        for start in range(0, len(advantages), samples_per_pass):
            window = slice(start, start + samples_per_pass)
            scale = max(trained_tokens(group["masks"][window]), 1) * num_passes * prompts_per_rank
            for sequence, mask, advantage in zip(group["sequences"][window], group["masks"][window],
                                                 advantages[window]):
                if advantage != 0.0 or not skip_zero_advantage:
                    rows.append((sequence, mask, advantage / scale))
    return rows


def rows_to_batch(rows: list[tuple[list[int], list[int], float]], pad_id: int,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, weights) of rows padded to the longest: inputs = tokens[:-1],
    targets = tokens[1:] with -1 wherever the mask is 0 (prompt, tool output, padding)."""
    if not rows:
        raise ValueError("rows_to_batch needs at least one row")
    width = max(len(tokens) for tokens, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (tokens, row_mask, _) in enumerate(rows):
        if len(tokens) != len(row_mask):
            raise ValueError(f"row {i} has {len(tokens)} tokens but a mask of {len(row_mask)}")
        ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, :len(row_mask)] = torch.tensor(row_mask, dtype=torch.bool)
    inputs = ids[:, :-1]
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
    weights = torch.tensor([weight for _, _, weight in rows], dtype=torch.float32)
    return inputs.to(device), targets.to(device), weights.to(device)


def policy_gradient_loss(model, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-sum(weight * log p(target)) over the counted tokens, a row's weight being its normalised
    advantage (rollout_rows)."""
    # The model's cross-entropy is -log p, and 0 at ignored targets (-1).
    logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)
    return -(logp * weights.unsqueeze(-1)).sum()


def pass_at_k(groups: list[dict]) -> dict:
    """{'pass@1': mean share of right samples, 'pass@k': share of problems with any right sample,
    'k': samples per problem} of scored groups (a reward > 0 is right)."""
    if not groups:
        raise ValueError("pass_at_k needs at least one scored group")
    right = [sum(reward > 0 for reward in group["rewards"]) for group in groups]
    return {"pass@1": sum(r / len(g["rewards"]) for r, g in zip(right, groups)) / len(groups),
            "pass@k": sum(r > 0 for r in right) / len(groups),
            "k": max(len(group["rewards"]) for group in groups)}
