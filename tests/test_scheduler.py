"""Tests of the continuous-batching scheduler (nanochat.scheduler).

The central property: a request's greedy output does not depend on what else is in the batch, so
8 requests of different lengths, submitted at different steps and decoded together (with a cap
that makes some of them queue, and a cancelled neighbour), each equal Engine.generate run alone.
Around it: cancel frees a row, the queue is FIFO under both capacity bounds, per-request seeds,
tool use and stop tokens per row, and streaming to a thread and to asyncio from the loop thread.
"""

import asyncio
import gc
import threading

import pytest
import torch

from nanochat.calculator import use_calculator
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, Linear
from nanochat.scheduler import (FINISH_CANCELLED, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, PREFILL_PADDING,
                                Scheduler)
from nanochat.tokenizer import Tokenizer
from tests.tiny import CHAT_TEXT, random_gpt

@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_from_iterator(iter(CHAT_TEXT), vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    """Depth 2, width 64, every weight random (so every layer matters), a window that cuts."""
    gpt = random_gpt(tokenizer.get_vocab_size(), sequence_len=64)
    with torch.no_grad():
        # The random model must not stop requests early or call the tool: rule out special tokens.
        gpt.lm_head.weight[tokenizer.encode_special("<|bos|>"):] = 0.0
    return gpt.eval()


class ScriptedModel(torch.nn.Module):
    """Logits that make the token after a row's position p be script[p - prompt_len]."""

    def __init__(self, vocab_size: int, prompt_len: int, script: list[int], filler: int):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.prompt_len, self.script, self.filler = prompt_len, script, filler

    def get_device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, idx, kv_cache=None, last_only=False):
        batch, length = idx.shape
        logits = torch.full((batch, length, self.config.vocab_size), -10.0)
        for row in range(batch):
            index = int(kv_cache.cache_seqlens[row]) + length - self.prompt_len
            logits[row, -1, self.script[index] if index < len(self.script) else self.filler] = 10.0
        kv_cache.advance(length)
        return logits[:, -1:] if last_only else logits


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    texts = ["What is 12 plus 30?", "The quick brown fox", "Once upon a time", "How many r are in strawberry?",
             "a", "7 + 5 = 12. Once upon a time a small model", "lazy dog", "It is 42."]
    return [tokenizer.encode(texts[i % len(texts)], prepend="<|bos|>") for i in range(count)]


def run_until_idle(scheduler: Scheduler, limit: int = 1000) -> int:
    steps = 0
    while scheduler.has_work():
        scheduler.step()
        steps += 1
        assert steps < limit, "the scheduler never drained"
    return steps


