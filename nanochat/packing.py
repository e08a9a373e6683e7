"""Best-fit packing: tokenized documents in, training rows of exactly T+1 tokens out.

Every row starts with BOS and has no padding, so every position is trained on and every token can
attend back to the start of its document. A row is filled from a buffer of documents (each
beginning with BOS) by the rule of nanochat's "bos_bestfit" loader:

1. place the LARGEST buffered document that still fits in the row's remaining space;
2. repeat until no buffered document fits;
3. then take the SHORTEST buffered document and crop it to fill the row exactly; the cut-off tail
   is dropped (counted in tokens_cropped).

Among documents of equal length the one buffered first is taken. Because documents start with
BOS and the first pick of a row is always a whole document or a crop of one, rows start with BOS.

The rule is the pure function `plan_best_fit_row`, which reads a sorted list of lengths and
says which documents to take; `BestFitPacker` holds the buffer (kept sorted by length, so each
choice is a bisection rather than a scan of the whole buffer) and applies the plans. The packer
is plain Python with a state_dict, so a stateful Ray Data `map_batches` actor can own one: feed it
each tokenized batch with `add`, return `pop_rows()`, and checkpoint its buffer.
"""

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# The reference keeps 1000 documents to choose from; fewer means more cropping.
DEFAULT_MIN_BUFFER_DOCS = 1000


@dataclass(frozen=True)
class RowPlan:
    """Which buffered documents make one row, as positions in the sorted length list."""

    whole: tuple[int, ...]  # placed entirely, in placement order (largest first)
    cropped: int | None     # placed last and cut to fit, or None when the whole ones fill the row
    crop_keep: int          # tokens kept from the cropped document (0 when none is cropped)


def _largest_free_fitting(sorted_lengths: Sequence[int], limit: int, taken: set[int]) -> int | None:
    """Position of the longest not-yet-taken document of length <= limit (the first-buffered one
    among equals). Only the few positions already taken for this row are ever stepped over."""
    candidate = bisect_right(sorted_lengths, limit) - 1
    while candidate >= 0:
        first_of_length = bisect_left(sorted_lengths, sorted_lengths[candidate], 0, candidate + 1)
        for position in range(first_of_length, candidate + 1):
            if position not in taken:
                return position
        candidate = first_of_length - 1
    return None


def plan_best_fit_row(sorted_lengths: Sequence[int], row_capacity: int) -> RowPlan | None:
    """Plan one row of row_capacity tokens from documents whose lengths are sorted ascending.

    Returns None when the documents together hold fewer than row_capacity tokens (the row
    cannot be filled without padding). Reads `sorted_lengths` only.
    """
    if row_capacity <= 0:
        raise ValueError(f"row_capacity must be positive, not {row_capacity}")
    taken: set[int] = set()
    whole: list[int] = []
    remaining = row_capacity
    while remaining > 0:
        position = _largest_free_fitting(sorted_lengths, remaining, taken)
        if position is None:
            break
        taken.add(position)
        whole.append(position)
        remaining -= sorted_lengths[position]
    if remaining == 0:
        return RowPlan(tuple(whole), None, 0)
    # Nothing fits: crop the shortest document left, which wastes the fewest tokens. Every
    # remaining document is longer than `remaining` here, so the crop always drops something.
    shortest = next((p for p in range(len(sorted_lengths)) if p not in taken), None)
    if shortest is None:
        return None
    return RowPlan(tuple(whole), shortest, remaining)


