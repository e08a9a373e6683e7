"""Best-fit packing: the row invariants (BOS first, exact length, no padding), the choice rule on
hand-made buffers, the token accounting, and a buffer that survives a state_dict round trip."""

import numpy as np
import pytest

from nanochat.packing import BestFitPacker, RowPlan, plan_best_fit_row

BOS = 7


def make_doc(length: int, fill: int) -> list[int]:
    """A document of `length` tokens: BOS then `fill` repeated (fill != BOS marks the document)."""
    return [BOS] + [fill] * (length - 1)


def random_docs(rng: np.random.Generator, count: int, max_len: int) -> list[np.ndarray]:
    docs = []
    for _ in range(count):
        length = int(rng.integers(1, max_len + 1))
        doc = rng.integers(100, 1000, size=length).astype(np.int32)
        doc[0] = BOS
        docs.append(doc)
    return docs


def test_plan_places_the_largest_fitting_documents_first():
    lengths = [2, 3, 4, 6, 7, 12]
    # capacity 10: 12 never fits; the largest that fits is 7, then 3 fills the row exactly.
    assert plan_best_fit_row(lengths, 10) == RowPlan(whole=(4, 1), cropped=None, crop_keep=0)
    # capacity 9: 7 first, then 2 fills it; 6+3 would also fill 9 but 7 is larger.
    assert plan_best_fit_row(lengths, 9) == RowPlan(whole=(4, 0), cropped=None, crop_keep=0)
    # capacity 13: the rule is greedy, not optimal: 12 is placed although 7+6 would fill the row,
    # and the shortest document (2) is then cropped to the 1 token left.
    assert plan_best_fit_row(lengths, 13) == RowPlan(whole=(5,), cropped=0, crop_keep=1)


def test_plan_crops_the_shortest_document_when_nothing_fits():
    # capacity 10: 12 never fits; 6 placed (4 left), 3 placed (1 left); nothing of length <= 1
    # remains, so the shortest document not yet used (5, position 1) is cropped to 1 token.
    assert plan_best_fit_row([3, 5, 6, 12], 10) == RowPlan(whole=(2, 0), cropped=1, crop_keep=1)
    # every document longer than the row: the shortest one is cropped to the whole row.
    assert plan_best_fit_row([12, 30], 10) == RowPlan(whole=(), cropped=0, crop_keep=10)


def test_plan_takes_the_first_buffered_among_equal_lengths_and_skips_taken_ones():
    # three documents of length 3 at positions 1, 2, 3: capacity 9 takes all three, in order.
    assert plan_best_fit_row([1, 3, 3, 3], 9) == RowPlan(whole=(1, 2, 3), cropped=None, crop_keep=0)
    # capacity 7: 3 (pos 1), 3 (pos 2), then 1 fills it.
    assert plan_best_fit_row([1, 3, 3, 3], 7) == RowPlan(whole=(1, 2, 0), cropped=None, crop_keep=0)


def test_plan_returns_none_when_the_buffer_cannot_fill_a_row():
    assert plan_best_fit_row([2, 3], 10) is None
    assert plan_best_fit_row([], 4) is None
    with pytest.raises(ValueError, match="row_capacity"):
        plan_best_fit_row([1], 0)


def test_packer_rows_are_exact_bos_first_and_use_the_largest_fit():
    packer = BestFitPacker(seq_len=9, bos_token_id=BOS, min_buffer_docs=1)
    packer.add([make_doc(4, 11), make_doc(6, 12), make_doc(3, 13), make_doc(7, 14)])
    rows = packer.pop_rows(max_rows=1)
    assert rows.dtype == np.int32 and rows.shape == (1, 10)
    # largest fitting is 7 (fill 14), then the 3 (fill 13) fills the remaining 3 exactly.
    assert rows[0].tolist() == make_doc(7, 14) + make_doc(3, 13)
    assert packer.tokens_cropped == 0
    # left: 4 and 6 -> 6 placed, 4 fills exactly.
    rows = packer.pop_rows(drain=True)
    assert rows[0].tolist() == make_doc(6, 12) + make_doc(4, 11)
    assert packer.num_buffered_docs == 0 and packer.buffered_tokens == 0


