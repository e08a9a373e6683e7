"""Tests of chat evaluation: the scoring (nanochat/chat_eval.py) and the job (ray_jobs/chat_eval.py).

Scoring is checked against answer keys with test doubles (an answerer that is always right, one
that always says "A", one that is right on a known share of its samples), ChatCORE against
nanochat's definition (its five tasks, centered on chance), and the model path with a tiny random GPT saved as an SFT checkpoint:
the letters it picks in a padded batch are the ones it picks one prompt at a time, its
completions are the engine's, and the scores over 1 and 2 Ray actors equal those computed in
this process, for sampled answers with a fixed seed as well as greedy ones. The job is given
tasks whose answer key is this process's own answers on every other problem, so its score says
whether each of its completions was the one made here.
"""

import dataclasses
import json
import os

import pytest
import torch

from nanochat.checkpoint import checkpoint_dir, load_model, save_checkpoint
from nanochat.engine import Engine
from nanochat.execution import SandboxUnavailableError
from nanochat.tasks import Arithmetic, SpellingBee, Task
from nanochat.tasks.common import MultipleChoiceTask, last_assistant_text, render_multiple_choice
from nanochat.tokenizer import Tokenizer
from ray_jobs.base_eval import CheckpointModel
from nanochat.chat_eval import (ModelAnswerer, Sampling, chance_level, chatcore, evaluate_task,
                                score_problems, summarize)
import ray_jobs.chat_eval
from ray_jobs.chat_eval import evaluate_on_actors, load_tasks, main, plan_chunks
from tests.tiny import CHAT_TEXT, random_gpt

MODEL_TAG = "chat_eval_test_d2"
KEY = "ABCADBAACDAABDCABAAB"  # 20 answers, 9 of them A
WORDS = "the quick brown fox jumps over lazy dog what is plus count small model learned".split()


class LetterQuiz(MultipleChoiceTask):
    """Multiple-choice questions whose right letters are `key`, with the first `num_letters` letters."""

    def __init__(self, key: str = KEY, num_letters: int = 4, **view):
        super().__init__(**view)
        self.key, self.letters = key, list("ABCD"[:num_letters])

    def num_examples(self) -> int:
        return len(self.key)

    def get_example(self, index: int) -> dict:
        # Prompts of different lengths (a batch needs padding) whose ends differ, so that even a
        # random model, which mostly looks at the last tokens, picks different letters.
        choices = ["red", "green", "blue", "white"][:len(self.letters)]
        question = render_multiple_choice("Which colour is right?", self.letters, choices)
        question += f"\nQuestion {index}, " + " ".join(WORDS[(index * 7 + j) % len(WORDS)] for j in range(1 + index % 4))
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": self.key[index]}],
                "letters": self.letters}


class EvenLength(Task):
    """A generative task that a random model passes about half the time: right when the answer has
    an even number of characters."""

    eval_type = "generative"

    def num_examples(self) -> int:
        return 8

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Say something, number {index}."},
                             {"role": "assistant", "content": "ok"}]}

    def evaluate(self, conversation: dict, answer: str) -> bool:
        return len(answer) % 2 == 0


class KnownAnswers(EvenLength):
    """EvenLength's prompts, right only when the answer is exactly `answers[index]`."""

    def __init__(self, answers: list[str], **view):
        super().__init__(**view)
        self.answers = answers

    def num_examples(self) -> int:
        return len(self.answers)

    def get_example(self, index: int) -> dict:
        example = super().get_example(index)
        example["messages"][-1]["content"] = self.answers[index]
        return example

    def evaluate(self, conversation: dict, answer: str) -> bool:
        return answer == last_assistant_text(conversation)