class BestFitPacker:
    """A buffer of tokenized documents that turns into rows of seq_len + 1 tokens.

    Rows are built only while the buffer holds at least min_buffer_docs documents, so that every
    choice has a wide pool to pick from; `pop_rows(drain=True)` empties it at the end of a stream.
    Counters: tokens_read (added), tokens_emitted (in rows), tokens_cropped (dropped by crops);
    tokens_read == tokens_emitted + tokens_cropped + buffered_tokens at all times.
    """

    def __init__(self, seq_len: int, bos_token_id: int, min_buffer_docs: int = DEFAULT_MIN_BUFFER_DOCS):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, not {seq_len}")
        if min_buffer_docs <= 0:
            raise ValueError(f"min_buffer_docs must be positive, not {min_buffer_docs}")
        self.seq_len = seq_len
        self.row_capacity = seq_len + 1  # inputs are row[:-1], targets row[1:]
        self.bos_token_id = bos_token_id
        self.min_buffer_docs = min_buffer_docs
        # Parallel lists sorted by length; a new document goes after those of equal length.
        self._lengths: list[int] = []
        self._docs: list[np.ndarray] = []
        self.buffered_tokens = 0
        self.tokens_read = 0
        self.tokens_emitted = 0
        self.tokens_cropped = 0

    @property
    def num_buffered_docs(self) -> int:
        return len(self._docs)

    @property
    def crop_fraction(self) -> float:
        """Share of the tokens read so far that cropping has thrown away."""
        return self.tokens_cropped / self.tokens_read if self.tokens_read else 0.0

    def add(self, docs: Iterable[Sequence[int] | np.ndarray]) -> None:
        """Buffer tokenized documents; each must be non-empty and start with the BOS token."""
        for doc in docs:
            tokens = np.asarray(doc, dtype=np.int32)
            if tokens.ndim != 1 or tokens.size == 0:
                raise ValueError(f"a document must be a non-empty 1-D list of token ids, got shape {tokens.shape}")
            if tokens[0] != self.bos_token_id:
                raise ValueError(f"a document starts with token {int(tokens[0])}, not BOS ({self.bos_token_id}): "
                                 "tokenize with the BOS token prepended")
            position = bisect_right(self._lengths, tokens.size)
            self._lengths.insert(position, tokens.size)
            self._docs.insert(position, tokens)
            self.buffered_tokens += tokens.size
            self.tokens_read += tokens.size

    def pop_rows(self, max_rows: int | None = None, drain: bool = False) -> np.ndarray:
        """Up to max_rows packed rows as an int32 array of shape (n, seq_len + 1), n >= 0.

        Without drain, stops once fewer than min_buffer_docs documents are buffered; with drain,
        goes on until the buffer holds less than one row of tokens (those stay buffered).
        """
        rows = []
        while max_rows is None or len(rows) < max_rows:
            if not drain and len(self._docs) < self.min_buffer_docs:
                break
            plan = plan_best_fit_row(self._lengths, self.row_capacity)
            if plan is None:
                break
            rows.append(self._take(plan))
        if not rows:
            return np.empty((0, self.row_capacity), dtype=np.int32)
        return np.stack(rows)

    def _take(self, plan: RowPlan) -> np.ndarray:
        row = np.empty(self.row_capacity, dtype=np.int32)
        filled = 0
        for position in plan.whole:
            doc = self._docs[position]
            row[filled:filled + doc.size] = doc
            filled += doc.size
        used = list(plan.whole)
        if plan.cropped is not None:
            doc = self._docs[plan.cropped]
            row[filled:] = doc[:plan.crop_keep]
            self.tokens_cropped += doc.size - plan.crop_keep
            used.append(plan.cropped)
        for position in sorted(used, reverse=True):  # from the back, so earlier positions hold
            self.buffered_tokens -= self._lengths.pop(position)
            del self._docs[position]
        self.tokens_emitted += self.row_capacity
        return row

    def state_dict(self) -> dict:
        """The buffer and counters as plain numbers and numpy arrays (for a checkpoint)."""
        return {
            "row_capacity": self.row_capacity,
            "bos_token_id": self.bos_token_id,
            "doc_lengths": np.asarray(self._lengths, dtype=np.int64),
            "doc_tokens": np.concatenate(self._docs) if self._docs else np.empty(0, dtype=np.int32),
            "tokens_read": self.tokens_read,
            "tokens_emitted": self.tokens_emitted,
            "tokens_cropped": self.tokens_cropped,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a buffer saved by state_dict, from a packer with the same row length and BOS."""
        if state["row_capacity"] != self.row_capacity or state["bos_token_id"] != self.bos_token_id:
            raise ValueError(f"the saved packer made rows of {state['row_capacity']} tokens with BOS "
                             f"{state['bos_token_id']}; this one makes {self.row_capacity} with BOS "
                             f"{self.bos_token_id}: resume with the same sequence length and tokenizer")
        lengths = np.asarray(state["doc_lengths"], dtype=np.int64)
        tokens = np.asarray(state["doc_tokens"], dtype=np.int32)
        if lengths.sum() != tokens.size or np.any(np.diff(lengths) < 0):
            raise ValueError("the saved packer state is inconsistent (lengths unsorted or not matching "
                             "the tokens); it was not written by BestFitPacker.state_dict")
        self._lengths = lengths.tolist()
        self._docs = [doc.copy() for doc in np.split(tokens, np.cumsum(lengths)[:-1])] if lengths.size else []
        self.buffered_tokens = int(tokens.size)
        self.tokens_read = int(state["tokens_read"])
        self.tokens_emitted = int(state["tokens_emitted"])
        self.tokens_cropped = int(state["tokens_cropped"])
