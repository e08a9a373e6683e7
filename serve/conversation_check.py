"""A scripted conversation of short messages, sent turn by turn to a running chat service through
the official `openai` client: does the model hold a 10-turn chat within its context?

    python -m serve.conversation_check --base-url http://127.0.0.1:8000/v1

Each turn sends the whole conversation so far (the earlier questions and the model's own answers)
plus the next scripted question, the way the web UI does, and prints the answer, how it ended
(`stop`: the model ended it; `length`: it was cut at max_tokens or at the context) and the
prompt's length against the model's context. A turn the service refuses (the conversation no
longer fits the context, or any other error) ends the check there with the service's message.
It ends with a summary (turns answered, answers the model ended itself, the last prompt's length)
and a RESULT line; the exit status is 0 only when every turn was answered.

The questions are those the offline demo model was fine-tuned for (greetings, who it is, word
problems, letter counting, thanks); the check is about holding the conversation, not grading it.
An API key, when the service has one, comes from --api-key or NANOCHAT_API_KEY.
"""

import argparse
import os
import sys

from ray_jobs.bench_results import result_line
from serve.api import API_KEY_ENV

SCRIPT = (
    "Hi!",
    "Who are you?",
    "What can you do?",
    "Tom has 3 boxes of 12 apples and gives away 7 apples. How many apples does he have left?",
    "How many r are in the word strawberry?",
    "Can you use tools?",
    "A bus has 48 seats and 17 are empty. How many people are on the bus?",
    "How many times does the letter e appear in excellence?",
    "Are you ChatGPT?",
    "Thanks!",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve.conversation_check", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the service's OpenAI-compatible API")
    p.add_argument("--api-key", default=None, help=f"the service's API key (default: ${API_KEY_ENV}, if set)")
    p.add_argument("--turns", type=int, default=len(SCRIPT),
                   help=f"how many of the {len(SCRIPT)} scripted questions to ask, in order")
    p.add_argument("--temperature", type=float, default=0.8, help="as the web UI sends it")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="longest answer (default: the service's, cut to the room the context leaves)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of turn 1 (turn i uses seed + i - 1)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer")
    args = p.parse_args(argv)
    if not 1 <= args.turns <= len(SCRIPT):
        p.error(f"--turns must lie in [1, {len(SCRIPT)}], got {args.turns}")
    return args


def run_conversation(args: argparse.Namespace) -> dict:
    """Ask the scripted questions in one conversation; a summary of how far it got."""
    try:
        import openai
    except ImportError:
        raise SystemExit("the conversation check needs the openai client: pip install openai") from None
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or os.environ.get(API_KEY_ENV) or "none",
                           max_retries=0, timeout=args.timeout)
    card = client.models.list().data[0]  # the service's one model; its card carries context_length
    model, context = card.id, (card.model_extra or {}).get("context_length")
    messages, turns_done, ended_by_model, prompt_tokens = [], 0, 0, 0
    for turn, question in enumerate(SCRIPT[:args.turns], start=1):
        messages.append({"role": "user", "content": question})
        try:
            answer = client.chat.completions.create(model=model, messages=messages, temperature=args.temperature,
                                                    max_tokens=args.max_tokens, seed=args.seed + turn - 1)
        except openai.APIError as failure:
            print(f"[turn {turn}] user: {question}\n  turn {turn} refused: {getattr(failure, 'message', failure)}",
                  flush=True)
            break
        choice = answer.choices[0]
        text = choice.message.content or ""
        messages.append({"role": "assistant", "content": text})
        prompt_tokens = answer.usage.prompt_tokens
        ended_by_model += choice.finish_reason == "stop"
        turns_done = turn
        print(f"[turn {turn}] user: {question}\n  assistant ({choice.finish_reason}, prompt {prompt_tokens} + "
              f"answer {answer.usage.completion_tokens} tokens): {text!r}", flush=True)
    return {"turns": turns_done, "asked": args.turns, "ended_by_model": ended_by_model,
            "last_prompt_tokens": prompt_tokens, "context_length": context}


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = run_conversation(args)
    context = f" of a {summary['context_length']}-token context" if summary["context_length"] else ""
    print(f"{summary['turns']} of {summary['asked']} turns answered, {summary['ended_by_model']} of them ended by "
          f"the model; the last prompt was {summary['last_prompt_tokens']} tokens{context}")
    print(result_line("conversation_turns", summary["turns"], ">=", summary["asked"]))
    return 0 if summary["turns"] == summary["asked"] else 1


if __name__ == "__main__":
    sys.exit(main())
