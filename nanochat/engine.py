"""Text generation with a KV cache, sampling and the python (calculator) tool.

`Engine.generate` turns a prompt into a stream of token columns, one column per decoding step and
one entry per sample: the prompt is run through the model once (batch 1), its KV cache is copied
into `num_samples` rows, and every step then feeds each row only its newest token. That is why
generation costs O(context) per token instead of O(context^2): nothing about the prompt or the
earlier tokens is ever recomputed. `Engine.generate_batch` collects the same stream into finished
sequences (what RL rollouts and evals want).

Tool use follows the chat format of the tokenizer: when a row writes
`<|python_start|> expression <|python_end|>`, the expression goes to the calculator and
`<|output_start|> result <|output_end|>` is forced into that row, one token per step, with mask 0
(the model did not choose those tokens, so RL must not credit or blame it for them). The
per-row logic (`RowState`) and the sampling (`sample_next_token`) are shared with the
continuous-batching scheduler in nanochat.scheduler, so a request decodes the same way in both.

Rows that finish early leave the batch: live rows are kept packed into the first rows of the
cache, and the model runs on that prefix only. On a CPU the decoding steps multiply by transposed
copies of the weights where that pays (GPT.transposed_weights), taken for the length of one generation.
"""

import contextlib
import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch

from nanochat.calculator import use_calculator
from nanochat.kv_cache import KVCache


def check_sampling_settings(temperature, top_k, seed) -> None:
    """Raise ValueError for sampling settings that cannot be honoured."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be a number >= 0 (0 means greedy decoding)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive int, or None to sample from the whole vocabulary")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an int")


def check_prompt(tokens, vocab_size: int) -> list[int]:
    """The prompt as a list of ints, or ValueError when it is empty or holds something else."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) or len(tokens) == 0:
        raise ValueError("the prompt must be a non-empty list of token ids; encode text with the tokenizer first")
    bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"the prompt holds {len(bad)} entries that are not token ids in [0, {vocab_size}), "
                         f"e.g. {bad[0]!r}; encode it with this model's tokenizer")
    return [int(t) for t in tokens]


def sample_next_token(logits: torch.Tensor, rng: random.Random, temperature: float,
                      top_k: int | None) -> torch.Tensor:
    """One token id per row of `logits` (rows, vocab): the argmax at temperature 0, else a draw
    from softmax(logits / temperature), restricted to the top_k largest logits when top_k is set,
    with one number per row from `rng`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return draw_tokens(logits, uniform_numbers([rng] * logits.size(0), logits.device), temperature, top_k)


def weight_copies_for(model, max_rows: int) -> contextlib.AbstractContextManager:
    """`model.transposed_weights(max_rows)`: while inside, passes of a few rows on a CPU multiply by
    transposed copies of the weights laid out in memory (GPT.transposed_weights decides where they
    pay); nothing for a stand-in model without them."""
    transposed = getattr(model, "transposed_weights", None)
    return transposed(max_rows) if transposed is not None else contextlib.nullcontext()


def uniform_numbers(rngs: list[random.Random], device: torch.device | str = "cpu") -> torch.Tensor:
    """One number in [0, 1) from each random.Random of `rngs`, in order, as a float64 tensor. A
    stream of draws (an Engine call, a scheduler request) owns its random.Random, seeded once: its
    draws depend on its seed alone, never on the global RNG or on the rows batched with it, and a
    number costs no torch op (a torch.Generator per row cost five ops per row and step)."""
    return torch.tensor([rng.random() for rng in rngs], dtype=torch.float64, device=device)


def draw_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float | torch.Tensor,
                top_k: int | None) -> torch.Tensor:
    """One token id per row of `logits` (rows, vocab), drawn from softmax(logits / temperature)
    (restricted to the top_k largest logits when top_k is set) by inverting the row's cumulative
    distribution at its number of `uniforms` (rows,). `temperature` is a float or a (rows, 1)
    tensor, so rows with different temperatures draw in one go. In float64, so that the last
    cumulative sum is exact enough that no number lands past it."""
    if top_k is not None and top_k < logits.size(-1):
        # Unsorted: the candidates' order only fixes which stretch of the cumulative distribution
        # each one takes, and ordering them costs a sort per row (a sixth of topk at 32 x 512).
        values, indices = torch.topk(logits, top_k, dim=-1, sorted=False)
        return indices.gather(-1, _invert_cdf(values, uniforms, temperature)).squeeze(-1)
    return _invert_cdf(logits, uniforms, temperature).squeeze(-1)


def _invert_cdf(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """(rows, 1) indices into the last dim of logits: the first whose cumulative probability
    exceeds the row's number (searchsorted right=True never picks a zero-probability entry)."""
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(dim=-1)
    chosen = torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True)
    return chosen.clamp_max_(logits.size(-1) - 1)


@dataclass(frozen=True)
class ToolUse:
    """The special token ids that drive generation, and the python tool behind them."""

    tokenizer: object
    python_start: int
    python_end: int
    output_start: int
    output_end: int
    stop_tokens: frozenset[int]  # a row that writes one of these is finished

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ToolUse":
        special = tokenizer.encode_special
        return cls(tokenizer=tokenizer, python_start=special("<|python_start|>"),
                   python_end=special("<|python_end|>"), output_start=special("<|output_start|>"),
                   output_end=special("<|output_end|>"),
                   stop_tokens=frozenset({special("<|assistant_end|>"), tokenizer.get_bos_token_id()}))

    def run(self, expression_tokens: list[int]) -> list[int]:
        """The tokens to force after a python block: <|output_start|> result <|output_end|>, or
        nothing when the calculator refuses the expression (the model then carries on by itself)."""
        result = use_calculator(self.tokenizer.decode(expression_tokens))
        if result is None:
            return []
        return [self.output_start, *self.tokenizer.encode(str(result)), self.output_end]


