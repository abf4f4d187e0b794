"""Samplers, the pack planner and the collators (drg_llama.data.batching) on literal lengths and rows.

Run: pytest tests/test_batching.py
"""

import numpy as np
import pytest

from drg_llama.data.batching import (
    Collator,
    LengthBucketSampler,
    PackedBatchSampler,
    PackedCollator,
    pack_sequences,
    packed_tokens,
    padded_tokens,
    padded_width,
)


def _item(ids, i):
    return {"input_ids": ids, "labels": i, "base_labels": -1, "severity_mask": [True] * 3, "row": i, "hadm_id": i}


# ----------------------------------------------------------------------------------------------------------------
# which rows go together


def test_sampler_sorts_within_mega_batches_and_shards():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=103)
    sampler = LengthBucketSampler(lengths, batch_size=4, shuffle=True, mega_batches=5, seed=3)
    batches = sampler.batches()
    assert [len(b) for b in batches[:-1]] == [4] * 25 and len(batches[-1]) == 3  # short batch last
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))
    eval_order = np.concatenate(LengthBucketSampler(lengths, 4, shuffle=False).batches())
    assert (np.diff(lengths[eval_order]) <= 0).all()  # longest first
    # two ranks: disjoint-by-position shards of full batches, same count each, covering every row
    shards = [LengthBucketSampler(lengths, 4, True, seed=3, num_replicas=2, rank=r).batches() for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) and all(len(b) == 4 for s in shards for b in s)
    assert set(np.concatenate(shards[0] + shards[1]).tolist()) == set(range(103))
    assert len(LengthBucketSampler(lengths, 4, True, num_replicas=2, rank=0)) == len(shards[0]) * 4


def test_pack_sequences_first_fit_decreasing():
    rows = pack_sequences([5, 3, 8, 2, 6], pack_tokens=10)
    # FFD: 8 -> row0; 6 -> row1; 5 -> row2; 3 -> row1 (6+3); 2 -> row0 (8+2).
    assert rows == [[2, 3], [4, 1], [0]]
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="does not fit"):
        pack_sequences([11], pack_tokens=10)


def test_packed_batch_sampler_covers_every_row_once_within_budget():
    lengths = [5, 64, 33, 12, 40, 7, 64, 20, 3, 50, 18, 29] * 5
    sampler = PackedBatchSampler(lengths, pack_tokens=64, rows_per_batch=3, shuffle=True, mega_batches=2, seed=1)
    sampler.set_epoch(2)
    batches = list(iter(sampler))
    assert len(batches) == len(sampler)
    seen = [i for batch in batches for row in batch for i in row]
    assert sorted(seen) == list(range(len(lengths)))
    assert all(len(b) <= 3 for b in batches)
    assert all(sum(lengths[i] for i in row) <= 64 for b in batches for row in b)
    again = PackedBatchSampler(lengths, pack_tokens=64, rows_per_batch=3, shuffle=True, mega_batches=2, seed=1)
    again.set_epoch(2)
    assert list(iter(again)) == batches  # deterministic in (seed, epoch)
    assert packed_tokens(np.asarray(lengths), sampler.batches()) >= sum(lengths)


@pytest.mark.parametrize("packed", [False, True], ids=["bucketed", "packed"])
def test_resume_skips_the_batches_trained_before_once(packed):
    lengths = np.random.default_rng(0).integers(1, 60, size=40)
    if packed:
        sampler = PackedBatchSampler(lengths, pack_tokens=64, rows_per_batch=2, shuffle=True, seed=4)
    else:
        sampler = LengthBucketSampler(lengths, batch_size=4, shuffle=True, seed=4)
    sampler.set_epoch(1)
    whole = list(iter(sampler))
    sampler.skip_on_resume(epoch=1, batches=3)
    skipped = 3 if packed else 3 * 4  # the packed sampler yields batches, the padded one row indices
    assert list(iter(sampler)) == whole[skipped:]
    assert list(iter(sampler)) == whole  # a later pass over the same epoch number is whole again


