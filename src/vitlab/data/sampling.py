"""Seeded batches: the order and the augmentation of every training step, fixed by (seed, epoch, step).

A run resumed mid-epoch must see exactly the images, in exactly the order and with exactly the
augmentations, that the uninterrupted run saw. Neither a DataLoader's RNG state nor its
workers' can be saved and restored reliably, so nothing here has state: the epoch's permutation
comes from ``(seed, epoch)``, and every sample carries its own seed, with which
:class:`SeededDataset` reseeds ``random``, numpy and torch before its transform runs (in the
training process or in a worker, it makes no difference).

The same batches serve distributed training: every rank draws the same global batch and keeps
its contiguous share, so world size W with batch b/W per rank sees what one process with batch
b sees.
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import VitlabError


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (nearby inputs give far-apart seeds)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & (2**63 - 1)


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """The batches of one epoch from ``start_step`` on, each a list of ``(index, sample_seed)``.

    ``batch_size`` is the global batch; with ``world_size`` > 1 each rank yields its contiguous
    ``batch_size // world_size`` share. The last incomplete batch is dropped, as in training.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, *, epoch: int = 0, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise VitlabError(f"batch size {batch_size} does not split evenly over {world_size} processes; "
                              f"use a multiple of {world_size}")
        if num_samples < batch_size:
            raise VitlabError(f"the training split has {num_samples} images, fewer than one batch of "
                              f"{batch_size}; lower --batch-size")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.epoch, self.start_step, self.rank, self.world_size = epoch, start_step, rank, world_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Yield the batches of ``epoch`` from step ``start_step`` on, on the next iteration."""
        self.epoch, self.start_step = epoch, start_step

    @property
    def steps_per_epoch(self) -> int:
        """The number of full global batches in one epoch (the last incomplete one is dropped)."""
        return self.num_samples // self.batch_size

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 1))
        order = torch.randperm(self.num_samples, generator=g).tolist()
        share = self.batch_size // self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * self.batch_size + self.rank * share
            yield [(i, mix_seed(self.seed, self.epoch, 2, first + k)) for k, i in enumerate(order[first:first + share])]


def seed_all(seed: int) -> None:
    """Seed ``random``, numpy and torch's CPU generator (what transforms and dropout draw from).

    Called once per sample, so it must be cheap: ``torch.manual_seed`` costs 0.1-1 ms a call
    (it passes through torch.compile's guard and also seeds every GPU), while the CPU
    generator's own ``manual_seed`` costs 1 us. GPUs are seeded once per step by the trainer.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


class SeededDataset(Dataset):
    """``dataset`` indexed by ``(index, sample_seed)``: the transform of each sample is seeded by it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]):
        index, sample_seed = item
        seed_all(sample_seed)
        return self.dataset[index]
