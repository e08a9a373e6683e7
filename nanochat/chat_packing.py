"""Packing rendered conversations into SFT training rows.

A conversation is rendered by the tokenizer as (ids, mask), mask 1 on the tokens the assistant
writes. Rows hold exactly T+1 tokens: conversations are placed whole, largest first among those
that still fit (best fit, as in pretraining), but unlike pretraining a conversation is never
cropped to fill a row (a cut conversation teaches the model to stop mid-answer): the rest of the
row is padding. Inputs are row[:-1]; targets are row[1:] where the target token's mask is 1 and
-1 (ignored by the loss) everywhere else, padding included. A conversation longer than a row is
truncated to the row, since it cannot be placed any other way.
"""

from bisect import bisect_right
from collections.abc import Iterable, Iterator

import numpy as np


def pack_conversations(conversations: Iterable[tuple[list[int], list[int]]], row_len: int, pad_id: int,
                       buffer_size: int = 100) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (inputs, targets) int64 arrays of length row_len - 1 from (ids, mask) conversations.

    `buffer_size` conversations are kept to choose from; the stream's end flushes the buffer."""
    if row_len < 2:
        raise ValueError(f"row_len must be at least 2, got {row_len}")
    lengths: list[int] = []
    items: list[tuple[np.ndarray, np.ndarray]] = []

    def take_row() -> tuple[np.ndarray, np.ndarray]:
        row = np.full(row_len, pad_id, dtype=np.int64)
        row_mask = np.zeros(row_len, dtype=np.int64)
        filled = 0
        while items:
            position = bisect_right(lengths, row_len - filled) - 1
            if position < 0:
                break
            ids, mask = items.pop(position)
            lengths.pop(position)
            row[filled:filled + ids.size] = ids
            row_mask[filled:filled + ids.size] = mask
            filled += ids.size
        if filled == 0:  # the shortest conversation is longer than a row: truncate it
            ids, mask = items.pop(0)
            lengths.pop(0)
            row[:] = ids[:row_len]
            row_mask[:] = mask[:row_len]
        targets = np.where(row_mask[1:] == 1, row[1:], -1)
        return row[:-1], targets

    for ids, mask in conversations:
        ids_array = np.asarray(ids, dtype=np.int64)
        mask_array = np.asarray(mask, dtype=np.int64)
        if ids_array.shape != mask_array.shape or ids_array.size == 0:
            raise ValueError("each conversation needs equally long, non-empty ids and mask")
        position = bisect_right(lengths, ids_array.size)
        lengths.insert(position, ids_array.size)
        items.insert(position, (ids_array, mask_array))
        if len(items) >= buffer_size:
            yield take_row()
    while items:
        yield take_row()
