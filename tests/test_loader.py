"""Batches by index arithmetic: ragged gathering, trimming, epoch order and mid-epoch skip."""

from __future__ import annotations

import torch

from rex.data.loader import BatchLoader, Ragged

# rows: [1, 2, 3], [], [4], [5, 6, 7, 8, 9]
VALUES = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9])
OFFSETS = torch.tensor([0, 3, 3, 4, 9])


def test_ragged_gather_keeps_the_last_items_left_padded_to_the_batch_maximum():
    ragged = Ragged(VALUES, OFFSETS, max_len=4)
    assert len(ragged) == 4
    got = ragged.gather(torch.tensor([3, 0, 1]))
    assert got.tolist() == [[6, 7, 8, 9], [0, 1, 2, 3], [0, 0, 0, 0]]
    assert ragged.gather(torch.tensor([2, 0])).tolist() == [[0, 0, 4], [1, 2, 3]]
    assert ragged.gather(torch.tensor([1])).tolist() == [[0]]  # an empty row still has width 1


def test_compact_int32_ids_come_out_as_int64_batches():
    wide = Ragged(VALUES, OFFSETS, max_len=3)
    compact = Ragged(VALUES.int(), OFFSETS, max_len=3)
    index = torch.tensor([0, 3, 2, 1])
    assert compact.gather(index).dtype == torch.int64
    assert torch.equal(compact.gather(index), wide.gather(index))
    loader = BatchLoader({"item": VALUES[:4].int(), "history": compact}, batch_size=4)
    batch = next(iter(loader))
    assert batch["item"].dtype == torch.int64 and batch["item"].tolist() == [1, 2, 3, 4]


def test_by_length_serves_every_row_once_shortest_first_in_tight_batches():
    ragged = Ragged(VALUES, OFFSETS, max_len=4)
    loader = BatchLoader(
        {"history": ragged, "row": torch.arange(4)}, batch_size=2, shuffle=False, by_length=True
    )
    batches = list(loader)
    assert [b["row"].tolist() for b in batches] == [[1, 2], [0, 3]]  # lengths 0, 1 | 3, 4 (capped)
    assert [b["history"].shape[1] for b in batches] == [1, 4]
    shuffled = BatchLoader({"history": ragged}, batch_size=2, shuffle=True, by_length=True)
    assert sorted(torch.cat([b["history"][:, -1] for b in shuffled]).tolist()) == [0, 3, 4, 9]


def test_sample_budget_batches_cover_each_row_once_with_about_the_budget_each():
    lengths = torch.randint(1, 30, (500,), generator=torch.Generator().manual_seed(0))
    loader = BatchLoader(
        {"row": torch.arange(500)}, batch_size=1, shuffle=True, seed=3, budget=(lengths, 200)
    )
    total = int(lengths.sum())
    assert len(loader) == -(-total // 200)
    first = [batch["row"] for batch in loader]
    assert len(first) == len(loader)
    assert sorted(torch.cat(first).tolist()) == list(range(500))
    sums = [int(lengths[rows].sum()) for rows in first]
    assert max(sums) < 200 + 30 and min(sums) > 200 - 2 * 30
    # Similar lengths share a batch: a narrow range each (random batches would span about 28).
    assert max(int(lengths[rows].max() - lengths[rows].min()) for rows in first) <= 6
    again = [batch["row"] for batch in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # same epoch, same batches
    loader.sampler.set_epoch(1)
    assert not all(torch.equal(a, b["row"]) for a, b in zip(first, loader, strict=False))
    loader.sampler.set_epoch(0)
    loader.skip_batches(0, 4)
    assert all(torch.equal(a, b["row"]) for a, b in zip(first[4:], loader, strict=True))


def test_dense_sequences_are_trimmed_to_the_batch_maximum():
    dense = torch.tensor([[0, 0, 0, 1], [0, 0, 2, 3], [0, 4, 5, 6]])
    loader = BatchLoader({"history": dense, "user": torch.tensor([1, 2, 3])}, batch_size=2)
    first, second = list(loader)
    assert first["history"].tolist() == [[0, 1], [2, 3]]
    assert second["history"].tolist() == [[4, 5, 6]]


def test_epoch_order_depends_on_seed_and_epoch_and_skip_resumes_mid_epoch():
    column = {"user": torch.arange(10)}
    loader = BatchLoader(column, batch_size=3, shuffle=True, seed=7)
    assert len(loader) == 4
    loader.sampler.set_epoch(0)
    epoch0 = [b["user"].tolist() for b in loader]
    assert sorted(sum(epoch0, [])) == list(range(10))
    assert [b["user"].tolist() for b in loader] == epoch0  # same epoch, same order
    loader.sampler.set_epoch(1)
    epoch1 = [b["user"].tolist() for b in loader]
    assert epoch1 != epoch0
    loader.sampler.set_epoch(0)
    loader.skip_batches(epoch=0, batches=2)
    assert [b["user"].tolist() for b in loader] == epoch0[2:]
    loader.skip_batches(epoch=5, batches=2)  # a skip for another epoch does not apply
    assert [b["user"].tolist() for b in loader] == epoch0


def test_ragged_and_dense_columns_batch_together():
    loader = BatchLoader({"history": Ragged(VALUES, OFFSETS, 2), "label": torch.arange(4.0)}, batch_size=4)
    (batch,) = list(loader)
    assert batch["history"].tolist() == [[2, 3], [0, 0], [0, 4], [8, 9]]
    assert batch["label"].tolist() == [0.0, 1.0, 2.0, 3.0]
