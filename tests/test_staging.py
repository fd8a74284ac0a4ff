"""Host values on their way to the device (engine/staging.py): what arrives is what was sent, in the dtype asked."""
from __future__ import annotations

import pytest
import torch

from engine.staging import columns_to_device, to_device

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 3, 17, 256])
def test_columns_arrive_as_sent_each_aligned(device, n):
    columns = [([b % 2 == 0 for b in range(n)], torch.bool),
               ([0.5 + b for b in range(n)], torch.float32),
               ([-(1 << 63) + b for b in range(n)], torch.int64),        # the int64 range's edge survives
               ([(1 << 31) - 1 - b for b in range(n)], torch.int32),
               ([b * 7 for b in range(n)], torch.int64)]
    tensors = columns_to_device(columns, device)
    for (values, dtype), tensor in zip(columns, tensors):
        assert tensor.dtype == dtype and tensor.device.type == device and tensor.shape == (n,)
        assert tensor.is_contiguous() and tensor.tolist() == values
        assert torch.equal(tensor, to_device(values, dtype, device))
        # Where a column starts in the shared buffer: 128-byte aligned, as a tensor of its own would be.
        assert tensor.storage_offset() * tensor.element_size() % 128 == 0
    # One buffer behind them all: they are views into it, and writing one leaves the others as they were.
    tensors[4].add_(1)
    assert tensors[2].tolist() == columns[2][0] and tensors[4].tolist() == [b * 7 + 1 for b in range(n)]


def test_empty_columns():
    assert [t.tolist() for t in columns_to_device([([], torch.int64), ([], torch.float32)], "cpu")] == [[], []]
