"""Continuous batching: one decode loop over a changing set of generation requests.

The seed's web server gives every request a whole model until it ends, so a GPU serving one chat
sits mostly idle: decoding one token reads all the weights to do a single row of work. Here every
live request is a row of one shared KV cache and each `step()` advances all of them with one
forward pass. Requests come and go between steps: a new one is prefilled into a free row and
joins the batch at once; a finished or cancelled one leaves and its row is reused. The requests
admitted in one step are prefilled together, in one forward pass over their prompts padded to the
longest (a pass reads every weight once, and for a few short prompts that costs more than their
tokens): a burst of requests reaches its first tokens in one pass instead of one pass each.

Each request keeps its own sampling settings, its own seeded random numbers and its own token budget,
and runs the python tool exactly as nanochat.engine does (the per-row logic is shared), so a
greedy request produces the same tokens as running it alone with `Engine.generate`.

Capacity is bounded twice: at most `max_batch_size` requests decode at once, and together they may
reserve at most `max_cache_tokens` cache positions (each request reserves prompt + max_tokens).
Requests past either bound wait in a FIFO queue; the head of the queue is never overtaken.

Live requests are kept packed into the first rows of the cache (a finished row is filled by the
last live one), so the model only ever runs on rows that have work.

A prefix cache (nanochat.prefix_cache) keeps the keys and values of prompts and replies already
computed, in blocks: a new request copies the longest cached start of its prompt into its row and
prefills only the rest. Requests admitted in the same step share too: one that would reuse blocks
that an earlier one's pass is about to compute waits for that pass, whose prompts are cached as
soon as it ends. The cache changes no output: a row's keys and values are the same whether
computed or copied.

Threading: `submit`, `cancel` and `stats` may be called from any thread; `step` belongs to one
thread, usually the one that `start()` launches (a Ray Serve replica runs it next to its asyncio
loop). A request's tokens can be consumed with a plain `for` loop from a thread or with
`async for` from asyncio; both wake up as tokens arrive.
"""

import asyncio
import contextlib
import itertools
import logging
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

import torch

from nanochat.engine import (RowState, ToolUse, check_prompt, check_sampling_settings, draw_tokens, uniform_numbers,
                             weight_copies_for)
from nanochat.gpt import padded_rows
from nanochat.kv_cache import KVCache
from nanochat.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache

logger = logging.getLogger("nanochat")

# Finish reasons of a request.
FINISH_STOP = "stop"            # the model wrote <|assistant_end|> or <|bos|>
FINISH_LENGTH = "length"        # the request's max_tokens were used up
FINISH_CANCELLED = "cancelled"  # cancel() or the scheduler shut down
FINISH_ERROR = "error"          # the decode step failed; iterating raises the error

THROUGHPUT_WINDOW_S = 10.0  # tokens/s in stats() is measured over the steps of this recent window
# Requests admitted in one step are prefilled in one forward pass (a pass reads every weight once,
# which for a few short prompts costs more than their tokens), their prompt tails padded to the
# longest; a pass's positions, padding included, may add up to this many times its prompts' own
# before the requests split into more passes.
PREFILL_PADDING = 2
DEFAULT_PREFILL_POSITIONS = 8192  # and at most this many positions, padding included (Scheduler's prefill_positions)


class _AsyncWaiter:
    """An asyncio consumer of a request's tokens: the scheduler's thread wakes it through its loop
    once the request holds `wake_at` tokens, or has finished."""

    __slots__ = ("loop", "wake_up", "wake_at")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.wake_up = asyncio.Event()
        self.wake_at = 1