def test_packer_invariants_and_token_accounting_on_random_documents():
    rng = np.random.default_rng(0)
    seq_len = 64
    packer = BestFitPacker(seq_len=seq_len, bos_token_id=BOS, min_buffer_docs=50)
    all_rows = []
    for _ in range(20):
        packer.add(random_docs(rng, 40, max_len=150))
        all_rows.append(packer.pop_rows())
    all_rows.append(packer.pop_rows(drain=True))
    rows = np.concatenate(all_rows)
    assert rows.shape[1] == seq_len + 1 and len(rows) > 100
    assert np.all(rows[:, 0] == BOS)
    assert np.all(rows >= 0)  # no padding value anywhere: every token comes from a document
    assert packer.tokens_emitted == rows.size
    assert packer.tokens_read == packer.tokens_emitted + packer.tokens_cropped + packer.buffered_tokens
    assert packer.buffered_tokens < seq_len + 1  # drain left less than one row
    assert 0 < packer.crop_fraction < 1


def test_packer_rows_are_slices_of_documents_in_order():
    # Every document has a distinct fill token, so each row must read as BOS-led runs of one fill
    # whose lengths never exceed the document's, and a crop keeps the document's prefix.
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 40, size=200)
    docs = [make_doc(int(n), 1000 + i) for i, n in enumerate(lengths)]
    packer = BestFitPacker(seq_len=31, bos_token_id=BOS, min_buffer_docs=20)
    packer.add(docs)
    rows = packer.pop_rows(drain=True)
    for row in rows:
        starts = np.flatnonzero(row == BOS)
        assert starts[0] == 0
        for start, stop in zip(starts, list(starts[1:]) + [len(row)]):
            piece = row[start:stop]
            if len(piece) > 1:
                fill = int(piece[1])
                assert np.all(piece[1:] == fill)
                assert len(piece) <= lengths[fill - 1000]


def test_packer_waits_for_a_full_buffer_unless_draining():
    packer = BestFitPacker(seq_len=7, bos_token_id=BOS, min_buffer_docs=5)
    packer.add([make_doc(8, 20 + i) for i in range(3)])
    assert packer.pop_rows().shape == (0, 8)
    assert packer.pop_rows(drain=True).shape == (3, 8)
    packer.add([make_doc(3, 30)])
    assert packer.pop_rows(drain=True).shape == (0, 8)  # 3 tokens cannot fill a row of 8
    assert packer.buffered_tokens == 3


def test_packer_rejects_documents_without_bos():
    packer = BestFitPacker(seq_len=7, bos_token_id=BOS)
    with pytest.raises(ValueError, match="BOS"):
        packer.add([[1, 2, 3]])
    with pytest.raises(ValueError, match="non-empty"):
        packer.add([[]])


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(2)
    docs = random_docs(rng, 300, max_len=80)
    original = BestFitPacker(seq_len=32, bos_token_id=BOS, min_buffer_docs=30)
    original.add(docs[:150])
    original.pop_rows(max_rows=5)
    state = original.state_dict()

    restored = BestFitPacker(seq_len=32, bos_token_id=BOS, min_buffer_docs=30)
    restored.load_state_dict(state)
    assert restored.tokens_read == original.tokens_read
    assert restored.tokens_cropped == original.tokens_cropped
    for packer in (original, restored):
        packer.add(docs[150:])
    np.testing.assert_array_equal(original.pop_rows(drain=True), restored.pop_rows(drain=True))

    other = BestFitPacker(seq_len=64, bos_token_id=BOS)
    with pytest.raises(ValueError, match="same sequence length"):
        other.load_state_dict(state)