class CodeOnAnUnsandboxedHost(EvenLength):
    """A task that would run its answers as code, on a host where the sandbox misses a layer and
    its caller asked for all of them: it refuses, as HumanEval with require_sandbox does there."""

    def __init__(self, require_sandbox: bool = False, harness: str = "nanochat", **view):
        super().__init__(**view)
        self.require_sandbox, self.harness = require_sandbox, harness

    def evaluate(self, conversation: dict, answer: str) -> bool:
        if self.require_sandbox:
            raise SandboxUnavailableError("refusing to run model-written code: the sandbox layers "
                                          "landlock_read, landlock_write are not in force on this host")
        return super().evaluate(conversation, answer)


class AlwaysRight:
    def pick_letters(self, conversations):
        return [last_assistant_text(c) for c in conversations]

    def complete(self, conversation, seed):
        return [last_assistant_text(conversation)]


class AlwaysA:
    def pick_letters(self, conversations):
        return ["A"] * len(conversations)

    def complete(self, conversation, seed):
        return ["A"]


class OneOfFourOnEvenProblems:
    """Four samples per problem; on problems with an even index exactly one of them is right."""

    def __init__(self, seed):
        self.seed = seed

    def complete(self, conversation, seed):
        index = seed - self.seed
        samples = ["I do not know."] * 4
        if index % 2 == 0:
            samples[index % 4] = last_assistant_text(conversation)
        return samples


# ----------------------------------------------------------------------------------------------
# Scoring with test doubles


@pytest.mark.parametrize("task", [LetterQuiz(), Arithmetic("test", size=6), SpellingBee("test", size=6)],
                         ids=["quiz", "arithmetic", "spellingbee"])
def test_an_answerer_that_is_always_right_scores_100_percent(task):
    result = evaluate_task("t", task, AlwaysRight(), batch_size=3)
    assert result["accuracy"] == result["pass@1"] == 1.0
    assert result["passed"] == result["n"] == len(task)


def test_an_answerer_that_always_says_a_scores_the_share_of_a_answers():
    result = evaluate_task("quiz", LetterQuiz(), AlwaysA(), batch_size=8)
    assert result["passed"] == KEY.count("A") == 9
    assert result["accuracy"] == pytest.approx(9 / 20)
    assert result["chance"] == pytest.approx(0.25)
    assert result["centered"] == pytest.approx((9 / 20 - 0.25) / 0.75)
    # a slice of the task is scored on its own problems only
    assert evaluate_task("quiz", LetterQuiz()[:5], AlwaysA())["accuracy"] == pytest.approx(KEY[:5].count("A") / 5)


def test_pass_at_k_counts_a_problem_when_any_sample_is_right():
    task = Arithmetic("test", size=8)
    result = evaluate_task("arithmetic", task, OneOfFourOnEvenProblems(seed=5), seed=5)
    assert result["num_samples"] == 4
    assert result["accuracy"] == pytest.approx(0.5)  # pass@4: the 4 even problems
    assert result["pass@1"] == pytest.approx(4 * (1 / 4) / 8)
    assert result["chance"] == 0.0 and result["centered"] == result["accuracy"]


def test_chance_levels_follow_the_reference():
    assert chance_level("mmlu", LetterQuiz()) == 0.25
    assert chance_level("arc-easy", LetterQuiz(num_letters=3)) == 0.25  # the reference's fixed 4-choice level
    assert chance_level("quiz", LetterQuiz(key="ABAB", num_letters=2)) == pytest.approx(0.5)
    assert chance_level("gsm8k", Arithmetic("test", size=2)) == 0.0


def passed_of_20(name: str, task: Task, passed: int) -> dict:
    """summarize's dict for `task` scored on 20 problems, `passed` of them right."""
    return summarize(name, task, [(1, 1)] * passed + [(0, 1)] * (20 - passed))


