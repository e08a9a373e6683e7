"""Tests of nanochat.engine: KV-cache decoding against full recomputation, seeded sampling, stop
tokens, and the python tool's forced tokens.

The real-model tests use a tiny GPT whose weights are all random (the default init zeroes the
output projections, which would make every block the identity and hide cache bugs), with a
'SL' window pattern and a short context so that the sliding window really cuts. The tool and
stop-token tests use a scripted model that writes a chosen token sequence, so the tests know
exactly what the stream must hold.
"""


import math
import random
import re

import pytest
import torch

from nanochat.calculator import use_calculator
from nanochat.engine import Engine, draw_tokens, greedy_decode_without_cache, sample_next_token, uniform_numbers
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache
from nanochat.tokenizer import Tokenizer
from ray_jobs import bench_engine
from tests.tiny import CHAT_TEXT, random_gpt

@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_from_iterator(iter(CHAT_TEXT), vocab_size=300)


class ScriptedModel(torch.nn.Module):
    """Stands in for the GPT: its logits make the token after the prompt's position p be
    script[p - prompt_len] (a list there gives those tokens equal top logits, for sampling).
    Positions come from the KV cache, so a cache that loses track of a row shows at once."""

    def __init__(self, vocab_size: int, prompt_len: int, script: list, filler: int):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.prompt_len, self.script, self.filler = prompt_len, script, filler
        self.calls = []  # the batch size of every forward pass

    def get_device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, idx, kv_cache=None, last_only=False):
        batch, length = idx.shape
        self.calls.append(batch)
        logits = torch.full((batch, length, self.config.vocab_size), -10.0)
        for row in range(batch):
            index = int(kv_cache.cache_seqlens[row]) + length - self.prompt_len
            wanted = self.script[index] if index < len(self.script) else self.filler
            logits[row, -1, wanted if isinstance(wanted, list) else [wanted]] = 10.0
        kv_cache.advance(length)
        return logits[:, -1:] if last_only else logits


def prompt_tokens(tokenizer, text: str = "What is 12 plus 30?") -> list[int]:
    return tokenizer.encode(text, prepend="<|bos|>")


def test_kv_cache_greedy_decoding_equals_full_recompute(tokenizer):
    # Seed 5: a model whose first 40 greedy tokens hold no special token (one would end the
    # Engine's generation early). The short window of layer 0 is sequence_len // 4 = 8 positions;
    # 40 new tokens go far past it, and past sequence_len itself (the rotary table has headroom for that).
    model = random_gpt(tokenizer.get_vocab_size(), seed=5)
    prompt = prompt_tokens(tokenizer)
    engine = Engine(model, tokenizer)
    sequences, masks = engine.generate_batch(prompt, num_samples=1, max_tokens=40, temperature=0.0)
    generated = sequences[0][len(prompt):]
    assert generated == greedy_decode_without_cache(model, prompt, 40)
    assert len(generated) == 40 and masks[0] == [0] * len(prompt) + [1] * 40
    assert len(set(generated)) > 3  # a model stuck on one token would prove little


def test_every_greedy_sample_equals_full_recompute(tokenizer):
    # Several samples decode on CPU through the transposed weights (GPT.transposed_weights): at
    # temperature 0 every row must still be the full-recompute greedy continuation.
    model = random_gpt(tokenizer.get_vocab_size(), seed=5)
    prompt = prompt_tokens(tokenizer)
    sequences, _ = Engine(model, tokenizer).generate_batch(prompt, num_samples=3, max_tokens=40, temperature=0.0)
    expected = greedy_decode_without_cache(model, prompt, 40)
    assert all(sequence[len(prompt):] == expected for sequence in sequences)
    assert all(linear.weight_t is None for linear in model.modules() if hasattr(linear, "weight_t"))


