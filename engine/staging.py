"""Host values on their way to the device, without making the host wait for the GPU.

torch.tensor(values, device="cuda") copies from pageable memory, which CUDA does synchronously: the host waits
until everything queued on the stream has run, and the GPU then idles while the host builds the rest of the step.
Here values go through numpy (torch.tensor over a Python list is 5-9x slower) into pinned memory, and from there
to the device asynchronously. torch's pinned-memory allocator hands a block out again only once the copy that read
it has run, so the caller may go on building the next batch at once.
"""
from __future__ import annotations

import numpy as np
import torch

_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """values (a list or a numpy array) as a tensor of dtype on device."""
    host = torch.from_numpy(np.asarray(values, dtype=_NUMPY[dtype]))
    if torch.device(device).type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def columns_to_device(columns: list[tuple[list, torch.dtype]], device: torch.device | str) -> list[torch.Tensor]:
    """Equal-length columns of host values, each (values, dtype), as device tensors through one pinned buffer and
    one copy: the host spends 50-100 us issuing each copy, and a plan's sampling parameters were seven of them,
    with the GPU waiting. Each column starts 128-byte aligned in the buffer, as a tensor of its own would (Triton
    compiles a kernel for the alignment of its pointers)."""
    n = len(columns[0][0])
    span = -(-8 * max(n, 1) // 128) * 128                  # bytes a column takes: the widest dtype's, aligned
    stage, host = pinned((len(columns) * span,), torch.uint8, device)
    for i, (values, dtype) in enumerate(columns):
        host[i * span:(i + 1) * span].view(_NUMPY[dtype])[:n] = values
    if torch.device(device).type != "cpu":
        stage = stage.to(device, non_blocking=True)
    return [stage[i * span:(i + 1) * span].view(dtype)[:n] for i, (_, dtype) in enumerate(columns)]


def pinned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, np.ndarray]:
    """A new host staging tensor (pinned when the device is a GPU) and its numpy view, to fill in place and copy
    with .to(device, non_blocking=True)."""
    host = torch.empty(shape, dtype=dtype, pin_memory=torch.device(device).type == "cuda")
    return host, host.numpy()