def test_chatcore_is_the_mean_of_nanochats_five_centered_tasks_and_ignores_the_others():
    # Known accuracies and the centered scores nanochat's formula gives them, (acc - base) / (1 - base),
    # with base 0.25 for the three 4-choice tasks and 0 for GSM8K and HumanEval.
    quiz, generative = LetterQuiz(), Arithmetic("test", size=2)
    results = {"arc-easy": passed_of_20("arc-easy", quiz, 11),            # 0.55  -> 0.4
               "arc-challenge": passed_of_20("arc-challenge", quiz, 8),   # 0.40  -> 0.2
               "mmlu": passed_of_20("mmlu", quiz, 6),                     # 0.30  -> 0.0667
               "gsm8k": passed_of_20("gsm8k", generative, 6),             # 0.30  -> 0.3
               "humaneval": passed_of_20("humaneval", generative, 2)}     # 0.10  -> 0.1
    expected = (0.4 + 0.2 + (0.3 - 0.25) / 0.75 + 0.3 + 0.1) / 5
    assert chatcore(results) == pytest.approx(expected)
    # SpellingBee and arithmetic are reported on their own: a perfect score there changes nothing.
    others = {"spellingbee": passed_of_20("spellingbee", generative, 20),
              "arithmetic": passed_of_20("arithmetic", generative, 20)}
    assert chatcore({**results, **others}) == pytest.approx(expected)
    # nanochat prints no ChatCORE unless all five were evaluated.
    assert chatcore({name: r for name, r in results.items() if name != "humaneval"} | others) is None
    assert chatcore({}) is None


def test_a_training_only_task_is_refused():
    class Chat(Task):
        def num_examples(self):
            return 1

        def get_example(self, index):
            return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

    with pytest.raises(ValueError, match="only 'categorical' and 'generative'"):
        score_problems(Chat(), [0], AlwaysRight())


def test_categorical_chunks_are_whole_batches_at_fixed_positions():
    tasks = [LetterQuiz(), Arithmetic("test", size=5)]
    for num_actors in (1, 2, 3):
        chunks = plan_chunks(tasks, num_actors, batch_size=3)
        quiz = [indices for task_index, indices in chunks if task_index == 0]
        assert [i for indices in quiz for i in indices] == list(range(20))
        assert all(indices[0] % 3 == 0 for indices in quiz)
        assert sorted(i for task_index, indices in chunks if task_index == 1 for i in indices) == list(range(5))