def test_cached_logits_match_full_forward_past_the_window(tokenizer):
    model = random_gpt(tokenizer.get_vocab_size())
    sequence = torch.randint(0, tokenizer.get_vocab_size(), (1, 30))
    full = model(sequence)
    cache = KVCache.for_model(model, batch_size=1, max_seq_len=30)
    steps = [model(sequence[:, :5], kv_cache=cache)]
    steps += [model(sequence[:, t:t + 1], kv_cache=cache) for t in range(5, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    # Guard: the same weights without the short window give other logits late in the sequence,
    # so the comparison above really covered windowed attention.
    unwindowed = random_gpt(tokenizer.get_vocab_size(), window_pattern="L")
    unwindowed.load_state_dict(model.state_dict())
    assert (unwindowed(sequence)[:, 20:] - full[:, 20:]).abs().max() > 1e-2
    assert "1" in model.value_embeds  # the value-embedding path is in play as well


def test_same_seed_reproduces_and_other_seeds_differ(tokenizer):
    engine = Engine(random_gpt(tokenizer.get_vocab_size()), tokenizer)
    prompt = prompt_tokens(tokenizer)
    settings = dict(num_samples=4, max_tokens=12, temperature=1.0, top_k=50)
    first, _ = engine.generate_batch(prompt, seed=7, **settings)
    again, _ = engine.generate_batch(prompt, seed=7, **settings)
    other, _ = engine.generate_batch(prompt, seed=8, **settings)
    assert first == again
    assert first != other
    # The samples of one call are independent draws, not copies of one another.
    assert len({tuple(row) for row in first}) > 1


def test_temperature_zero_is_argmax_and_top_k_limits_the_choice():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])
    rng = random.Random(0)
    assert sample_next_token(logits, rng, 0.0, None).tolist() == [1, 0]
    draws = {tuple(sample_next_token(logits, rng, 5.0, 2).tolist()) for _ in range(200)}
    assert {row[0] for row in draws} == {1, 3}  # only the two largest logits of row 0 ever come out
    assert {row[1] for row in draws} <= {0, 1, 2, 3} and len({row[1] for row in draws}) == 2


def test_draws_follow_the_softmax_of_each_rows_temperature():
    # Row 0: probabilities 1/4, 3/4 at temperature 1; row 1 the same logits at temperature 2
    # (sqrt(3) : 1 against 1, so 0.366 / 0.634); row 2 has a zero-probability entry.
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)], [-math.inf, 0.0]])
    temperatures = torch.tensor([[1.0], [2.0], [1.0]], dtype=torch.float64)
    rng = random.Random(3)
    counts = torch.zeros(3, 2)
    for _ in range(4000):
        drawn = draw_tokens(logits, uniform_numbers([rng] * 3), temperatures, None)
        counts[torch.arange(3), drawn] += 1
    shares = counts[:, 1] / 4000
    assert abs(shares[0] - 0.75) < 0.03 and abs(shares[1] - 1 / (1 + 3 ** -0.5)) < 0.03
    assert shares[2] == 1.0
    # The edges of [0, 1) never pick the zero-probability entry.
    edges = torch.tensor([0.0, 1.0 - 2 ** -53], dtype=torch.float64)
    assert draw_tokens(logits[2:].expand(2, -1), edges, 1.0, None).tolist() == [1, 1]


def test_tool_call_forces_the_calculator_output_with_mask_zero(tokenizer):
    special = tokenizer.encode_special
    expression = tokenizer.encode("12+30")
    result = use_calculator("12+30")
    assert result is not None and "42" in result
    forced = [special("<|output_start|>")] + tokenizer.encode(str(result)) + [special("<|output_end|>")]
    answer = tokenizer.encode(" done")
    called = [special("<|python_start|>")] + expression + [special("<|python_end|>")]
    # While the tool output is forced the script asks for '<|bos|>', which would end the row:
    # the forced tokens must win over whatever the model prefers.
    script = called + [tokenizer.get_bos_token_id()] * len(forced) + answer + [special("<|assistant_end|>")]
    prompt = prompt_tokens(tokenizer)
    engine = Engine(ScriptedModel(tokenizer.get_vocab_size(), len(prompt), script, filler=0), tokenizer)

    columns = list(engine.generate(prompt, max_tokens=60, temperature=0.0))
    tokens = [column[0][0] for column in columns]
    masks = [column[1][0] for column in columns]
    assert tokens == called + forced + answer + [special("<|assistant_end|>")]
    assert masks == [1] * len(called) + [0] * len(forced) + [1] * (len(answer) + 1)

    sequences, batch_masks = engine.generate_batch(prompt, max_tokens=60, temperature=0.0)
    assert sequences[0] == prompt + called + forced + answer
    assert batch_masks[0] == [0] * len(prompt) + masks[:-1]


