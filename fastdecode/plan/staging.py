"""One flat buffer for a step's host-built inputs, sent to the device in one copy.

Every per-step input the host computes (token ids, positions, slots, block tables, lengths,
sampling parameters...) is written into a region of one host buffer (pinned on CUDA), then one
non-blocking ``copy_`` moves the used span to a device buffer of the same layout. Regions sit
at offsets fixed by their capacities, so a field's device view starts at the same address every
step: what a captured CUDA graph reads. On a CPU device the host buffer *is* the device buffer
and nothing is copied.

A field that outgrows its capacity reallocates both buffers (capacities double; host contents
are kept): ``version`` then changes, and device views taken before are stale (take them after
the last ``reserve`` of a step; captured graphs holding them must be rebuilt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

_ALIGN = 64  # bytes: each region starts on a cache line


@dataclass(frozen=True)
class Field:
    """A typed region of the buffer: ``capacity`` elements of ``dtype`` at byte ``offset``."""

    dtype: torch.dtype
    capacity: int
    offset: int

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.capacity * self.itemsize


class Staging:
    """Host and device buffers holding named 1-D fields (see module doc).

    fields: ``{name: (dtype, initial capacity in elements)}``, laid out in this order; put the
    fields whose used part is small first: ``upload`` copies from the start of the buffer to
    the end of the last field written this step.
    """

    def __init__(self, fields: dict[str, tuple[torch.dtype, int]], device) -> None:
        self.device = torch.device(device)
        self._spec = {name: (dtype, max(1, capacity)) for name, (dtype, capacity)
                      in fields.items()}
        self.version = 0
        self._allocate()

    def _allocate(self) -> None:
        old = getattr(self, "_host_views", {})
        self.fields: dict[str, Field] = {}
        offset = 0
        for name, (dtype, capacity) in self._spec.items():
            self.fields[name] = Field(dtype, capacity, offset)
            offset += -(-capacity * dtype.itemsize // _ALIGN) * _ALIGN
        pin = self.device.type == "cuda"
        self._host = torch.zeros(offset, dtype=torch.uint8, pin_memory=pin)
        self._dev = (self._host if self.device.type == "cpu"
                     else torch.zeros(offset, dtype=torch.uint8, device=self.device))
        self._host_views = {n: self._typed(self._host, f).numpy() for n, f in self.fields.items()}
        self._dev_views = {n: self._typed(self._dev, f) for n, f in self.fields.items()}
        self._dev_slices: dict[tuple[str, int], torch.Tensor] = {}
        for name, values in old.items():  # what this step wrote before growing stays
            self._host_views[name][:len(values)] = values
        self._end = self._host.numel() if old else 0  # bytes to upload
        self._copied: Optional[torch.cuda.Event] = None
        self.version += 1

    @staticmethod
    def _typed(buf: torch.Tensor, f: Field) -> torch.Tensor:
        return buf[f.offset:f.offset + f.nbytes].view(f.dtype)

    def reserve(self, **counts: int) -> bool:
        """Make room for ``counts[name]`` elements of each named field; True when that
        reallocated the buffers (device views and captured graphs are then stale)."""
        grow = {n: c for n, c in counts.items() if c > self.fields[n].capacity}
        if not grow:
            return False
        self.wait()
        for name, count in grow.items():
            dtype, capacity = self._spec[name]
            while capacity < count:
                capacity *= 2
            self._spec[name] = (dtype, capacity)
        self._allocate()
        return True

    def host(self, name: str, count: int) -> np.ndarray:
        """The first ``count`` elements of a field on the host, to fill (1-D numpy view).
        Call ``reserve`` first; the previous step's copy must have finished (``wait``)."""
        f = self.fields[name]
        if count > f.capacity:
            raise ValueError(f"staging field {name!r}: {count} elements exceed its capacity "
                             f"{f.capacity} (reserve first)")
        self._end = max(self._end, f.offset + count * f.itemsize)
        return self._host_views[name][:count]

    def device_view(self, name: str, count: int) -> torch.Tensor:
        """The first ``count`` elements of a field on the device (valid after ``upload``); the
        same tensor object for the same field and count until the buffers are reallocated."""
        view = self._dev_slices.get((name, count))
        if view is None:
            view = self._dev_slices[name, count] = self._dev_views[name][:count]
        return view

    def upload(self) -> None:
        """Send everything written since the last upload in one non-blocking copy."""
        if self._dev is not self._host and self._end:
            self._dev[:self._end].copy_(self._host[:self._end], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        self._end = 0

    def wait(self) -> None:
        """Block until the last upload has read the host buffer (so it may be written again).
        Usually a no-op: a step's results are read back after its inputs were copied."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
