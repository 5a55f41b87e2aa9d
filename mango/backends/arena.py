"""Work memory as one byte buffer carved into typed views at aligned offsets.

Both step backends keep their big temporaries this way: the torch backend one workspace per
device (its NS buffers and chunk buffers at fixed offsets), the triton backend one arena that
every round's buffers are views of (rounds run one after another on one stream, so they share it).
"""

from __future__ import annotations

import torch


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype`, floating or integer (a byte scratch is carved as uint8)."""
    return (torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits) // 8


def align_up(nbytes: int, align: int) -> int:
    """The first multiple of `align` at or after `nbytes`."""
    return -(-nbytes // align) * align


def typed_view(buffer: torch.Tensor, start_bytes: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """n elements of `dtype` at byte `start_bytes` of a uint8 buffer."""
    return buffer[start_bytes : start_bytes + n * itemsize(dtype)].view(dtype)


def span(requests, align: int) -> int:
    """Bytes that `requests` [(numel, dtype)] take when carved one after another, each aligned."""
    end = 0
    for n, dt in requests:
        end = align_up(end, align) + n * itemsize(dt)
    return end


class Arena:
    """One byte buffer; `allocator()` hands out consecutive aligned views of it from the start."""

    def __init__(self, nbytes: int, device, align: int):
        self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        self.align = align

    def allocator(self):
        """A fresh bump allocator `alloc(numel, dtype)` from the start of the arena (one per user
        whose buffers may overlap another user's: a round)."""
        end = 0

        def alloc(n, dtype):
            nonlocal end
            start = align_up(end, self.align)
            end = start + n * itemsize(dtype)
            return typed_view(self.buffer, start, n, dtype)

        return alloc