def test_interleaved_requests_equal_their_solo_outputs(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompts = make_prompts(tokenizer, 8)
    budgets = [5, 17, 9, 24, 3, 12, 20, 7]
    submit_at_step = [0, 0, 1, 3, 3, 4, 8, 9]
    solo = [engine.generate_batch(prompt, max_tokens=budget, temperature=0.0)[0][0][len(prompt):]
            for prompt, budget in zip(prompts, budgets)]

    # 5 rows for 8 requests: some must queue; a 9th request is cancelled while it decodes.
    scheduler = Scheduler(model, tokenizer, max_batch_size=5, max_seq_len=64)
    requests = [None] * 8
    extra = None
    step = 0
    while step < 200 and (step <= max(submit_at_step) or scheduler.has_work()):
        for i in range(8):
            if submit_at_step[i] == step:
                requests[i] = scheduler.submit(prompts[i], max_tokens=budgets[i], temperature=0.0)
        if step == 2:
            extra = scheduler.submit(prompts[3], max_tokens=30, temperature=0.0)
        if step == 6:
            scheduler.cancel(extra)
        scheduler.step()
        step += 1
    assert not scheduler.has_work()
    for i, request in enumerate(requests):
        assert request.finish_reason == FINISH_LENGTH
        assert request.tokens == solo[i], f"request {i} differs from its solo run"
        assert request.masks == [1] * budgets[i]
    assert extra.finish_reason == FINISH_CANCELLED and 0 < len(extra.tokens) < 30
    stats = scheduler.stats()
    assert stats["active"] == 0 and stats["queued"] == 0 and stats["reserved_cache_tokens"] == 0
    assert stats["tokens_generated"] == sum(budgets) + len(extra.tokens) and stats["requests_finished"] == 9
    assert stats["tokens_per_second"] > 0


def _count_passes(model, monkeypatch) -> list[tuple]:
    """Record every forward pass of `model`: (rows, length, row_lengths)."""
    passes = []
    forward = model.forward

    def recording(idx, *args, **kwargs):
        passes.append((idx.size(0), idx.size(1), kwargs.get("row_lengths")))
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    return passes


def test_prompts_admitted_together_share_one_padded_pass_and_equal_their_solo_outputs(model, tokenizer,
                                                                                       monkeypatch):
    engine = Engine(model, tokenizer)
    prompts = [make_prompts(tokenizer, 8)[i] for i in (0, 2, 6)]
    lengths = [len(prompt) for prompt in prompts]
    assert len(set(lengths)) == 3 and 3 * max(lengths) <= PREFILL_PADDING * sum(lengths)  # one padded pass
    solo = [engine.generate_batch(prompt, max_tokens=6, temperature=0.0)[0][0][len(prompt):] for prompt in prompts]
    scheduler = Scheduler(model, tokenizer, max_batch_size=4, max_seq_len=64, prefix_cache_tokens=0)
    passes = _count_passes(model, monkeypatch)
    requests = [scheduler.submit(prompt, max_tokens=6, temperature=0.0) for prompt in prompts]
    scheduler.step()
    assert passes == [(3, max(lengths), lengths)]
    run_until_idle(scheduler)
    assert [request.tokens for request in requests] == solo


def test_a_burst_of_one_prompt_computes_it_once_then_prefills_the_rest_together(model, tokenizer, monkeypatch):
    prompt = make_prompts(tokenizer, 6)[5]  # the longest: several blocks of 4
    scheduler = Scheduler(model, tokenizer, max_batch_size=5, max_seq_len=64, prefix_block_size=4)
    passes = _count_passes(model, monkeypatch)
    requests = [scheduler.submit(prompt, max_tokens=4, temperature=0.0) for _ in range(5)]
    scheduler.step()
    # The first computes the whole prompt; the others wait for its blocks and compute the rest together.
    hit = (len(prompt) - 1) // 4 * 4
    assert passes == [(1, len(prompt), None), (4, len(prompt) - hit, None)]
    assert [request.prefix_hit_tokens for request in requests] == [0] + [hit] * 4
    run_until_idle(scheduler)
    assert len({tuple(request.tokens) for request in requests}) == 1


def test_a_pass_is_split_where_padding_would_outweigh_the_prompts(model, tokenizer, monkeypatch):
    # A pass's positions, padding included, may be at most PREFILL_PADDING times its prompts' own.
    short, long = [tokenizer.get_bos_token_id(), 5], make_prompts(tokenizer, 6)[5]
    assert PREFILL_PADDING == 2 and len(long) > 8  # so the long one pairs with one short one, not two
    scheduler = Scheduler(model, tokenizer, max_batch_size=4, max_seq_len=64, prefix_cache_tokens=0)
    passes = _count_passes(model, monkeypatch)
    for prompt in (long, short, short, short):
        scheduler.submit(prompt, max_tokens=2, temperature=0.0)
    scheduler.step()
    assert passes == [(2, len(long), [len(long), 2]), (2, 2, None)]
    # prefill_positions bounds a pass's size: at 4 the short prompts pair up; at 1 each takes its own.
    for limit, expected in [(4, [(2, 2, None), (1, 2, None)]), (1, [(1, 2, None)] * 3)]:
        passes.clear()
        scheduler = Scheduler(model, tokenizer, max_batch_size=4, max_seq_len=64, prefix_cache_tokens=0,
                              prefill_positions=limit)
        for _ in range(3):
            scheduler.submit(short, max_tokens=2, temperature=0.0)
        scheduler.step()
        assert passes == expected
    with pytest.raises(ValueError, match="prefill_positions"):
        Scheduler(model, tokenizer, prefill_positions=0)


def test_a_cpu_scheduler_decodes_through_transposed_weights_held_until_shutdown(model, tokenizer):
    """GPT.transposed_weights' copies are taken when the scheduler is made (only when asked for),
    decoding passes multiply by them, and shutdown or collection drops them; greedy outputs are
    those of the plain weights."""
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    prompts = make_prompts(tokenizer, 3)
    outputs = {}
    for transposed in (False, True):
        scheduler = Scheduler(model, tokenizer, max_batch_size=4, transposed_weights=transposed)
        assert all((linear.weight_t is not None) == transposed for linear in linears)
        requests = [scheduler.submit(prompt, max_tokens=12, temperature=0.0) for prompt in prompts]
        run_until_idle(scheduler)
        outputs[transposed] = [request.tokens for request in requests]
        scheduler.shutdown()
        assert all(linear.weight_t is None for linear in linears)
    assert outputs[True] == outputs[False]

    scheduler = Scheduler(model, tokenizer, max_batch_size=4)
    model.lm_head.weight_t = -model.lm_head.weight_t  # a copy that differs: decoding through it shows
    request = scheduler.submit(prompts[0], max_tokens=12, temperature=0.0)
    run_until_idle(scheduler)
    assert request.tokens != outputs[False][0]
    del scheduler
    gc.collect()
    assert all(linear.weight_t is None for linear in linears)


def test_cancel_frees_the_row_for_the_next_request(model, tokenizer):
    first, second = make_prompts(tokenizer, 2)
    scheduler = Scheduler(model, tokenizer, max_batch_size=1, max_seq_len=64)
    a = scheduler.submit(first, max_tokens=20, temperature=0.0)
    b = scheduler.submit(second, max_tokens=4, temperature=0.0)
    scheduler.step()
    scheduler.step()
    assert len(a.tokens) == 2 and b.tokens == []
    assert scheduler.stats()["active"] == 1 and scheduler.stats()["queued"] == 1
    scheduler.cancel(a)
    scheduler.step()
    assert a.finish_reason == FINISH_CANCELLED and len(a.tokens) == 2
    assert len(b.tokens) == 1 and scheduler.stats()["active"] == 1 and scheduler.stats()["queued"] == 0
    run_until_idle(scheduler)
    alone, _ = Engine(model, tokenizer).generate_batch(second, max_tokens=4, temperature=0.0)
    assert b.tokens == alone[0][len(second):]
    # A queued request is dropped at once, without waiting for a step.
    c = scheduler.submit(first, max_tokens=3)
    d = scheduler.submit(first, max_tokens=3)
    scheduler.cancel(d)
    assert d.finish_reason == FINISH_CANCELLED and scheduler.stats()["queued"] == 1
    run_until_idle(scheduler)
    assert c.finish_reason == FINISH_LENGTH and d.tokens == []


@pytest.mark.parametrize("bound", ["rows", "cache_tokens"])
def test_requests_over_capacity_wait_in_fifo_order(model, tokenizer, bound):
    prompts = make_prompts(tokenizer, 1) * 6
    budgets = [6, 4, 7, 5, 6, 4]
    if bound == "rows":
        scheduler = Scheduler(model, tokenizer, max_batch_size=2, max_seq_len=64)
    else:
        # Room for any two reservations (prompt + max_tokens) but never for three.
        reservations = sorted(len(p) + b for p, b in zip(prompts, budgets))
        assert sum(reservations[-2:]) < sum(reservations[:3])
        scheduler = Scheduler(model, tokenizer, max_batch_size=6, max_seq_len=64,
                              max_cache_tokens=sum(reservations[-2:]))
    requests = [scheduler.submit(p, max_tokens=b, temperature=0.0) for p, b in zip(prompts, budgets)]
    started_at = {}
    step = 0
    while scheduler.has_work():
        scheduler.step()
        stats = scheduler.stats()
        assert stats["active"] <= 2 and stats["reserved_cache_tokens"] <= scheduler.max_cache_tokens
        for i, request in enumerate(requests):
            if request.tokens and i not in started_at:
                started_at[i] = step
        step += 1
    order = sorted(range(6), key=lambda i: (started_at[i], i))
    assert order == list(range(6))
    assert started_at[2] > 0 and started_at[5] > started_at[2]  # later requests really waited
    assert all(len(r.tokens) == b for r, b in zip(requests, budgets))


def test_each_request_samples_with_its_own_seed(model, tokenizer):
    prompt = make_prompts(tokenizer, 1)[0]
    scheduler = Scheduler(model, tokenizer, max_batch_size=4, max_seq_len=64)
    same = [scheduler.submit(prompt, max_tokens=15, temperature=1.0, top_k=40, seed=11) for _ in range(2)]
    other = scheduler.submit(prompt, max_tokens=15, temperature=1.0, top_k=40, seed=12)
    greedy = scheduler.submit(prompt, max_tokens=15, temperature=0.0)
    run_until_idle(scheduler)
    assert same[0].tokens == same[1].tokens
    assert same[0].tokens != other.tokens
    engine = Engine(model, tokenizer)
    # A request draws exactly what Engine.generate draws alone with that seed.
    alone, _ = engine.generate_batch(prompt, max_tokens=15, temperature=1.0, top_k=40, seed=11)
    assert same[0].tokens == alone[0][len(prompt):]
    assert greedy.tokens == engine.generate_batch(prompt, max_tokens=15, temperature=0.0)[0][0][len(prompt):]


@pytest.mark.parametrize("settings", [
    # (temperature, top_k) per request: every row alike (one draw for the batch), one top_k at
    # several temperatures (one draw, a tensor of temperatures), and a mix of greedy rows,
    # temperatures and top_k values (a draw per top_k).
    [(1.0, 40)] * 3,
    [(1.0, 40), (0.7, 40), (1.3, 40)],
    [(1.0, 40), (0.7, 40), (1.0, None), (1.3, 10), (0.0, None)],
])
def test_rows_with_any_mix_of_sampling_settings_draw_what_they_draw_alone(model, tokenizer, settings):
    prompts = make_prompts(tokenizer, len(settings))
    scheduler = Scheduler(model, tokenizer, max_batch_size=len(settings), max_seq_len=64)
    requests = [scheduler.submit(prompt, max_tokens=12, temperature=temperature, top_k=top_k, seed=seed)
                for seed, (prompt, (temperature, top_k)) in enumerate(zip(prompts, settings))]
    run_until_idle(scheduler)
    engine = Engine(model, tokenizer)
    for seed, (prompt, request, (temperature, top_k)) in enumerate(zip(prompts, requests, settings)):
        alone, _ = engine.generate_batch(prompt, max_tokens=12, temperature=temperature, top_k=top_k, seed=seed)
        assert request.tokens == alone[0][len(prompt):], f"request {seed} ({temperature}, {top_k}) differs"


def test_tool_use_and_stop_tokens_per_row(tokenizer):
    special = tokenizer.encode_special
    called = [special("<|python_start|>")] + tokenizer.encode("12+30") + [special("<|python_end|>")]
    forced = ([special("<|output_start|>")] + tokenizer.encode(str(use_calculator("12+30")))
              + [special("<|output_end|>")])
    answer = tokenizer.encode(" ok")
    script = called + [0] * len(forced) + answer + [special("<|assistant_end|>")]
    prompt = make_prompts(tokenizer, 1)[0]
    scripted = ScriptedModel(tokenizer.get_vocab_size(), len(prompt), script, filler=1)
    scheduler = Scheduler(scripted, tokenizer, max_batch_size=3, max_seq_len=64)
    early = scheduler.submit(prompt, max_tokens=40, temperature=0.0)
    scheduler.step()
    scheduler.step()
    late = scheduler.submit(prompt, max_tokens=40, temperature=0.0)
    short = scheduler.submit(prompt, max_tokens=3, temperature=0.0)
    run_until_idle(scheduler)
    for request in (early, late):
        assert request.finish_reason == FINISH_STOP
        assert request.tokens == called + forced + answer  # <|assistant_end|> is not streamed
        assert request.masks == [1] * len(called) + [0] * len(forced) + [1] * len(answer)
    assert short.finish_reason == FINISH_LENGTH and short.tokens == called[:3]


def test_streaming_from_the_loop_thread_to_a_thread_and_to_asyncio(model, tokenizer):
    prompts = make_prompts(tokenizer, 3)
    scheduler = Scheduler(model, tokenizer, max_batch_size=2, max_seq_len=64)
    scheduler.start()
    try:
        threaded = scheduler.submit(prompts[0], max_tokens=12, temperature=0.0)
        received_in_thread = []
        reader = threading.Thread(target=lambda: received_in_thread.extend(threaded))
        reader.start()

        async def consume(prompt):
            request = scheduler.submit(prompt, max_tokens=10, temperature=0.0)
            return request, [token async for token in request]

        async def consume_in_batches(prompt):
            request = scheduler.submit(prompt, max_tokens=10, temperature=0.0)
            batches = []
            async for tokens in request.token_batches():
                batches.append(tokens)
                await asyncio.sleep(0.3)  # a slow consumer: the tokens of several steps wait for it
            return request, batches

        async def consume_in_groups_of_4(prompt):
            request = scheduler.submit(prompt, max_tokens=10, temperature=0.0)
            return [tokens async for tokens in request.token_batches(batch_tokens=lambda: 4)]

        async def consume_both():
            return await asyncio.gather(consume(prompts[1]), consume(prompts[2]))

        streamed = asyncio.run(consume_both())
        batched, batches = asyncio.run(consume_in_batches(prompts[1]))
        assert [token for batch in batches for token in batch] == batched.tokens == streamed[0][1]
        assert all(batches) and len(batches) < len(batched.tokens)  # whole lists, several tokens in some
        groups = asyncio.run(consume_in_groups_of_4(prompts[1]))
        # The first tokens at once, then lists of at least 4 but for the last.
        assert [token for group in groups for token in group] == batched.tokens
        assert len(groups) >= 2 and all(len(group) >= 4 for group in groups[1:-1])
        reader.join(timeout=60)
        assert received_in_thread == threaded.result(timeout=60) and len(received_in_thread) == 12
        engine = Engine(model, tokenizer)
        for (request, tokens), prompt in zip(streamed, prompts[1:]):
            assert tokens == request.tokens
            assert tokens == engine.generate_batch(prompt, max_tokens=10, temperature=0.0)[0][0][len(prompt):]
        pending = scheduler.submit(prompts[0], max_tokens=40, temperature=0.0)
    finally:
        scheduler.shutdown()
    assert pending.result(timeout=10) == pending.tokens and pending.finish_reason in (FINISH_CANCELLED, FINISH_LENGTH)
    with pytest.raises(RuntimeError, match="shut down"):
        scheduler.submit(prompts[0], max_tokens=1)


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(model, tokenizer):
    prompt = make_prompts(tokenizer, 1)[0]
    scheduler = Scheduler(model, tokenizer, max_batch_size=2, max_seq_len=64)
    original_forward = model.forward
    broken = {"on": True}

    def flaky_forward(*args, **kwargs):
        if broken["on"]:
            raise RuntimeError("device lost")
        return original_forward(*args, **kwargs)

    model.forward = flaky_forward
    try:
        scheduler.start()
        doomed = scheduler.submit(prompt, max_tokens=5, temperature=0.0)
        with pytest.raises(RuntimeError, match="device lost"):
            doomed.result(timeout=30)
        assert doomed.finish_reason == FINISH_ERROR
        with pytest.raises(RuntimeError, match="device lost"):
            list(doomed)
        broken["on"] = False
        healthy = scheduler.submit(prompt, max_tokens=5, temperature=0.0)
        assert len(healthy.result(timeout=30)) == 5
    finally:
        scheduler.shutdown()
        del model.forward
    assert scheduler.stats()["reserved_cache_tokens"] == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_tokens=[]), "non-empty list of token ids"),
    (dict(prompt_tokens=[1] * 64), "shorten the conversation"),
    (dict(prompt_tokens=[1] * 10, max_tokens=60), "ask for at most 54"),
    (dict(prompt_tokens=[1], max_tokens=0), "max_tokens"),
    (dict(prompt_tokens=[1], temperature=-0.5), "temperature"),
    (dict(prompt_tokens=[1], top_k=-3), "top_k"),
])
def test_bad_requests_are_refused_at_submit(model, tokenizer, kwargs, message):
    scheduler = Scheduler(model, tokenizer, max_batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError, match=message):
        scheduler.submit(**kwargs)
    assert scheduler.stats()["queued"] == 0


def test_a_request_larger_than_the_cache_budget_is_refused(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch_size=2, max_seq_len=64, max_cache_tokens=20)
    with pytest.raises(ValueError, match="cache budget is 20"):
        scheduler.submit([1] * 10, max_tokens=11)
