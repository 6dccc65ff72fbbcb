"""Host lists onto the device without waiting for it.

``torch.tensor(values, device="cuda")`` copies from pageable memory, which
makes the host wait until the GPU has finished the work queued before it: a
host synchronisation per upload, several per step. Staged in pinned memory
and copied with ``non_blocking=True``, the copy is queued on the stream like a
kernel and the host goes on planning (PyTorch's pinned allocator keeps the
staging buffer alive until the copy has run). On a CPU it is the plain tensor.
"""

from __future__ import annotations

import torch


def upload(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` (a list, nested lists or numbers) as a tensor on ``device``, queued rather than waited for."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