# ----------------------------------------------------------------------------------------------
# The model path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """(model, tokenizer) of a tiny random GPT saved as step 0 of the sft checkpoint MODEL_TAG,
    loaded back as the actors load it."""
    tokenizer = Tokenizer.train_from_iterator(iter(CHAT_TEXT), 300)
    tokenizer_dir = tmp_path_factory.mktemp("chat_eval_tokenizer")
    tokenizer.save(str(tokenizer_dir))
    # Seed 8: a model whose letter logits vary over the quiz (with some seeds one letter wins every
    # question, which would make the categorical checks blind to mixed-up problems).
    model = random_gpt(tokenizer.get_vocab_size(), sequence_len=64, seed=8)
    save_checkpoint(checkpoint_dir("sft", MODEL_TAG), 0, model.state_dict(),
                    {"model_config": dataclasses.asdict(model.config)}, tokenizer_dir=str(tokenizer_dir))
    model, tokenizer, _ = load_model("sft", "cpu", model_tag=MODEL_TAG, step=0)
    return model, tokenizer


def test_letters_picked_in_a_padded_batch_are_the_ones_picked_one_at_a_time(tiny_checkpoint):
    model, tokenizer = tiny_checkpoint
    answerer = ModelAnswerer(model, tokenizer)
    conversations = list(LetterQuiz())
    assert len({len(tokenizer.render_for_completion(c)) for c in conversations}) > 1  # padding is needed
    expected = []
    with torch.inference_mode():
        for conversation in conversations:
            prompt = tokenizer.render_for_completion(conversation)
            logits = model(torch.tensor([prompt]))[0, -1]
            ids = [tokenizer.encode(letter)[0] for letter in conversation["letters"]]
            expected.append(conversation["letters"][int(logits[ids].argmax())])
    assert answerer.pick_letters(conversations) == expected
    assert len(set(expected)) > 1  # the random model does not answer one letter to everything


def test_completions_are_the_engines_samples_after_the_prompt(tiny_checkpoint):
    model, tokenizer = tiny_checkpoint
    sampling = Sampling(num_samples=3, max_new_tokens=6, temperature=1.0, top_k=20)
    conversation = SpellingBee("test", size=1)[0]
    prompt = tokenizer.render_for_completion(conversation)
    sequences, _ = Engine(model, tokenizer).generate_batch(prompt, num_samples=3, max_tokens=6, temperature=1.0,
                                                           top_k=20, seed=11)
    expected = [tokenizer.decode(sequence[len(prompt):]) for sequence in sequences]
    assert ModelAnswerer(model, tokenizer, sampling).complete(conversation, 11) == expected
    assert all(completion for completion in expected)


def test_a_letter_of_several_tokens_is_refused(tiny_checkpoint):
    model, tokenizer = tiny_checkpoint
    conversation = {**LetterQuiz()[0], "letters": ["A", "A B"]}
    with pytest.raises(ValueError, match=r"'A B' encodes to [2-9] tokens"):
        ModelAnswerer(model, tokenizer).pick_letters([conversation])


def test_scores_on_one_and_two_actors_equal_the_scores_in_this_process(ray_local, tiny_checkpoint):
    model, tokenizer = tiny_checkpoint
    tasks = {"arithmetic": Arithmetic("test", size=4), "spellingbee": SpellingBee("test", size=4),
             "quiz": LetterQuiz(), "even": EvenLength()}
    sampling = Sampling(num_samples=3, max_new_tokens=6, temperature=1.0, top_k=20)
    source = CheckpointModel("sft", MODEL_TAG, 0)
    one = evaluate_on_actors(source, tasks, sampling, batch_size=3, seed=7, num_actors=1)
    two = evaluate_on_actors(source, tasks, sampling, batch_size=3, seed=7, num_actors=2)
    answerer = ModelAnswerer(model, tokenizer, sampling)
    here = {name: evaluate_task(name, task, answerer, batch_size=3, seed=7) for name, task in tasks.items()}
    assert one == two == here
    assert list(one) == list(tasks)
    assert one["quiz"]["n"] == 20 and one["quiz"]["chance"] == 0.25
    for name in ("arithmetic", "spellingbee", "even"):
        assert one[name]["num_samples"] == 3
    # Outcomes are mixed where it matters: equal scores of answers that are all wrong would say nothing.
    assert 0 < one["quiz"]["passed"] < 20
    assert 0 < one["even"]["pass@1"] < 1  # random answers have an even length about half the time


def test_the_job_gives_the_answers_of_this_process_and_writes_them(ray_local, tiny_checkpoint, monkeypatch, capsys):
    # The job's tasks are made here with this process's answers as the key: the greedy completion
    # (5 new tokens) of the even problems, a wrong one on the odd problems. So the job passes
    # exactly the even problems only if every completion and letter it produced on its actors is
    # the one produced here, with the sampling settings of its flags.
    model, tokenizer = tiny_checkpoint
    greedy = ModelAnswerer(model, tokenizer, Sampling(max_new_tokens=5, temperature=0.0, top_k=50))
    problems = 6
    completions = [greedy.complete(conversation, seed=0)[0] for conversation in KnownAnswers(["?"] * problems)]
    letters = greedy.pick_letters(list(LetterQuiz()[:problems]))
    key = "".join(letter if i % 2 == 0 else "ABCD"[("ABCD".index(letter) + 1) % 4] for i, letter in enumerate(letters))
    made_here = {"arithmetic": KnownAnswers([c if i % 2 == 0 else c + " (wrong)" for i, c in enumerate(completions)]),
                 "spellingbee": LetterQuiz(key=key)}
    monkeypatch.setattr(ray_jobs.chat_eval, "get_task", lambda name, split, **options: made_here[name])

    results = main(["--source", "sft", "--model-tag", MODEL_TAG, "--tasks", "arithmetic,spellingbee",
                    "--max-problems", str(problems), "--max-new-tokens", "5", "--num-actors", "2"])
    out = capsys.readouterr().out
    assert out.startswith("chat_eval config: ")
    config = json.loads(out.splitlines()[0][len("chat_eval config: "):])
    assert config["model_tag"] == MODEL_TAG and config["step"] == 0 and config["temperature"] == 0.0
    assert config["answer_matching"] == "exact"  # nanochat's protocol unless asked otherwise
    assert config["humaneval_harness"] == "nanochat"
    assert "ChatCORE: not computed, it needs all of arc-easy,arc-challenge,mmlu,gsm8k,humaneval" in out

    assert [results["tasks"][name]["passed"] for name in made_here] == [problems // 2, problems // 2]
    assert results["tasks"] == {name: evaluate_task(name, task[:problems], greedy, seed=42)
                                for name, task in made_here.items()}
    assert results["chatcore"] is None  # arithmetic and SpellingBee are none of ChatCORE's tasks
    with open(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "chat_eval", f"sft_{MODEL_TAG}_0.json")) as f:
        assert json.load(f) == results


def test_a_missing_checkpoint_says_how_to_make_one(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", "rl", "--model-tag", "never-trained-with-rl", "--tasks", "arithmetic"])
    assert exit_info.value.code == 1
    assert "python -m ray_jobs.chat_rl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", "sft", "--model-tag", MODEL_TAG, "--step", "5", "--tasks", "arithmetic"])
    assert exit_info.value.code == 1
    assert "no checkpoint for step 5" in capsys.readouterr().err


def test_require_sandbox_reaches_the_code_task_and_its_refusal_stops_the_job(ray_local, tiny_checkpoint,
                                                                            monkeypatch, capsys):
    def get_task(name, split, **options):
        return CodeOnAnUnsandboxedHost(**options) if name == "humaneval" else Arithmetic(split, **options)

    monkeypatch.setattr(ray_jobs.chat_eval, "get_task", get_task)
    tasks = load_tasks(["humaneval", "arithmetic"], 2, require_sandbox=True)
    assert tasks["humaneval"].require_sandbox and len(tasks["arithmetic"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", "sft", "--model-tag", MODEL_TAG, "--tasks", "humaneval", "--max-problems", "2",
              "--max-new-tokens", "2", "--num-actors", "1", "--require-sandbox"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "chat_eval: refusing to run model-written code: the sandbox layers landlock_read" in err
    assert "Traceback" not in err


def test_answer_matching_reaches_the_tasks_with_a_final_answer():
    assert all(task.answer_matching == "exact" for task in load_tasks(["arithmetic", "spellingbee"], 2).values())
    tasks = load_tasks(["arithmetic", "spellingbee"], 2, answer_matching="lenient")
    assert [task.answer_matching for task in tasks.values()] == ["lenient", "lenient"]
    problem = tasks["arithmetic"][0]
    answer = last_assistant_text(problem).rsplit("#### ", 1)[1]
    assert tasks["arithmetic"].evaluate(problem, f"#### {answer}.0") is True
    assert load_tasks(["arithmetic"], 2)["arithmetic"].evaluate(problem, f"#### {answer}.0") is False


def test_humaneval_harness_reaches_humaneval_only(monkeypatch):
    monkeypatch.setattr(ray_jobs.chat_eval, "get_task", lambda name, split, **options: options)
    assert load_tasks(["humaneval"], None)["humaneval"]["harness"] == "nanochat"
    options = load_tasks(["humaneval", "arithmetic"], None, humaneval_harness="lenient")
    assert options["humaneval"]["harness"] == "lenient" and "harness" not in options["arithmetic"]


@pytest.mark.parametrize("argv, message", [
    (["--answer-matching", "fuzzy"], "invalid choice: 'fuzzy'"),
    (["--tasks", "arithmetic,smoltalk"], "smoltalk"),
    (["--tasks", "arithmetic,arithmetic"], "names a task twice"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
])
def test_wrong_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
