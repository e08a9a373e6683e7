"""Tests of the prefix cache (nanochat.prefix_cache) on its own and inside the scheduler.

The central property: the cache changes no output. 50 random multi-turn conversations, each turn
resending the whole history as a chat client does, several sharing a system prompt and several
decoding at once, give the same greedy tokens with the cache as without it, token for token, on a
model with sliding-window layers that the conversations outgrow; and most prompt tokens come from
the cache. Under a budget of a few blocks, blocks are evicted all the time, yet every block a
running request holds keeps its keys and values, and the outputs are still the same. On its own,
the cache matches chains exactly (a block's identity includes everything before it), leaves a
prompt's last token to the prefill, evicts least recently used leaves first and never a held
block, and shares blocks between requests instead of copying them twice.
"""

import random

import pytest
import torch

from nanochat.kv_cache import KVCache
from nanochat.prefix_cache import PrefixCache
from nanochat.scheduler import Scheduler
from nanochat.tokenizer import Tokenizer
from tests.tiny import CHAT_TEXT, random_gpt

BLOCK = 8


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_from_iterator(iter(CHAT_TEXT), vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    """Depth 2, every weight random; its short window (64 of 256) is outgrown by the conversations."""
    gpt = random_gpt(tokenizer.get_vocab_size(), sequence_len=256, seed=5)
    with torch.no_grad():
        # No special token is ever sampled: replies run to their max_tokens and never call the tool.
        gpt.lm_head.weight[tokenizer.encode_special("<|bos|>"):] = 0.0
    assert gpt.window_sizes[0] == (64, 0)
    return gpt.eval()


def chat_conversations(tokenizer, count: int, turns: int, seed: int) -> list[dict]:
    """`count` conversations of `turns` user messages of random tokens; every other one opens with the
    same 40-token system prompt."""
    rng = random.Random(seed)
    special = {name: tokenizer.encode_special(name) for name in
               ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")}
    system = [rng.randrange(256) for _ in range(40)]
    conversations = []
    for i in range(count):
        start = [special["<|bos|>"]] + (system if i % 2 else [])
        messages = [[rng.randrange(256) for _ in range(rng.randrange(4, 13))] for _ in range(turns)]
        conversations.append({"start": start, "messages": messages, "max_tokens": rng.randrange(3, 11),
                              "special": special})
    return conversations


def run_conversations(scheduler: Scheduler, conversations: list[dict], concurrent: int) -> list[list[int]]:
    """Every reply of every conversation, `concurrent` conversations at a time, turn after turn; each
    turn's prompt is the whole history so far (as the OpenAI API resends it) and a new user message."""
    replies = []
    for first in range(0, len(conversations), concurrent):
        group = conversations[first:first + concurrent]
        histories = [list(c["start"]) for c in group]
        for turn in range(len(group[0]["messages"])):
            requests = []
            for conversation, history in zip(group, histories):
                special = conversation["special"]
                history += ([special["<|user_start|>"]] + conversation["messages"][turn]
                            + [special["<|user_end|>"], special["<|assistant_start|>"]])
                requests.append(scheduler.submit(list(history), max_tokens=conversation["max_tokens"],
                                                 temperature=0))
            while scheduler.has_work():
                scheduler.step()
            for conversation, history, request in zip(group, histories, requests):
                replies.append(request.result())
                # the model never samples <|assistant_end|> here: the client's history closes the reply
                history += replies[-1] + [conversation["special"]["<|assistant_end|>"]]
    return replies


def test_greedy_output_of_50_multi_turn_conversations_is_the_same_with_and_without_the_cache(model, tokenizer):
    conversations = chat_conversations(tokenizer, count=50, turns=5, seed=0)
    without = run_conversations(Scheduler(model, tokenizer, max_batch_size=6, prefix_cache_tokens=0),
                                conversations, concurrent=10)
    cached = Scheduler(model, tokenizer, max_batch_size=6, prefix_block_size=BLOCK)
    with_cache = run_conversations(cached, conversations, concurrent=10)
    assert with_cache == without
    stats = cached.stats()
    # the cache did the work: most prompt tokens were copied, not computed
    assert stats["prefix_hit_tokens"] > 0.6 * stats["prefix_prompt_tokens"]
    # and the conversations outgrew the short window (64) whose layers the copied keys feed
    assert max(len(c["start"]) + sum(len(m) + 4 + c["max_tokens"] for m in c["messages"])
               for c in conversations) > 2 * 64


def test_a_tiny_budget_evicts_all_the_time_and_never_touches_a_block_a_running_request_holds(model, tokenizer):
    conversations = chat_conversations(tokenizer, count=12, turns=4, seed=1)
    without = run_conversations(Scheduler(model, tokenizer, max_batch_size=4, prefix_cache_tokens=0),
                                conversations, concurrent=6)
    scheduler = Scheduler(model, tokenizer, max_batch_size=4, prefix_cache_tokens=6 * BLOCK, prefix_block_size=BLOCK)
    cache = scheduler.prefix_cache
    seen: dict[tuple[int, int], tuple] = {}  # (request, block) -> its key and keys/values when first held
    checks = 0
    step = scheduler.step

    def step_and_check():
        nonlocal checks
        generated = step()
        for request in scheduler._active:
            for block in request._prefix_blocks:
                assert cache.held(block)
                state = (cache._key[block], cache.k[:, block].clone(), cache.v[:, block].clone())
                first = seen.setdefault((request.request_id, block), state)
                assert first[0] == state[0] and torch.equal(first[1], state[1]) and torch.equal(first[2], state[2])
                checks += 1
        return generated

    scheduler.step = step_and_check
    assert run_conversations(scheduler, conversations, concurrent=6) == without
    stats = scheduler.stats()
    assert stats["prefix_evictions"] > 10 and stats["prefix_hit_tokens"] > 0 and checks > 100
    assert stats["prefix_cached_blocks"] <= 6


# ---------------------------------------------------------------- the cache on its own


def filled_cache(tokens: list[int]) -> KVCache:
    """A one-row decode cache whose keys at position p are p + 1000 * token and values the negation."""
    cache = KVCache(batch_size=1, num_kv_heads=1, max_seq_len=64, head_dim=2, num_layers=2, dtype=torch.float32)
    for position, token in enumerate(tokens):
        cache.k[:, 0, position] = position + 1000.0 * token
        cache.v[:, 0, position] = -(position + 1000.0 * token)
    cache.cache_seqlens[0] = len(tokens)
    return cache


def small_cache(num_blocks: int) -> PrefixCache:
    return PrefixCache(num_blocks, block_size=4, num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float32)


def test_a_hit_copies_the_keys_and_values_of_the_longest_chain_and_leaves_the_last_token_to_compute():
    cache = small_cache(8)
    tokens = list(range(1, 13))  # three blocks
    held = cache.add(tokens, filled_cache(tokens), 0, [])
    assert len(held) == 3 and cache.cached_blocks == 3
    cache.release(held)
    # the same 12 tokens: two blocks, the third would leave no token to compute the logits of
    chain = cache.acquire_prefix(tokens)
    assert chain == held[:2]
    row = KVCache(batch_size=2, num_kv_heads=1, max_seq_len=64, head_dim=2, num_layers=2, dtype=torch.float32)
    assert cache.copy_into(chain, row, 1) == 8
    assert torch.equal(row.k[:, 1, :8], filled_cache(tokens).k[:, 0, :8])
    assert torch.equal(row.v[:, 1, :8], filled_cache(tokens).v[:, 0, :8])
    cache.release(chain)
    assert cache.acquire_prefix(tokens + [99]) == held  # one more token: all three
    # a block's identity is the whole prefix: the same four tokens after a different start miss
    assert cache.acquire_prefix([7, 7, 7, 7] + tokens[4:] + [99]) == []
    assert cache.acquire_prefix(tokens[:6] + [0, 0] + tokens[8:] + [99]) == held[:1]
    assert (cache.hit_tokens, cache.prompt_tokens) == (8 + 12 + 0 + 4, 12 + 13 + 13 + 13)


def test_blocks_already_cached_are_shared_not_copied():
    cache = small_cache(4)
    first = list(range(1, 9))
    second = first[:4] + [50, 51, 52, 53]
    a = cache.add(first, filled_cache(first), 0, [])
    b = cache.add(second, filled_cache(second), 0, [])
    assert a[0] == b[0] and a[1] != b[1] and cache.cached_blocks == 3


def test_eviction_takes_the_least_recently_used_leaf_and_never_a_held_block():
    cache = small_cache(3)
    x = list(range(1, 5))
    y = list(range(11, 19))
    held_x = cache.add(x, filled_cache(x), 0, [])
    cache.release(held_x)
    held_y = cache.add(y, filled_cache(y), 0, [])  # y1 <- y2
    cache.release(held_y)
    cache.release(cache.acquire_prefix(x + [0]))  # x is now the most recently used
    # a new block needs room: the leaves are x and y2; y2 was used last longer ago; y1 is y2's parent
    z = list(range(21, 25))
    held_z = cache.add(z, filled_cache(z), 0, [])
    assert cache.evictions == 1 and cache.acquire_prefix(y + [0]) == held_y[:1]
    assert cache.acquire_prefix(x + [0]) == held_x
    # now x, y1 and z are held: nothing may go, so a new block is simply not cached
    w = list(range(31, 35))
    assert cache.add(w, filled_cache(w), 0, []) == [] and cache.evictions == 1
    assert cache.acquire_prefix(w + [0]) == []
    cache.release(held_y[:1] + held_x + held_z)
    cache.clear()
    assert cache.cached_blocks == 0 and cache.acquire_prefix(x + [0]) == []


def test_bad_settings_are_refused(model, tokenizer):
    with pytest.raises(ValueError, match="at least one block"):
        Scheduler(model, tokenizer, prefix_cache_tokens=4, prefix_block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        PrefixCache(2, block_size=0, num_layers=1, num_kv_heads=1, head_dim=1)
    assert Scheduler(model, tokenizer, prefix_cache_tokens=0).prefix_cache is None
    assert Scheduler(model, tokenizer, max_batch_size=2).prefix_cache.num_blocks == 2 * 256 // 16


def test_the_benchmark_shows_the_cache_cutting_the_first_token_time_of_a_long_conversation(capsys):
    from ray_jobs import bench_prefix_cache

    results = bench_prefix_cache.main(["--depth", "4", "--context", "1024", "--turns", "8", "--user-tokens", "32",
                                       "--reply-tokens", "8", "--clients", "4", "--system-tokens", "300",
                                       "--repeats", "2"])
    # turn 8: eight user messages (3 + 32 tokens) and seven replies (8 + <|assistant_end|>) after <|bos|>
    assert results["turn_prompt_tokens"] == 1 + 8 * 35 + 7 * 9 and results["ttft_speedup"] > 2.5
    assert results["shared_prompt_speedup"] > 1.0
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert [line.split()[1] for line in lines] == ["prefix_cache_ttft_turn8_speedup",
                                                    "prefix_cache_shared_system_prompt_speedup"]