def test_a_refused_expression_forces_nothing(tokenizer):
    special = tokenizer.encode_special
    called = [special("<|python_start|>")] + tokenizer.encode("open('x')") + [special("<|python_end|>")]
    assert use_calculator("open('x')") is None
    answer = tokenizer.encode(" ok")
    script = called + answer + [special("<|assistant_end|>")]
    prompt = prompt_tokens(tokenizer)
    engine = Engine(ScriptedModel(tokenizer.get_vocab_size(), len(prompt), script, filler=0), tokenizer)
    sequences, masks = engine.generate_batch(prompt, max_tokens=60, temperature=0.0)
    assert sequences[0] == prompt + called + answer
    assert masks[0][len(prompt):] == [1] * (len(called) + len(answer))


def test_rows_that_finish_leave_the_batch_and_repeat_their_last_token(tokenizer):
    end = tokenizer.encode_special("<|assistant_end|>")
    a, b = tokenizer.encode("a")[0], tokenizer.encode("b")[0]
    # First token: 'a' or <|assistant_end|> at even odds, so some of the 8 rows stop at once;
    # the rest write 'b' 'b' and stop.
    script = [[a, end], b, b, end]
    prompt = prompt_tokens(tokenizer)
    model = ScriptedModel(tokenizer.get_vocab_size(), len(prompt), script, filler=0)
    engine = Engine(model, tokenizer)
    columns = list(engine.generate(prompt, num_samples=8, max_tokens=10, temperature=1.0, seed=3))
    first_tokens = columns[0][0]
    stopped = [i for i, token in enumerate(first_tokens) if token == end]
    assert 0 < len(stopped) < 8
    assert len(columns) == 4  # every row is done after its <|assistant_end|>, so the stream ends
    for row in range(8):
        row_tokens = [column[0][row] for column in columns]
        row_masks = [column[1][row] for column in columns]
        if row in stopped:
            assert row_tokens == [end] * 4 and row_masks == [1, 0, 0, 0]
        else:
            assert row_tokens == [a, b, b, end] and row_masks == [1, 1, 1, 1]
    # The prefill runs at batch 1, then the decode batch shrinks to the rows still going.
    assert model.calls == [1, 8 - len(stopped), 8 - len(stopped), 8 - len(stopped)]
    sequences, _ = engine.generate_batch(prompt, num_samples=8, max_tokens=10, temperature=1.0, seed=3)
    assert [len(s) - len(prompt) for s in sequences] == [0 if i in stopped else 3 for i in range(8)]


class StopAfterTrigger(torch.nn.Module):
    """A real GPT whose <|assistant_end|> logit is +50 right after a token with id % 7 == 3 and
    -50 everywhere else: sampled rows then finish at different steps, at positions that a full
    recompute of their own sequence can confirm."""

    def __init__(self, gpt: GPT, end_token: int):
        super().__init__()
        self.gpt, self.config, self.end_token = gpt, gpt.config, end_token

    def get_device(self) -> torch.device:
        return self.gpt.get_device()

    def forward(self, idx, kv_cache=None, last_only=False):
        logits = self.gpt(idx, kv_cache=kv_cache, last_only=last_only)
        idx = idx[:, -1:] if last_only else idx
        logits[..., self.end_token] = torch.where(idx % 7 == 3, 50.0, -50.0)
        return logits