class GenerationRequest:
    """The handle of one submitted request: its settings, and the tokens it has produced so far.

    Iterate it (`for token in request` or `async for token in request`, or `token_batches()` for
    lists of the tokens ready at once) to receive its token ids as they are generated; the
    iteration ends when the request finishes, without the final
    <|assistant_end|>/<|bos|>. `masks` tells which tokens the python tool forced (0) and which the
    model sampled (1). `finish_reason` is None while it runs, then one of FINISH_*.
    """

    def __init__(self, request_id: int, prompt_tokens: list[int], max_tokens: int, temperature: float,
                 top_k: int | None, seed: int, tool_use: ToolUse):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.prefix_hit_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self._tokens: list[int] = []
        self._masks: list[int] = []
        self._changed = threading.Condition()
        self._thread_waiters = 0  # threads blocked in result() or a for loop, under _changed
        self._async_waiters: set[_AsyncWaiter] = set()
        self._cancel_requested = False
        # Decoding state, touched by the scheduler's thread only.
        self._row = RowState(tool_use)
        self._rng = random.Random(seed)  # its draws (engine.uniform_numbers)
        self._prefix_blocks: list[int] = []  # the prefix cache's blocks this request holds

    @property
    def reserved_tokens(self) -> int:
        """Cache positions this request may fill: its prompt plus its whole token budget."""
        return len(self.prompt_tokens) + self.max_tokens

    @property
    def tokens(self) -> list[int]:
        with self._changed:
            return list(self._tokens)

    @property
    def masks(self) -> list[int]:
        with self._changed:
            return list(self._masks)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def result(self, timeout: float | None = None) -> list[int]:
        """Block until the request finishes and return its tokens; raises TimeoutError after
        `timeout` seconds, or the decode error if the request failed."""
        with self._changed:
            if not self._wait_for(lambda: self.finish_reason is not None, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
            if self.error is not None:
                raise RuntimeError(f"request {self.request_id} failed: {self.error!r}") from self.error
            return list(self._tokens)

    def __iter__(self):
        position = 0
        while True:
            with self._changed:
                self._wait_for(lambda: position < len(self._tokens) or self.finish_reason is not None)
                new_tokens = self._tokens[position:]
                finished = self.finish_reason is not None
            yield from new_tokens
            position += len(new_tokens)
            if finished and not new_tokens:
                self._raise_if_failed()
                return

    async def token_batches(self, batch_tokens: Callable[[], int] | None = None):
        """Async iteration over the new tokens in lists: each list holds every token published
        since the previous one was taken (one token while the consumer keeps up; more when it
        lags behind the decode steps, so a slow consumer makes fewer, larger hand-offs instead of
        falling further behind).

        `batch_tokens`, called after each list, says how many tokens the next one waits for
        (default 1: nothing is held back). A server under load passes a number that grows with its
        batch, so that it hands on fewer, larger pieces per decode step. The first token and the
        last ones are never held: a list goes out as soon as the request has finished."""
        waiter = _AsyncWaiter(asyncio.get_running_loop())
        with self._changed:
            self._async_waiters.add(waiter)
        try:
            position, wanted = 0, 1
            while True:
                # Clear before looking: a token published after the look sets the event again.
                waiter.wake_up.clear()
                with self._changed:
                    new_tokens = self._tokens[position:]
                    finished = self.finish_reason is not None
                    waiter.wake_at = position + wanted
                if new_tokens and (finished or len(new_tokens) >= wanted):
                    yield new_tokens
                    position += len(new_tokens)
                    wanted = max(1, batch_tokens()) if batch_tokens is not None else 1
                elif finished:
                    self._raise_if_failed()
                    return
                else:
                    await waiter.wake_up.wait()
        finally:
            with self._changed:
                self._async_waiters.discard(waiter)

    async def _iterate_async(self):
        async for tokens in self.token_batches():
            for token in tokens:
                yield token

    def __aiter__(self):
        return self._iterate_async()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"request {self.request_id} failed: {self.error!r}") from self.error

    def _wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Condition.wait_for on _changed (held by the caller), counted, so that publishing a token
        notifies only when some thread waits."""
        self._thread_waiters += 1
        try:
            return self._changed.wait_for(predicate, timeout)
        finally:
            self._thread_waiters -= 1

    # ---------------------------------------------------------------- called by the scheduler

    def _publish_token(self, token: int, mask: int) -> None:
        """Append a generated token and wake the consumers that wait for it. Called for every
        request at every step, so it does no more than that: no notify without a waiting thread,
        no scan without an asyncio consumer."""
        with self._changed:
            self._tokens.append(token)
            self._masks.append(mask)
            if self._thread_waiters:
                self._changed.notify_all()
            if not self._async_waiters:
                return
            count = len(self._tokens)
            waiters = [waiter for waiter in self._async_waiters if count >= waiter.wake_at]
        self._wake(waiters)

    def _finish(self, finish_reason: str, error: BaseException | None = None) -> None:
        """Mark the request finished and wake every consumer."""
        with self._changed:
            self.error = error
            self.finish_reason = finish_reason
            self._changed.notify_all()
            waiters = list(self._async_waiters)
        self._wake(waiters)

    @staticmethod
    def _wake(waiters: list[_AsyncWaiter]) -> None:
        for waiter in waiters:
            try:
                waiter.loop.call_soon_threadsafe(waiter.wake_up.set)
            except RuntimeError:
                pass  # that consumer's event loop is closed: nobody is listening any more


class Scheduler:
    """Continuous batching over one model. See the module docstring for the design."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, max_seq_len: int | None = None,
                 max_cache_tokens: int | None = None, prefix_cache_tokens: int | None = None,
                 prefix_block_size: int = DEFAULT_BLOCK_SIZE, prefill_positions: int = DEFAULT_PREFILL_POSITIONS,
                 transposed_weights: bool = True):
        """`prefix_cache_tokens`: the positions the prefix cache may hold (None: as many as the
        decode cache's budget, max_cache_tokens; 0: no prefix cache), in blocks of
        `prefix_block_size` tokens. `prefill_positions`: the most positions (rows x padded length)
        that one prefill pass over several admitted prompts may hold, which bounds its activations;
        a longer prompt still takes a pass of its own (1: every prompt its own pass).

        `transposed_weights` (on a CPU; nothing elsewhere): decoding passes of a few rows multiply by
        transposed copies of the matmul weights (GPT.transposed_weights: the rows each layer takes
        them at, up to 8), as the Engine's generations do. The copies are taken here and held until
        shutdown() (or until the scheduler is collected): taking them per request would add their
        copy to every first token. They cost one more copy of those weights in memory (False saves
        it), and the weights must not change while the scheduler lives, as its KV and prefix
        caches already require."""
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r} must be a positive int")
        if isinstance(prefill_positions, bool) or not isinstance(prefill_positions, int) or prefill_positions < 1:
            raise ValueError(f"prefill_positions={prefill_positions!r} must be a positive int")
        self.prefill_positions = prefill_positions
        max_seq_len = model.config.sequence_len if max_seq_len is None else max_seq_len
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len!r} must be an int >= 2 (prompt plus at least one token)")
        max_cache_tokens = max_batch_size * max_seq_len if max_cache_tokens is None else max_cache_tokens
        if isinstance(max_cache_tokens, bool) or not isinstance(max_cache_tokens, int) or max_cache_tokens < 2:
            raise ValueError(f"max_cache_tokens={max_cache_tokens!r} must be an int >= 2")
        self.model = model
        self.tool_use = ToolUse.from_tokenizer(tokenizer)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_cache_tokens = max_cache_tokens
        self.device = model.get_device()
        self.cache = KVCache.for_model(model, batch_size=max_batch_size, max_seq_len=max_seq_len)
        # The caches over the first n rows that decoding steps run on, made once: a view costs four
        # slicing ops, which a decoding step on a CPU would pay every time.
        self._leading_rows = [None] + [self.cache.rows(0, n) for n in range(1, max_batch_size + 1)]
        prefix_cache_tokens = max_cache_tokens if prefix_cache_tokens is None else prefix_cache_tokens
        if isinstance(prefix_cache_tokens, bool) or not isinstance(prefix_cache_tokens, int) or not (
                prefix_cache_tokens == 0 or prefix_cache_tokens >= prefix_block_size):
            raise ValueError(f"prefix_cache_tokens={prefix_cache_tokens!r} must be 0 (no prefix cache) or an int "
                             f"of at least one block ({prefix_block_size} tokens)")
        self.prefix_cache = (PrefixCache.for_cache(self.cache, prefix_cache_tokens, prefix_block_size)
                             if prefix_cache_tokens else None)

        self._lock = threading.Condition()  # guards the queue and the flags below; wakes the loop
        self._waiting: deque[GenerationRequest] = deque()
        self._active: list[GenerationRequest] = []  # _active[i] decodes in cache row i
        self._reserved_tokens = 0
        self._request_ids = itertools.count()
        self._stopping = False
        self._cancel_pending = False  # cancel() marked a running request since the last step looked
        self._thread: threading.Thread | None = None
        self._loop_running = False
        self._loop_exited = threading.Event()
        self._tokens_generated = 0
        self._requests_finished = 0
        self._peak_active = 0  # the most requests one step has decoded
        self._recent_steps: deque[tuple[float, float, int]] = deque()  # (end time, duration, tokens)
        # The prefix cache's counts as of the last step that changed it (the cache itself belongs
        # to the loop's thread, and only prefills, releases and failures change it).
        self._prefix_stats = self._read_prefix_stats()
        self._prefix_changed = False
        # Last, once nothing above can refuse the arguments: the copies live as long as the scheduler.
        weight_copies = weight_copies_for(model, max_batch_size) if transposed_weights else contextlib.nullcontext()
        weight_copies.__enter__()
        self._drop_weight_copies = weakref.finalize(self, weight_copies.__exit__, None, None, None)

    # ---------------------------------------------------------------- any thread

    def submit(self, prompt_tokens: list[int], max_tokens: int | None = None, temperature: float = 1.0,
               top_k: int | None = None, seed: int = 42) -> GenerationRequest:
        """Queue a request; it joins the decode batch at the next step that has room for it.
        max_tokens=None lets it run until its cache row is full."""
        prompt_tokens = check_prompt(prompt_tokens, self.model.config.vocab_size)
        check_sampling_settings(temperature, top_k, seed)
        room = self.max_seq_len - len(prompt_tokens)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt_tokens)} tokens but a sequence may hold at most "
                             f"{self.max_seq_len}; shorten the conversation")
        if max_tokens is None:
            max_tokens = room
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} must be a positive int, or None to fill the sequence")
        if max_tokens > room:
            raise ValueError(f"max_tokens={max_tokens} does not fit: the prompt has {len(prompt_tokens)} tokens "
                             f"and a sequence holds at most {self.max_seq_len}; ask for at most {room}")
        if len(prompt_tokens) + max_tokens > self.max_cache_tokens:
            raise ValueError(f"the request needs {len(prompt_tokens) + max_tokens} cache positions (prompt + "
                             f"max_tokens) but the whole cache budget is {self.max_cache_tokens}; lower max_tokens")
        with self._lock:
            if self._stopping:
                raise RuntimeError("the scheduler has been shut down; create a new one")
            request = GenerationRequest(next(self._request_ids), prompt_tokens, max_tokens, temperature, top_k,
                                        seed, self.tool_use)
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: GenerationRequest) -> None:
        """Stop a request: a queued one is dropped at once, a running one leaves the batch (and
        frees its row) at the next step. Cancelling a finished request does nothing."""
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)
                request._finish(FINISH_CANCELLED)
                self._requests_finished += 1
            else:
                request._cancel_requested = True
                self._cancel_pending = True
            self._lock.notify_all()

    @property
    def active_count(self) -> int:
        """How many requests the next decode step advances (read without waiting for a step)."""
        return len(self._active)

    def stats(self) -> dict:
        """Active sequences (now, and the most one step has decoded), queue depth, reserved cache
        positions, tokens generated so far, the
        decoding rate (tokens per second of stepping, over the last THROUGHPUT_WINDOW_S seconds),
        and the prefix cache's counts (PrefixCache.stats; zeros without one)."""
        with self._lock:
            now = time.perf_counter()
            recent = [(duration, tokens) for end, duration, tokens in self._recent_steps
                      if end >= now - THROUGHPUT_WINDOW_S]
            busy = sum(duration for duration, _ in recent)
            return {
                "active": len(self._active),
                "queued": len(self._waiting),
                "max_batch_size": self.max_batch_size,
                "reserved_cache_tokens": self._reserved_tokens,
                "max_cache_tokens": self.max_cache_tokens,
                "tokens_generated": self._tokens_generated,
                "requests_finished": self._requests_finished,
                "peak_active": self._peak_active,
                "tokens_per_second": sum(tokens for _, tokens in recent) / busy if busy > 0 else 0.0,
                **self._prefix_stats,
            }

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._active or self._waiting)

    # ---------------------------------------------------------------- the loop

    def start(self) -> threading.Thread:
        """Run the decode loop in a daemon thread until shutdown()."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the scheduler loop is already running")
            self._thread = threading.Thread(target=self.run_forever, name="nanochat-scheduler", daemon=True)
        self._thread.start()
        return self._thread

    def run_forever(self) -> None:
        """Step while there is work, sleep until a submit or cancel when there is none; returns
        after shutdown(). A failed step fails the requests it was decoding and the loop goes on."""
        with self._lock:
            if self._loop_running:
                raise RuntimeError("the scheduler loop is already running in another thread")
            self._loop_running = True
        try:
            while True:
                with self._lock:
                    self._lock.wait_for(lambda: self._stopping or self._active or self._waiting)
                    if self._stopping:
                        break
                try:
                    self.step()
                except Exception:
                    logger.exception("scheduler step failed; its requests were failed, the loop goes on")
            self._cancel_everything()
        finally:
            self._loop_exited.set()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; every queued or running request finishes as cancelled, and the model
        drops the scheduler's transposed weight copies."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            loop_running = self._loop_running
        if loop_running:
            # The loop thread cancels what is left once its current step is over.
            self._loop_exited.wait(timeout)
        else:
            self._cancel_everything()
        self._drop_weight_copies()

    @torch.inference_mode()
    def step(self) -> int:
        """One decoding step for every running request, after admitting what fits from the queue;
        returns the number of tokens generated. Call from one thread only."""
        started = time.perf_counter()
        if self._cancel_pending:
            with self._lock:
                self._cancel_pending = False
                cancelled = [slot for slot, request in enumerate(self._active) if request._cancel_requested]
            for slot in reversed(cancelled):
                self._release(slot, FINISH_CANCELLED)
        admitted = self._admit()
        if not self._active and not admitted:
            return 0
        try:
            logits = self._forward(admitted)
        except BaseException as error:
            self._fail(self._active + admitted, error)
            raise
        self._active.extend(admitted)
        try:
            generated = self._sample_and_publish(logits)
        except BaseException as error:
            self._fail(self._active, error)
            raise
        prefix_stats = self._read_prefix_stats() if self._prefix_changed else self._prefix_stats
        self._prefix_changed = False
        with self._lock:
            self._prefix_stats = prefix_stats
            self._peak_active = max(self._peak_active, generated)
            self._tokens_generated += generated
            end = time.perf_counter()
            self._recent_steps.append((end, end - started, generated))
            while self._recent_steps and self._recent_steps[0][0] < end - THROUGHPUT_WINDOW_S:
                self._recent_steps.popleft()
        return generated

    def _admit(self) -> list[GenerationRequest]:
        """Pop queued requests, oldest first, while a row and their cache reservation are free."""
        admitted = []
        with self._lock:
            while self._waiting and len(self._active) + len(admitted) < self.max_batch_size:
                head = self._waiting[0]
                if self._reserved_tokens + head.reserved_tokens > self.max_cache_tokens:
                    break
                self._waiting.popleft()
                self._reserved_tokens += head.reserved_tokens
                admitted.append(head)
        return admitted

    def _forward(self, admitted: list[GenerationRequest]) -> torch.Tensor:
        """Next-token logits (rows, vocab) for the running requests (fed their newest token) followed
        by the admitted ones (prefilled, each into the next free row, in as few passes as the padding
        and the cache allow)."""
        parts = []
        running = len(self._active)
        if running:
            newest = torch.tensor([[request._row.last_token] for request in self._active],
                                  dtype=torch.long, device=self.device)
            parts.append(self.model(newest, kv_cache=self._leading_rows[running])[:, -1])
        group: list[GenerationRequest] = []  # admitted, their cached prefixes copied, awaiting one pass
        for row, request in enumerate(admitted, start=running):
            if group and self._would_reuse(group, request):
                parts.append(self._prefill(group, row - len(group)))
                group = []
            self._copy_cached_prefix(request, row)
            if group and not self._fits_one_pass(group + [request]):
                parts.append(self._prefill(group, row - len(group)))
                group = []
            group.append(request)
        if group:
            parts.append(self._prefill(group, running + len(admitted) - len(group)))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _would_reuse(self, group: list[GenerationRequest], request: GenerationRequest) -> bool:
        """Would `request` find more of its prompt in the prefix cache once `group` is prefilled?
        True when it shares a full block with a grouped prompt past what that one found cached
        (the blocks its pass will add): it then waits for that pass instead of computing them too,
        as requests with one system prompt arriving together do."""
        if self.prefix_cache is None:
            return False
        prompt, block = request.prompt_tokens, self.prefix_cache.block_size
        for other in group:
            # The first block past other's hit, if both prompts hold it (a prefill always computes
            # at least a prompt's last token, so it can come from the cache only before that).
            reach = other.prefix_hit_tokens + block
            if reach < len(prompt) and prompt[:reach] == other.prompt_tokens[:reach]:
                return True
        return False

    def _fits_one_pass(self, group: list[GenerationRequest]) -> bool:
        """May `group`'s uncached prompt tails share one forward pass? Each is padded to the
        longest, so the positions of the pass must stay within PREFILL_PADDING times the real ones
        and within prefill_positions, and every row must have room for the padded length."""
        tails = [len(request.prompt_tokens) - request.prefix_hit_tokens for request in group]
        padded = max(tails)
        return (len(group) * padded <= min(PREFILL_PADDING * sum(tails), self.prefill_positions)
                and max(request.prefix_hit_tokens for request in group) + padded <= self.max_seq_len)

    def _copy_cached_prefix(self, request: GenerationRequest, row: int) -> None:
        """Empty `row` for `request` and copy into it what the prefix cache holds of its prompt."""
        self.cache.cache_seqlens[row] = 0
        self._prefix_changed = True
        if self.prefix_cache is None:
            return
        prompt = request.prompt_tokens
        request._prefix_blocks = self.prefix_cache.acquire_prefix(prompt)
        hit = self.prefix_cache.copy_into(request._prefix_blocks, self.cache, row)
        if hit:
            self.cache.cache_seqlens[row] = hit
            # The smear of the first computed token reads the embedding of the last copied one.
            last_cached = torch.tensor([prompt[hit - 1]], dtype=torch.long, device=self.device)
            self.cache.prev_embedding[row] = self.model.embed(last_cached)[0]
        request.prefix_hit_tokens = hit

    def _prefill(self, group: list[GenerationRequest], first_row: int) -> torch.Tensor:
        """Compute the rest of every prompt of `group` (in rows first_row, first_row + 1, ...) in
        one forward pass, the shorter ones padded at their end; then cache their prompts' blocks.
        Returns each one's next-token logits (len(group), vocab)."""
        tails = [request.prompt_tokens[request.prefix_hit_tokens:] for request in group]
        lengths = [len(tail) for tail in tails]
        ids = padded_rows(tails, self.device)
        rows = self.cache.rows(first_row, first_row + len(group))
        if min(lengths) == ids.size(1):
            logits = self.model(ids, kv_cache=rows, last_only=True)[:, -1]
        else:
            logits = self.model(ids, kv_cache=rows, row_lengths=lengths)[:, -1]
        if self.prefix_cache is not None:
            for row, request in enumerate(group, start=first_row):
                request._prefix_blocks += self.prefix_cache.add(request.prompt_tokens, self.cache, row,
                                                                request._prefix_blocks)
        return logits

    def _read_prefix_stats(self) -> dict:
        if self.prefix_cache is None:
            return {key: 0 for key in PrefixCache.STAT_KEYS}
        return self.prefix_cache.stats()

    def _sample_and_publish(self, logits: torch.Tensor) -> int:
        """Choose every row's next token, stream it, and retire the rows that are done; returns
        the number of tokens generated (a final <|assistant_end|> counts, though it is not streamed)."""
        active = self._active
        chosen = self._choose_tokens(logits, active)
        finished = []
        for slot, (request, sampled) in enumerate(zip(active, chosen)):
            token, mask = request._row.advance(sampled)
            if request._row.finished:
                finished.append((slot, FINISH_STOP))
                continue
            request._publish_token(token, mask)
            if len(request._tokens) >= request.max_tokens:
                finished.append((slot, FINISH_LENGTH))
        generated = len(active)
        for slot, reason in reversed(finished):
            self._release(slot, reason)
        return generated

    @staticmethod
    def _choose_tokens(logits: torch.Tensor, active: list[GenerationRequest]) -> list[int]:
        """Every row's sampled (or, at temperature 0, argmax) token: one argmax for all the greedy
        rows, and one draw per top_k in use for the rows that sample, each row with its own
        numbers and temperature. The usual batch, where every row samples with one top_k, is one
        draw over all the logits, without sorting rows into groups."""
        first_top_k = active[0].top_k
        if all(request.temperature != 0 and request.top_k == first_top_k for request in active):
            return _draw(logits, active, first_top_k)
        sampling = [slot for slot, request in enumerate(active) if request.temperature != 0]
        chosen = logits.argmax(dim=-1).tolist() if len(sampling) < len(active) else [0] * len(active)
        for top_k in {active[slot].top_k for slot in sampling}:
            slots = [slot for slot in sampling if active[slot].top_k == top_k]
            for slot, token in zip(slots, _draw(logits[slots], [active[slot] for slot in slots], top_k)):
                chosen[slot] = token
        return chosen

    def _release(self, slot: int, reason: str) -> None:
        """Finish the request in `slot` (caching the blocks of what its row holds) and fill the gap
        with the last running row."""
        request = self._active[slot]
        self._prefix_changed = True
        if self.prefix_cache is not None:
            # The row holds the prompt and every token fed back since; the newest one never was.
            written = (request.prompt_tokens + request._tokens)[:int(self.cache.cache_seqlens[slot])]
            blocks = request._prefix_blocks
            self.prefix_cache.release(blocks + self.prefix_cache.add(written, self.cache, slot, blocks))
            request._prefix_blocks = []
        last = len(self._active) - 1
        self.cache.move_row(last, slot)
        self.cache.cache_seqlens[last] = 0
        self._active[slot] = self._active[last]
        self._active.pop()
        with self._lock:
            self._reserved_tokens -= request.reserved_tokens
            self._requests_finished += 1
        request._finish(reason)

    def _fail(self, requests: list[GenerationRequest], error: BaseException) -> None:
        """After a failed forward pass no row of the cache can be trusted: fail its requests, empty it."""
        self._prefix_changed = True
        with self._lock:
            for request in requests:
                self._reserved_tokens -= request.reserved_tokens
                self._requests_finished += 1
        for request in requests:
            request._finish(FINISH_ERROR, error)
            if self.prefix_cache is not None:
                self.prefix_cache.release(request._prefix_blocks)
                request._prefix_blocks = []
        if self.prefix_cache is not None:
            self.prefix_cache.clear()  # what the failed pass may have cached is not trusted either
        self._active = []
        self.cache.reset()

    def _cancel_everything(self) -> None:
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._requests_finished += len(waiting)
        for slot in reversed(range(len(self._active))):
            self._release(slot, FINISH_CANCELLED)
        for request in waiting:
            request._finish(FINISH_CANCELLED)


def _draw(logits: torch.Tensor, requests: list[GenerationRequest], top_k: int | None) -> list[int]:
    """One sampled token per row of `logits` (rows, vocab), row i drawn for requests[i] with its
    own numbers and temperature."""
    temperatures = {request.temperature for request in requests}
    # One temperature for all (the usual case) divides by a number: no tensor to build.
    temperature = temperatures.pop() if len(temperatures) == 1 else torch.tensor(
        [[request.temperature] for request in requests], dtype=torch.float64, device=logits.device)
    uniforms = uniform_numbers([request._rng for request in requests], logits.device)
    return draw_tokens(logits, uniforms, temperature, top_k).tolist()
