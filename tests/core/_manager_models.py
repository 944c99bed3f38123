"""Tiny models and a training step shared by the manager tests."""

from __future__ import annotations

import torch
from torch import nn

from ckpt_core import CheckpointConfig
from ckpt_core.policy.manager import CheckpointManager


class TinyNet(nn.Module):
    """Two linears, a persistent buffer and a non-persistent one."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim, bias=False)
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("cache", torch.full((dim,), 7.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inp(x)) * self.scale)


class Trainable:
    """A model, AdamW, a step scheduler and a manager over one folder."""

    def __init__(self, seed: int = 0, dim: int = 16, **config) -> None:
        torch.manual_seed(seed)
        self.model = TinyNet(dim)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.StepLR(self.optim, step_size=2, gamma=0.5)
        self.config = CheckpointConfig(**config)
        self.manager = CheckpointManager(
            self.config, self.model, optimizers=self.optim, lr_schedulers=self.sched
        )

    def step(self) -> None:
        x = torch.randn(4, self.model.inp.in_features)
        self.model(x).square().mean().backward()
        self.manager.maybe_wait_for_staging()
        self.optim.step()
        self.optim.zero_grad()
        self.sched.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical tensors under the same keys."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