def test_packed_batch_sampler_shards_whole_batches_by_rank():
    lengths = [5, 64, 33, 12, 40, 7, 64, 20, 3, 50, 18, 29] * 3
    shards = [
        PackedBatchSampler(lengths, 64, 2, shuffle=True, seed=1, num_replicas=2, rank=r).batches() for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1])  # every rank steps the same number of times
    seen = {i for shard in shards for batch in shard for row in batch for i in row.tolist()}
    assert seen == set(range(len(lengths)))


# ----------------------------------------------------------------------------------------------------------------
# tensors


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_padding_side(side):
    rows = [
        {"input_ids": [5, 6, 7], "labels": 0, "base_labels": -1, "severity_mask": [1, 1, 1], "row": 0, "hadm_id": 9},
        {"input_ids": [5] * 9, "labels": 1, "base_labels": -1, "severity_mask": [0, 1, 0], "row": 1, "hadm_id": 8},
    ]
    batch = Collator(pad_token_id=1, padding_side=side)(rows)
    assert batch["input_ids"].shape == (2, 16)  # longest 9 -> multiple of 8
    mask = batch["attention_mask"][0].tolist()
    assert mask == ([0] * 13 + [1] * 3 if side == "left" else [1] * 3 + [0] * 13)
    real = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert real == [5, 6, 7] and set(batch["input_ids"][0][~batch["attention_mask"][0].bool()].tolist()) == {1}


def test_packed_collator_layout():
    batch = PackedCollator(pad_token_id=0)([[_item([5, 6, 7], 0), _item([8, 9], 1)], [_item([4], 2)]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0], [0] * 8]
    assert batch["seq_ids"].tolist() == [[0, 0, 0, 1, 1, -1, -1, -1], [2, -1, -1, -1, -1, -1, -1, -1]]
    assert batch["seq_lengths"].tolist() == [3, 2, 1]
    assert batch["row"].tolist() == [0, 1, 2] and batch["severity_mask"].shape == (3, 3)


# ----------------------------------------------------------------------------------------------------------------
# what a batching costs


def test_computed_tokens_by_hand():
    assert [padded_width(n) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    lengths = np.array([3, 9, 5, 20])
    # padded: [3, 9] -> 2 x 16; [5, 20] -> 2 x 24
    assert padded_tokens(lengths, [np.array([0, 1]), np.array([2, 3])]) == 2 * 16 + 2 * 24
    # packed: rows [0, 1] (12 tokens) and [3] (20) in one batch -> 2 x 24; row [2] alone -> 1 x 8
    assert packed_tokens(lengths, [[[0, 1], [3]], [[2]]]) == 2 * 24 + 8


@pytest.mark.parametrize("packed", [False, True])
def test_evaluation_shards_score_every_row_once_across_ranks(packed):
    """Under DDP validation metrics are summed over ranks (torchmetrics): repeated rows would count twice.

    Training still pads, so that every rank joins every gradient all-reduce; evaluation does not."""
    lengths = np.random.default_rng(0).integers(5, 60, size=53)

    def sampler(rank: int, train: bool):
        if packed:
            return PackedBatchSampler(lengths, 64, 4, shuffle=train, num_replicas=3, rank=rank)
        return LengthBucketSampler(lengths, 8, shuffle=train, num_replicas=3, rank=rank)

    def rows(s) -> list[int]:
        return [int(i) for batch in s.batches() for i in np.concatenate([np.atleast_1d(r) for r in batch])]

    evaluated = [rows(sampler(rank, train=False)) for rank in range(3)]
    assert sorted(sum(evaluated, [])) == list(range(53))  # each row exactly once
    assert all(len(sampler(rank, train=False)) == len(list(sampler(rank, train=False))) for rank in range(3))
    assert len({len(sampler(rank, train=True).batches()) for rank in range(3)}) == 1  # equal steps in training
