"""Data loaders with worker-safe, reproducible random augmentation.

The original used `torch.utils.data.DataLoader` with MONAI random transforms: every worker drew the same crops and
flips, and the same ones again every epoch. Here every loader is built for one `(seed, epoch)`:

* a `torch.Generator` seeded from `(seed, epoch, rank)` drives the shuffle order and the base seed that
  `monai.data.DataLoader` hands to its workers; its `worker_init_fn` reseeds the whole transform chain of worker w
  with `base_seed + w`. So workers differ, epochs differ, ranks differ, and the same `(seed, epoch)` gives the same
  batches bit for bit (the engine rebuilds the loader each epoch, which is what makes resume exact).
* with `num_workers=0`, `monai.data.DataLoader` seeds the transforms from the same generator when it is built.

Batch membership with `num_workers > 0` is fixed by the sampler; sample k of an epoch is produced by worker
`(k // batch_size) % num_workers`, so the result also depends on `num_workers`: keep it fixed across a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DataLoader, Dataset, list_data_collate
from torch.utils.data.distributed import DistributedSampler

from gmim_hub.data.cache import cache_mode, make_dataset
from gmim_hub.errors import ConfigError

__all__ = ["cache_mode", "epoch_generator", "flatten_crops", "make_dataset", "make_loader"]

logger = logging.getLogger(__name__)


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """A `torch.Generator` for one (seed, epoch, rank), well mixed by numpy's `SeedSequence` (adjacent seeds and
    epochs give unrelated streams)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def flatten_crops(batch: Sequence[Any]) -> Any:
    """Collate that flattens multi-crop samples: a transform such as `RandCropByPosNegLabeld(num_samples=n)` turns
    one volume into a list of n dicts; a batch of B volumes becomes one batch of B*n crops. Single dicts collate as
    usual. (MONAI's `list_data_collate`.)"""
    return list_data_collate(batch)


def make_loader(
    data: Sequence[dict[str, Any]] | Dataset,
    transform: Callable[[Any], Any] | None = None,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    epoch: int = 0,
    distributed: bool = False,
    cache: bool | str = False,
    drop_last: bool = False,
    pin_memory: bool = False,
    collate_fn: Callable[[list[Any]], Any] = flatten_crops,
) -> DataLoader:
    """A `monai.data.DataLoader` for one epoch, deterministic given `(seed, epoch)` (and the rank when
    `distributed`). `data` is a datalist (a dataset is built with `transform`, cached in memory when `cache` is
    True or "memory") or a dataset from `make_dataset` (then `transform` must be None; use it for `cache="disk"`).

    `distributed`: a `DistributedSampler` (seeded with `seed`, `set_epoch(epoch)`) shards the data across the
    initialised process group; each rank also gets its own augmentation stream.

    `collate_fn`: how a batch is assembled (default `flatten_crops`); pre-training passes
    `gmim_hub.masking.MaskingCollate`, which also draws the batch's token masks in the worker.
    """
    _check_loader_args(batch_size, num_workers, seed, epoch)
    if isinstance(data, Dataset):
        if transform is not None:
            raise ConfigError("pass either a datalist with transform=, or a prebuilt dataset with transform=None")
        dataset = data
    else:
        if transform is None:
            raise ConfigError("make_loader needs transform= when data is a datalist")
        dataset = make_dataset(data, transform, cache=cache)
    if len(dataset) == 0:
        raise ConfigError("make_loader got an empty dataset; check the datalist split")
    rank = _rank() if distributed else 0
    sampler: DistributedSampler | None = None
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        generator=epoch_generator(seed, epoch, rank),
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=pin_memory,
    )
    logger.debug("loader: %d samples, batch %d, workers %d, seed %d, epoch %d, rank %d",
                 len(dataset), batch_size, num_workers, seed, epoch, rank)
    return loader


def _rank() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("distributed=True needs an initialised torch.distributed process group "
                          "(launch with torchrun and call init_process_group first)")
    return dist.get_rank()


def _check_loader_args(batch_size: int, num_workers: int, seed: int, epoch: int) -> None:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(num_workers, int) and num_workers >= 0):
        raise ConfigError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if not (isinstance(seed, int) and seed >= 0):
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
    if not (isinstance(epoch, int) and epoch >= 0):
        raise ConfigError(f"epoch must be an int >= 0, got {epoch!r}")