def test_every_sampled_row_continues_its_own_context_as_rows_leave(tokenizer):
    end = tokenizer.encode_special("<|assistant_end|>")
    model = StopAfterTrigger(random_gpt(tokenizer.get_vocab_size(), sequence_len=64), end)
    prompt = prompt_tokens(tokenizer)
    assert prompt[-1] % 7 != 3
    columns = list(Engine(model, tokenizer).generate(prompt, num_samples=6, max_tokens=30, temperature=1.0,
                                                     top_k=2, seed=5))
    rows = []
    for row in range(6):
        tokens = [column[0][row] for column in columns]
        rows.append(tokens[:tokens.index(end) + 1] if end in tokens else tokens)
    assert len({len(tokens) for tokens in rows}) >= 3  # rows left the batch at different steps
    for tokens in rows:
        # With top_k=2 each token is one of the two best continuations of the row's own context;
        # a row decoded on another row's cache would soon pick tokens outside its own top 2.
        full = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1]
        top2 = full.topk(2, dim=-1).indices
        assert all(token in top2[i].tolist() for i, token in enumerate(tokens))


def test_max_tokens_bounds_the_stream(tokenizer):
    engine = Engine(random_gpt(tokenizer.get_vocab_size()), tokenizer)
    columns = list(engine.generate(prompt_tokens(tokenizer), num_samples=2, max_tokens=5, temperature=0.0))
    assert len(columns) == 5 and all(len(tokens) == 2 for tokens, _ in columns)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tokens=[]), "non-empty list of token ids"),
    (dict(tokens="hello"), "non-empty list of token ids"),
    (dict(tokens=[1, 10_000]), "token ids in"),
    (dict(tokens=[1], temperature=-1.0), "temperature"),
    (dict(tokens=[1], top_k=0), "top_k"),
    (dict(tokens=[1], num_samples=0), "num_samples"),
    (dict(tokens=[1], max_tokens=0), "max_tokens"),
    (dict(tokens=[1] * 40), "fills the model's context"),
])
def test_bad_arguments_raise_clear_errors(tokenizer, kwargs, message):
    engine = Engine(random_gpt(tokenizer.get_vocab_size()), tokenizer)
    with pytest.raises(ValueError, match=message):
        list(engine.generate(**kwargs))


def test_benchmark_prints_every_row_of_its_table_and_caching_and_batching_pay(capsys):
    # A context of 1000 tokens, where recomputing the whole sequence for every token costs far more
    # than a decoding step with the cache: measured on 2 loaded CPUs, the cache decoded 15-23x as
    # fast as the naive loop and 8 concurrent requests got 2.6-7.8x the throughput of one. Asserted:
    # 5x (the benchmark's own target) and 2x (under its 3x target, which the loaded machine can
    # miss at this size). An Engine that recomputes the sequence at every step runs at about 1x,
    # and a scheduler that serves one request at a time at about 1x.
    results = bench_engine.main(["--depth", "1", "--vocab-size", "512", "--context", "1000", "--decode-tokens", "8",
                                 "--naive-tokens", "3", "--request-prompt", "4", "--request-tokens", "12",
                                 "--concurrency", "1,8", "--repeats", "2"])
    assert set(results) == {"prefill", "naive", "kv_cache", "scheduler_1", "scheduler_8", "burst_ms_together",
                            "burst_ms_each", "engine_step_us_1", "engine_step_us_32", "scheduler_step_us_1",
                            "scheduler_step_us_32"}
    assert all(rate > 0 for rate in results.values())
    assert results["kv_cache"] > bench_engine.KV_CACHE_TARGET * results["naive"], results
    assert results["scheduler_8"] > 2 * results["scheduler_1"], results
    out = capsys.readouterr().out
    assert "decode batch 1, KV cache @1000" in out and "scheduler, 8 concurrent" in out
    assert "batch 32: Engine" in out and "a burst of 8 requests" in out
    # A burst's one prefill pass beats a pass per request even at depth 1, where a pass costs little.
    assert results["burst_ms_together"] < results["burst_ms_each"], results
    verdicts = out.splitlines()[-3:]
    assert re.fullmatch(r"RESULT kv_cache_vs_naive [0-9.]+ target >= 5 PASS", verdicts[0]), verdicts
    assert re.fullmatch(r"RESULT burst_one_prefill_pass_vs_one_each [0-9.]+ target >= 1.2 (PASS|FAIL)",
                        verdicts[1]), verdicts
    assert re.fullmatch(r"RESULT scheduler_8_vs_1 [0-9.]+ target >= 3 (PASS|FAIL)", verdicts[2]), verdicts
