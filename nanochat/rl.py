"""Reinforcement learning on chat tasks, the parts that need no cluster: sampling and scoring a
group of completions, group-mean advantages, the batch the learner trains on, the policy-gradient
loss and pass@k. ray_jobs.chat_rl runs them on rollout actors and Ray Train workers.

The recipe is the seed's on-policy, REINFORCE-like "GRPO":

- a prompt's `num_samples` completions form a group; the advantage of a completion is its reward
  minus the mean reward of its group (no division by the standard deviation). A group whose
  completions all score the same teaches nothing and has advantage 0 everywhere;
- the objective is sum over sampled tokens of advantage * log p(token), with no KL term, no PPO
  ratio and no clipping: every rollout comes from the current weights, so there is no old policy
  to stay close to;
- token-level normalisation: the sum is divided by the number of sampled tokens of the whole step
  (all groups, all ranks), so every token weighs the same however long its completion is.

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


def trained_tokens(groups: list[dict]) -> int:
    """How many tokens of these groups the loss counts: the sampled ones that are predicted (every
    masked-in position but the first of a sequence, which nothing predicts)."""
    return sum(sum(mask[1:]) for group in groups for mask in group["masks"])


def rollout_rows(groups: list[dict], skip_zero_advantage: bool = True) -> list[tuple[list[int], list[int], float]]:
    """(tokens, mask, advantage) per completion of `groups`. Rows whose advantage is exactly 0 add
    nothing to the gradient; with skip_zero_advantage they are left out (a group that all failed or
    all passed costs no forward pass)."""
    rows = []
    for group in groups:
        for sequence, mask, advantage in zip(group["sequences"], group["masks"], group_advantages(group["rewards"])):
            if advantage != 0.0 or not skip_zero_advantage:
                rows.append((sequence, mask, advantage))
    return rows


def rows_to_batch(rows: list[tuple[list[int], list[int], float]], pad_id: int,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, advantages) of rows padded to the longest: inputs = tokens[:-1],
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
    advantages = torch.tensor([advantage for _, _, advantage in rows], dtype=torch.float32)
    return inputs.to(device), targets.to(device), advantages.to(device)


def policy_gradient_loss(model, inputs: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                         normalizer: float) -> torch.Tensor:
    """-sum(advantage * log p(target)) over the counted tokens, divided by `normalizer` (the
    step's token count, times the world size when the optimizer averages gradients over ranks)."""
    if normalizer <= 0:
        raise ValueError(f"normalizer={normalizer} must be positive (the number of trained tokens)")
    # The model's cross-entropy is -log p, and 0 at ignored targets (-1).
    logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)
    return -(logp * advantages.unsqueeze(-1)).sum() / normalizer


def pass_at_k(groups: list[dict]) -> dict:
    """{'pass@1': mean share of right samples, 'pass@k': share of problems with any right sample,
    'k': samples per problem} of scored groups (a reward > 0 is right)."""
    if not groups:
        raise ValueError("pass_at_k needs at least one scored group")
    right = [sum(reward > 0 for reward in group["rewards"]) for group in groups]
    return {"pass@1": sum(r / len(g["rewards"]) for r, g in zip(right, groups)) / len(groups),
            "pass@k": sum(r > 0 for r in right) / len(groups),
            "k": max(len(group["rewards"]) for group in groups)}
