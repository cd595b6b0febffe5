"""The data set every integration script trains on (test scaffolding, like _pause.py).

SAMPLES fixed samples drawn from a generator seeded 1; each fetch is recorded in a
:class:`_pause.Fetches`, so the test can count what every launch read.
"""

from __future__ import annotations

import torch
from _pause import Fetches
from torch.utils.data import Dataset

SAMPLES = 32


class Data(Dataset):
    """``seq=0``: (6 normal features, one of 3 classes) pairs.
    ``seq=N``: ``{"input_ids": N token ids below 50, "labels": 0 or 1}``, for a sequence classifier."""

    def __init__(self, fetches: Fetches, seq: int = 0) -> None:
        g = torch.Generator().manual_seed(1)
        if seq:
            self.x = torch.randint(0, 50, (SAMPLES, seq), generator=g)
            self.y = torch.randint(0, 2, (SAMPLES,), generator=g)
        else:
            self.x = torch.randn(SAMPLES, 6, generator=g)
            self.y = torch.randint(0, 3, (SAMPLES,), generator=g)
        self.tokens = bool(seq)
        self.fetches = fetches

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int):
        self.fetches.add(i)
        if self.tokens:
            return {"input_ids": self.x[i], "labels": self.y[i]}
        return self.x[i], self.y[i]
