"""Small helpers for FSDP2 ``DTensor`` values in state dicts."""

from __future__ import annotations

import torch


def with_local(template: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A DTensor laid out like ``template`` (mesh, placements, global shape) over ``local``.

    ``local`` must be this rank's shard with the shape of ``template``'s local
    tensor; no communication happens.
    """
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        template.device_mesh,
        template.placements,
        shape=template.shape,
        stride=template.stride(),
        run_check=False,
    )


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective on its mesh); plain tensors as they are."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    return value
