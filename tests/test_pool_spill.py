"""The synthetic pool spills its oldest samples to disk past its memory bound, and says so."""

from __future__ import annotations

import torch

from dfkd_cli.synth.base import SyntheticPool

ROW_BYTES = 1 * 4 * 4 * 4  # a [1, 4, 4] float32 sample


def filled_pool(limit_rows: int, batches: int = 10) -> tuple[SyntheticPool, torch.Tensor, list[str]]:
    notes: list[str] = []
    pool = SyntheticPool(memory_limit=limit_rows * ROW_BYTES)
    pool.on_spill = notes.append
    added = torch.arange(batches * 16 * 16, dtype=torch.float32).view(batches * 16, 1, 4, 4)
    for batch in added.split(16):
        pool.add(batch)
    return pool, added, notes


def test_pool_past_its_bound_keeps_the_newest_in_memory_and_the_rest_on_disk() -> None:
    pool, added, notes = filled_pool(limit_rows=20)
    assert len(pool) == 160 and len(notes) == 1 and "spill" in notes[0] and pool.note == notes[0]
    in_memory = sum(c.numel() * c.element_size() for c in pool._chunks)
    assert in_memory <= 20 * ROW_BYTES and pool._disk is not None and pool._disk.count == 160 - len(pool._memory())
    assert torch.equal(pool.tensor(), added)  # oldest first, nothing lost or reordered
    assert torch.equal(pool.rows(torch.tensor([0, 159, 3])), added[[0, 159, 3]])


def test_sampling_spans_disk_and_memory_uniformly() -> None:
    pool, added, _ = filled_pool(limit_rows=20)
    torch.manual_seed(0)
    batch = pool.sample(4000)
    first_values = batch[:, 0, 0, 0] / 16  # row numbers
    assert all(float(v).is_integer() for v in first_values)
    rows = first_values.long()
    assert torch.equal(batch, added[rows])
    on_disk = (rows < pool._disk.count).float().mean()
    assert abs(float(on_disk) - pool._disk.count / 160) < 0.05


def test_a_pool_within_its_bound_never_touches_disk_and_round_trips() -> None:
    pool, added, notes = filled_pool(limit_rows=1000)
    assert notes == [] and pool._disk is None
    spilled, _, _ = filled_pool(limit_rows=20)
    restored = SyntheticPool(memory_limit=20 * ROW_BYTES)
    restored.load_state_dict(spilled.state_dict(), torch.device("cpu"))
    assert torch.equal(restored.tensor(), added) and restored._disk is not None
