"""A deterministic, learnable synthetic token stream whose state is one integer.

Sample ``i`` of the stream is a pure function of ``(seed, i)``: a walk through a
fixed random Markov chain (each token has a few likely successors, plus a little
uniform noise), generated from its own counter-seeded generator. A model learns
the chain's transitions, so the loss visibly falls from ``ln(vocab)`` toward the
chain's entropy.

Global step ``s`` reads samples ``[s * B, (s + 1) * B)`` of the stream (``B`` the
global batch) and rank ``r`` of ``W`` takes the ``r``-th contiguous slice of
``B / W`` samples. The loader state is the global position (the next sample
index), identical on every rank, so a run saved on N ranks resumes on M ranks
and sees exactly the same global batches.
"""

from __future__ import annotations

from typing import Any

import torch

from ckpt_core.errors import ConfigError

MASK64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 finalizer per value)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & MASK64)) & MASK64
        h = (h + 0x9E3779B97F4A7C15) & MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class MarkovChain:
    """A fixed random chain over ``states`` tokens with ``branching`` successors each."""

    def __init__(self, vocab_size: int, seed: int, *, branching: int = 4, noise: float = 0.05):
        self.vocab_size = vocab_size
        # A bounded number of active tokens keeps the chain learnable in a short run.
        self.states = min(vocab_size, 512)
        self.branching = branching
        self.noise = noise
        g = torch.Generator().manual_seed(mix64(seed, 0x5EED))
        # Active tokens are spread over the vocabulary (not just its first ids).
        self.tokens: list[int] = torch.randperm(vocab_size, generator=g)[: self.states].tolist()
        succ = torch.randint(self.states, (self.states, branching), generator=g)
        self.successors: list[list[int]] = succ.tolist()
        self.seed = seed

    def sample(self, index: int, length: int) -> list[int]:
        """Sample ``index`` of the stream: ``length`` token ids."""
        g = torch.Generator().manual_seed(mix64(self.seed, index))
        choice = torch.randint(self.branching, (length,), generator=g).tolist()
        noisy = (torch.rand(length, generator=g) < self.noise).tolist()
        jump = torch.randint(self.states, (length,), generator=g).tolist()
        state = jump[0]
        out = [state]
        succ = self.successors
        for t in range(1, length):
            state = jump[t] if noisy[t] else succ[state][choice[t]]
            out.append(state)
        tokens = self.tokens
        return [tokens[s] for s in out]


class SyntheticTokens:
    """The per-rank loader: ``next(loader)`` gives ``(inputs, targets)``.

    ``inputs`` and ``targets`` are ``LongTensor[batch_size / world_size, seq_len]``,
    ``targets`` shifted by one. A ``Stateful``: ``state_dict() == {"position": n}``
    where ``n`` is the next global sample index.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(
                f"training.batch_size = {batch_size} is not divisible by the world size "
                f"{world_size}: each rank takes an equal slice of the global batch. Use a "
                f"multiple of {world_size}."
            )
        self.chain = MarkovChain(vocab_size, seed)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.position = 0

    def global_batch(self, position: int) -> torch.Tensor:
        """The whole global batch starting at sample ``position``: ``[B, seq_len + 1]``."""
        rows = [self.chain.sample(position + i, self.seq_len + 1) for i in range(self.batch_size)]
        return torch.tensor(rows, dtype=torch.long)

    def local_rows(self, position: int) -> torch.Tensor:
        """This rank's slice of the global batch at ``position``: ``[B / W, seq_len + 1]``."""
        start = position + self.rank * self.local_batch
        rows = [self.chain.sample(start + i, self.seq_len + 1) for i in range(self.local_batch)]
        return torch.tensor(rows, dtype=torch.long)

    def __iter__(self) -> SyntheticTokens:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.local_rows(self.position).to(self.device)
        self.position += self.batch_size
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """``{"position": next global sample index}`` (the same on every rank)."""
        return {"position": self.position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the stream at the saved global position."""
        position = int(state_dict["position"])
        if position < 0:
            raise ValueError(f"dataloader position must be >= 0, got {position}.")
        self.position = position
