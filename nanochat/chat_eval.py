"""Scoring a chat model on tasks, without Ray: the answerers and ChatCORE.

Two kinds of task (nanochat.tasks):
- categorical (MMLU, ARC): one forward pass over the prompt, and the answer is the letter, among
  the problem's own letters, with the largest logit at the position after the prompt (the first
  token the assistant would write). A batch of prompts runs in one pass, padded at the end: the
  model is causal, so padding after a prompt does not change the logits at its last position.
- generative (GSM8K, HumanEval, SpellingBee, arithmetic): the engine samples `num_samples`
  completions and the task checks each; a problem passes when any of them is right (pass@k, the
  reported accuracy). The mean share of right samples, the unbiased estimate of pass@1, is
  reported beside it.

Each task's accuracy is also centered on chance, (acc - chance) / (1 - chance): 0 is guessing,
1 is perfect. Chance is 0.25 for MMLU and ARC (the reference's value for 4-choice questions) and 0
for generative tasks; any other categorical task gets the mean of 1/(number of letters) over its
problems. ChatCORE, as nanochat defines it today, is the mean centered accuracy of its five tasks,
CHATCORE_TASKS (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval), and exists only when all five
were run; other tasks (SpellingBee, arithmetic) are reported on their own and never enter it.

Scoring takes an "answerer": anything with `pick_letters(conversations) -> letters` and
`complete(conversation, seed) -> completions`. `ModelAnswerer` is a model and its tokenizer; tests
plug in doubles with a known answer key. ray_jobs.chat_eval spreads the scoring over Ray actors.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from nanochat.engine import Engine, check_sampling_settings
from nanochat.tasks import Task

# The reference's chance levels; generative tasks are 0 and other categorical tasks get 1/letters.
CHANCE = {"arc-easy": 0.25, "arc-challenge": 0.25, "mmlu": 0.25}
# The tasks nanochat's ChatCORE averages, no more and no fewer.
CHATCORE_TASKS = ("arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval")


class Answerer(Protocol):
    """What evaluate_task asks for answers."""

    def pick_letters(self, conversations: list[dict]) -> list[str]:
        """One letter per categorical conversation, from its conversation["letters"]."""

    def complete(self, conversation: dict, seed: int) -> list[str]:
        """The sampled completions (one per sample) of a generative conversation's prompt."""


@dataclass(frozen=True)
class Sampling:
    """How generative answers are sampled (nanochat.engine's settings)."""
    num_samples: int = 1
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_k: int | None = 50

    def __post_init__(self):
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples!r} must be a positive int")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive int")
        check_sampling_settings(self.temperature, self.top_k, 0)


class ModelAnswerer:
    """Answers with a GPT and its tokenizer: letters by their logits, completions by the engine."""

    def __init__(self, model, tokenizer, sampling: Sampling = Sampling()):
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.engine = Engine(model, tokenizer)
        self._letter_ids: dict[str, int] = {}

    def letter_id(self, letter: str) -> int:
        """The token id of a choice letter, which must encode to exactly one token."""
        if letter not in self._letter_ids:
            ids = self.tokenizer.encode(letter)
            if len(ids) != 1:
                raise ValueError(f"the choice letter {letter!r} encodes to {len(ids)} tokens ({ids}); letters "
                                 "are scored by the logit of their single token, so use letters that this "
                                 "tokenizer keeps whole")
            self._letter_ids[letter] = ids[0]
        return self._letter_ids[letter]

    @torch.inference_mode()
    def pick_letters(self, conversations: list[dict]) -> list[str]:
        prompts = [self.tokenizer.render_for_completion(conversation) for conversation in conversations]
        width = max(len(prompt) for prompt in prompts)
        # Padding goes after each prompt, where the causal model's last prompt position never sees it.
        pad = self.tokenizer.get_bos_token_id()
        batch = torch.tensor([prompt + [pad] * (width - len(prompt)) for prompt in prompts],
                             dtype=torch.long, device=self.model.get_device())
        logits = self.model(batch)
        letters = []
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            choices = conversation.get("letters")
            if not choices:
                raise ValueError("a categorical conversation must carry its answer letters in "
                                 'conversation["letters"]; build it with a MultipleChoiceTask')
            choice_ids = torch.tensor([self.letter_id(letter) for letter in choices], device=logits.device)
            letters.append(choices[int(logits[row, len(prompt) - 1, choice_ids].argmax())])
        return letters

    def complete(self, conversation: dict, seed: int) -> list[str]:
        prompt = self.tokenizer.render_for_completion(conversation)
        s = self.sampling
        sequences, _ = self.engine.generate_batch(prompt, num_samples=s.num_samples, max_tokens=s.max_new_tokens,
                                                  temperature=s.temperature, top_k=s.top_k, seed=seed)
        return [self.tokenizer.decode(sequence[len(prompt):]) for sequence in sequences]


