"""Tests of SFT row packing: exact row length, conversations whole and never split, padding and
non-assistant tokens ignored in the targets, truncation of a conversation longer than a row."""

import pytest

from nanochat.chat_packing import pack_conversations

PAD = 0


def conversation(length: int, tag: int):
    """ids tag*100 + position (so a conversation's tokens are recognisable), mask 1 on the second half."""
    ids = [tag * 100 + i for i in range(length)]
    mask = [0] * (length // 2) + [1] * (length - length // 2)
    return ids, mask


def test_rows_hold_whole_conversations_and_mask_everything_else():
    convs = [conversation(n, tag) for tag, n in enumerate([5, 9, 3, 7, 4, 6, 2], start=1)]
    rows = list(pack_conversations(convs, row_len=12, pad_id=PAD, buffer_size=4))
    placed = []
    for inputs, targets in rows:
        assert inputs.shape == targets.shape == (11,)
        tags = {int(t) // 100 for t in inputs if t != PAD}
        placed.extend(tags)
        for tag in tags:  # every conversation in a row is there from its first token
            assert tag * 100 in inputs.tolist()
        # targets are the next token where that token is the assistant's, -1 elsewhere
        for target in targets[targets >= 0]:
            assert target % 100 >= len(convs[target // 100 - 1][0]) // 2
    assert sorted(placed) == list(range(1, 8))  # every conversation once, none split over rows


def test_padding_never_counts():
    rows = list(pack_conversations([conversation(3, 1)], row_len=8, pad_id=PAD))
    inputs, targets = rows[0]
    assert inputs.tolist() == [100, 101, 102, 0, 0, 0, 0]
    assert targets.tolist() == [101, 102, -1, -1, -1, -1, -1]  # mask is [0, 1, 1]


def test_long_conversation_is_truncated_to_one_row():
    rows = list(pack_conversations([conversation(20, 1)], row_len=8, pad_id=PAD))
    assert len(rows) == 1
    assert rows[0][0].tolist() == [100 + i for i in range(7)]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="row_len"):
        list(pack_conversations([conversation(3, 1)], row_len=1, pad_id=PAD))
    with pytest.raises(ValueError, match="equally long"):
        list(pack_conversations([([1, 2, 3], [1, 1])], row_len=8, pad_id=PAD))