class RowState:
    """One generated sequence between steps: the tool output still waiting to be forced in, the
    expression of an open python block, and whether the sequence is finished."""

    def __init__(self, tool_use: ToolUse):
        self.tool_use = tool_use
        self.forced: deque[int] = deque()
        self.expression_tokens: list[int] | None = None  # a list while inside a python block
        self.last_token: int | None = None
        self.finished = False

    def advance(self, sampled_token: int) -> tuple[int, int]:
        """Take the next token, forced (mask 0) if the tool left some, else the sampled one
        (mask 1), and update the tool and stop state with it."""
        if self.forced:
            token, mask = self.forced.popleft(), 0
        else:
            token, mask = sampled_token, 1
        self.last_token = token
        tool = self.tool_use
        if token in tool.stop_tokens:
            self.finished = True
        elif token == tool.python_start:
            self.expression_tokens = []
        elif token == tool.python_end and self.expression_tokens is not None:
            if self.expression_tokens:
                self.forced.extend(tool.run(self.expression_tokens))
            self.expression_tokens = None
        elif self.expression_tokens is not None:
            self.expression_tokens.append(token)
        return token, mask


class Engine:
    """Generation for one model and its tokenizer (the tokenizer supplies the tool-use tokens)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.tool_use = ToolUse.from_tokenizer(tokenizer)

    def _token_budget(self, prompt_len: int, max_tokens) -> int:
        if max_tokens is None:
            # Without a limit a row may grow to the model's training context.
            budget = self.model.config.sequence_len - prompt_len
            if budget < 1:
                raise ValueError(f"the prompt has {prompt_len} tokens, which fills the model's context of "
                                 f"{self.model.config.sequence_len}; pass max_tokens or shorten the prompt")
            return budget
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} must be a positive int, or None to generate up to "
                             f"the model's context length")
        return max_tokens

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, mask_column) per step, one entry per sample.

        mask 1 = sampled by the model, 0 = forced by the python tool. A row finishes when it writes
        <|assistant_end|> or <|bos|> (that token is yielded); in later columns a finished row
        repeats its final token with mask 0. The stream ends when every row is finished or after
        max_tokens steps. The same arguments and seed give the same stream.
        """
        model = self.model
        tokens = check_prompt(tokens, model.config.vocab_size)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r} must be a positive int")
        check_sampling_settings(temperature, top_k, seed)
        budget = self._token_budget(len(tokens), max_tokens)
        device = model.get_device()
        rng = random.Random(seed)  # the output depends on the seed only (uniform_numbers)

        prefill_cache = KVCache.for_model(model, batch_size=1, max_seq_len=len(tokens))
        prompt = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = model(prompt, kv_cache=prefill_cache, last_only=True)[:, -1]
        cache = KVCache.for_model(model, batch_size=num_samples, max_seq_len=len(tokens) + budget)
        cache.prefill_from(prefill_cache)
        del prefill_cache
        # Every sample draws its first token from the same prompt distribution, independently.
        logits = logits.expand(num_samples, -1)

        rows = [RowState(self.tool_use) for _ in range(num_samples)]
        slot_owner = list(range(num_samples))  # slot_owner[s] = the sample whose sequence is in cache row s
        # A few rows on a CPU multiply much faster by transposed weights laid out in memory.
        with weight_copies_for(model, num_samples):
            for step in range(budget):
                sampled = sample_next_token(logits, rng, temperature, top_k).tolist()
                # Finished rows keep their last token, with mask 0; the live ones are overwritten.
                token_column = [row.last_token for row in rows]
                mask_column = [0] * num_samples
                for slot, sample in enumerate(slot_owner):
                    token_column[sample], mask_column[sample] = rows[sample].advance(sampled[slot])
                yield token_column, mask_column
                if step == budget - 1:
                    break
                # Close the gaps of the rows that just finished, from the highest slot down, so that the
                # row moved into a gap is always one that goes on.
                for slot in reversed(range(len(slot_owner))):
                    if rows[slot_owner[slot]].finished:
                        last = len(slot_owner) - 1
                        cache.move_row(last, slot)
                        slot_owner[slot] = slot_owner[last]
                        slot_owner.pop()
                if not slot_owner:
                    break
                next_ids = torch.tensor([[rows[sample].last_token] for sample in slot_owner],
                                        dtype=torch.long, device=device)
                live = cache if len(slot_owner) == num_samples else cache.rows(0, len(slot_owner))
                logits = model(next_ids, kv_cache=live)[:, -1]

    def generate_batch(self, tokens: list[int], num_samples: int = 1,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """(sequences, masks): per sample the prompt followed by the generated tokens, without the
        final <|assistant_end|>/<|bos|>; masks are 0 on the prompt and on forced tool output, 1 on
        sampled tokens. Takes generate()'s keyword arguments."""
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        finished = [False] * num_samples
        stop_tokens = self.tool_use.stop_tokens
        for token_column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, mask_column)):
                if finished[i]:
                    continue
                if token in stop_tokens:
                    finished[i] = True
                else:
                    sequences[i].append(token)
                    masks[i].append(mask)
        return sequences, masks


@torch.inference_mode()
def greedy_decode_without_cache(model, tokens: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding that reruns the model on the whole sequence for every new token: the slow
    reference that KV-cache decoding must match token for token (used by the tests and the
    benchmark). Ignores tools and stop tokens; returns the max_tokens new tokens."""
    tokens = check_prompt(tokens, model.config.vocab_size)
    sequence = torch.tensor([tokens], dtype=torch.long, device=model.get_device())
    for _ in range(max_tokens):
        next_token = model(sequence)[:, -1].argmax(dim=-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    return sequence[0, len(tokens):].tolist()