# ----------------------------------------------------------------------------------------------
# Scoring


def score_problems(task: Task, indices: list[int], answerer: Answerer, batch_size: int = 8,
                   seed: int = 42) -> list[tuple[int, int]]:
    """(right samples, samples) for each problem task[i] of `indices`.

    Categorical problems go to the answerer `batch_size` at a time, in the order given;
    generative problem i is sampled with seed `seed + i`.
    """
    if task.eval_type == "categorical":
        outcomes = []
        for start in range(0, len(indices), batch_size):
            conversations = [task[i] for i in indices[start:start + batch_size]]
            letters = answerer.pick_letters(conversations)
            if len(letters) != len(conversations):
                raise ValueError(f"the answerer gave {len(letters)} letters for {len(conversations)} problems")
            outcomes += [(int(task.evaluate(c, letter)), 1) for c, letter in zip(conversations, letters)]
        return outcomes
    if task.eval_type == "generative":
        outcomes = []
        for i in indices:
            conversation = task[i]
            completions = answerer.complete(conversation, seed + i)
            if not completions:
                raise ValueError(f"the answerer gave no completion for problem {i}")
            outcomes.append((sum(bool(task.evaluate(conversation, c)) for c in completions), len(completions)))
        return outcomes
    raise ValueError(f"{type(task).__name__} has eval_type {task.eval_type!r}: only 'categorical' and "
                     "'generative' tasks can be evaluated; training-only sets have no answers to check")


def chance_level(name: str, task: Task) -> float:
    """The accuracy of guessing: the reference's value for its tasks, 0 for generative tasks, and
    the mean of 1/(number of letters) over the problems of any other categorical task."""
    if name in CHANCE:
        return CHANCE[name]
    if task.eval_type == "categorical":
        return sum(1 / len(conversation["letters"]) for conversation in task) / len(task)
    return 0.0


def summarize(name: str, task: Task, outcomes: list[tuple[int, int]]) -> dict:
    """A task's scores from its per-problem (right samples, samples)."""
    if not outcomes:
        raise ValueError(f"task {name} has no problems to score")
    passed = sum(right > 0 for right, _ in outcomes)
    accuracy = passed / len(outcomes)
    chance = chance_level(name, task)
    return {
        "eval_type": task.eval_type,
        "n": len(outcomes),
        "passed": passed,
        "accuracy": accuracy,  # pass@k for generative tasks: any of the k samples right
        "pass@1": sum(right / samples for right, samples in outcomes) / len(outcomes),
        "num_samples": max(samples for _, samples in outcomes),
        "chance": chance,
        "centered": (accuracy - chance) / (1.0 - chance),
    }


def evaluate_task(name: str, task: Task, answerer: Answerer, batch_size: int = 8, seed: int = 42) -> dict:
    """Score every problem of `task` with `answerer` in this process (summarize's dict)."""
    return summarize(name, task, score_problems(task, list(range(len(task))), answerer, batch_size, seed))


def chatcore(results: dict[str, dict]) -> float | None:
    """ChatCORE: the mean centered accuracy of the CHATCORE_TASKS in `results` (summarize's dicts),
    whatever other tasks `results` holds; None unless all of them are there, as in nanochat."""
    if not all(name in results for name in CHATCORE_TASKS):
        return None
    return sum(results[name]["centered"] for name in CHATCORE_TASKS) / len(CHATCORE_TASKS)


# ----------------------------------------------------------------------------------------------
# The actors
