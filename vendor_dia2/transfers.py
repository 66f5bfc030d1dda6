"""Small host tensors bound for the device, copied without waiting for the stream."""

from __future__ import annotations

import torch


def pinned_for(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor`, in pinned memory when it is a host tensor bound for a CUDA device, so that its
    copy is queued on the stream like a kernel. A copy from pageable memory blocks until the
    stream is done, and with a step in flight the host sits out that whole step (H200 run 35: the
    rollback marks' row index cost ~10-14 ms of every 64-call step's host time; a call's start
    waited likewise)."""
    return tensor.pin_memory() if device.type == "cuda" and tensor.device.type == "cpu" else tensor


def queued_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`, its copy queued (`pinned_for`), not `.to(device)`."""
    return pinned_for(tensor, device).to(device, non_blocking=True)
