"""RowBuffer: batches appended into one growing block equal the concatenation of the batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facemoe_model.rows import RowBuffer


@pytest.mark.parametrize("capacity", [0, 1, 7, 1000])
def test_rows_equal_the_concatenated_batches(capacity):
    rng = np.random.default_rng(capacity)
    batches = [rng.normal(size=(int(n), 3, 2)).astype(np.float32) for n in rng.integers(0, 40, size=30)]
    buffer = RowBuffer(capacity)
    for b in batches:
        buffer.append(b)
    expected = np.concatenate(batches)
    assert len(buffer) == len(expected) and buffer.array.dtype == np.float32
    assert np.array_equal(buffer.array, expected)
    batches[0][:] = 123.0  # the buffer holds copies
    assert np.array_equal(buffer.array, expected)


def test_grows_by_doubling_with_few_allocations():
    buffer = RowBuffer()
    buffer.append(np.ones((16, 128), dtype=np.float32))
    blocks, previous = 1, buffer.array  # the previous view keeps its block alive: no address reuse
    for _ in range(999):
        buffer.append(np.ones((16, 128), dtype=np.float32))
        blocks += not np.shares_memory(previous, buffer.array)
        previous = buffer.array
    assert len(buffer) == 16_000 and blocks == 11  # 16 * 2**10 >= 16,000 rows


def test_torch_rows_and_dtype_of_the_first_batch():
    buffer = RowBuffer()
    buffer.append(torch.arange(6, dtype=torch.float64).reshape(3, 2))
    buffer.append(np.ones((1, 2), dtype=np.float32))
    assert buffer.array.dtype == np.float64 and buffer.array.tolist() == [[0, 1], [2, 3], [4, 5], [1, 1]]


def test_bad_rows_are_refused():
    buffer = RowBuffer()
    buffer.append(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="row shape"):
        buffer.append(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="scalar"):
        buffer.append(np.float32(1.0))


def test_joined_keeps_order_and_skips_empty_parts():
    parts = [np.zeros((0,)), np.arange(4.0).reshape(2, 2), RowBuffer(), np.arange(4.0, 6.0).reshape(1, 2)]
    joined = RowBuffer.joined(parts)
    assert joined.array.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert len(RowBuffer.joined([])) == 0 and RowBuffer.joined([]).array.shape == (0,)
