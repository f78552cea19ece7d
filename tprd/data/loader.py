"""Datasets by name, distributed samplers and the train / test data loaders.

* :func:`get_detection_dataset` — the records of one or more registered datasets, concatenated,
  as a map-style dataset (a LazyCall target in the data configs).
* :class:`TrainingSampler` — an infinite stream of indices: one seeded permutation per pass over
  the data, shared by all processes; process ``r`` of ``W`` takes positions ``r, r + W, ...``
  (the shards never overlap and together cover every pass exactly once).
* :class:`InferenceSampler` — each process gets one contiguous shard; shards cover every index
  exactly once (no padding, no duplicates), so gathered evaluation sees each image once.
* :func:`build_detection_train_loader` / :func:`build_detection_test_loader` — torch
  ``DataLoader`` s whose batches are **lists of sample dicts** (padding to a common size and the
  masks happen in the model's preprocessing).

Reproducibility: every training sample is augmented under its own seed, drawn from
``(seed, rank)`` in sampling order, so the augmented stream of a process depends only on the seed,
its rank and the world size — not on ``num_workers``.

The train loader also tells the mapper which iteration a sample is for (batch ``i`` of the stream
is iteration ``i``; a resumed run skips batches, not numbers), so a schedule of augmentations
(RT-DETR's stop epoch, :class:`tprd.data.RTDETRDatasetMapper`) follows the trainer's iteration in
every worker process. A ``batch_transform`` (RT-DETR's per-batch multi-scale resize,
:class:`tprd.data.BatchMultiScaleResize`) sees a whole batch under a seed of ``(seed, iteration)``
only, so its random choice is the same on every process.
"""
from __future__ import annotations

import itertools
import logging
import random
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from .catalog import MetadataCatalog, resolve_dataset_names
from .catalog import DatasetCatalog
from .datasets import DatasetFromList, MapDataset, filter_empty_records
from tprd.errors import DatasetError

__all__ = [
    "get_detection_dataset",
    "get_detection_dataset_dicts",
    "TrainingSampler",
    "InferenceSampler",
    "GroupedBatchSampler",
    "build_detection_train_loader",
    "build_detection_test_loader",
    "skip_train_batches",
    "trivial_batch_collator",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------
def _dist_rank_world(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    world_size, rank = int(world_size), int(rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


def _shared_seed(seed: Optional[int]) -> int:
    """``seed``, or one drawn from torch's global generator on rank 0 and shared by every process.

    The trainer seeds that generator with ``train.seed`` before building the loaders, so a run's
    sample order and augmentations follow from ``train.seed`` alone (a negative ``train.seed``
    seeds it randomly), as with detectron2's shared random seed.
    """
    if seed is not None:
        return int(seed)
    value = [int(torch.randint(2**31 - 1, (1,)).item())]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(value, src=0)
    return int(value[0])


# --------------------------------------------------------------------------------------------
# Datasets by name
# --------------------------------------------------------------------------------------------
def get_detection_dataset_dicts(
    names: Union[str, Sequence[str]], filter_empty: bool = True, strict: bool = False
) -> List[Dict[str, Any]]:
    """The records of the named datasets, concatenated (detectron2's function of the same name).

    ``filter_empty`` drops images without non-crowd boxes (use it for training sets; a training
    set without any annotation is an error). ``strict``: annotations that loading would skip (see
    :mod:`tprd.data.checks`) are an error instead. All datasets must share the same ``thing_classes``.
    """
    names = resolve_dataset_names(names)
    # Check the class lists before loading anything (loading COCO train takes a while).
    classes = None
    for name in names:
        if name not in DatasetCatalog:
            DatasetCatalog.get(name)  # raises the "not registered" error
        part_classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is None:
            classes = part_classes
        elif part_classes is not None and list(part_classes) != list(classes):
            raise DatasetError(
                f"datasets {names} have different thing_classes ({list(classes)} vs {list(part_classes)}); "
                "they cannot be concatenated"
            )
    records: List[Dict[str, Any]] = []
    parts = [DatasetCatalog.get(name, strict=strict) for name in names]
    check_dataset_parts(names, parts, filter_empty)
    for name, part in zip(names, parts):
        if not any(len(r.get("classes", ())) for r in part):
            logger.warning(
                "%s has no annotation: evaluating on it gives no AP (nan); use a split with boxes to measure "
                "the model", name,
            )
        records.extend(part)
    if filter_empty:
        records = filter_empty_records(records)
        if not records:
            raise DatasetError(f"no image of {names} has a non-crowd annotation, so they cannot train a detector")
    return records


def check_dataset_parts(names: Sequence[str], parts: Sequence[List[Dict[str, Any]]], filter_empty: bool) -> None:
    """Errors of loaded datasets: one without images; with ``filter_empty`` (training) one without
    any usable annotation."""
    for name, part in zip(names, parts):
        if not part:
            raise DatasetError(f"dataset {name!r} has no images; check its annotation file or split file")
        if filter_empty and not any(len(r.get("classes", ())) for r in part):
            raise DatasetError(
                f"dataset {name!r} has no usable annotation in its {len(part)} images, so it cannot train a "
                "detector (a training set needs boxes; see the warning above for skipped ones). Check its "
                "annotation file, or the dataset names of dataloader.train"
            )


def get_detection_dataset(
    names: Union[str, Sequence[str]], filter_empty: bool = True, strict: bool = False
) -> DatasetFromList:
    """:func:`get_detection_dataset_dicts` as a (memory-compact) map-style dataset.

    The result has ``names`` (the list of dataset names) as an attribute.
    """
    names = resolve_dataset_names(names)
    ds = DatasetFromList(get_detection_dataset_dicts(names, filter_empty=filter_empty, strict=strict))
    ds.names = names
    return ds


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------
class TrainingSampler(Sampler):
    """Infinite stream of indices for one process (see the module docstring).

    Args:
        size: dataset length.
        shuffle: a fresh permutation per pass (else ``0..size-1`` repeated).
        seed: shared by all processes (``None``: drawn on rank 0 and broadcast).
        rank, world_size: default from ``torch.distributed`` (0 / 1 when not initialised).
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: Optional[int] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        if int(size) <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size={size}")
        self._size = int(size)
        self._shuffle = bool(shuffle)
        self._seed = _shared_seed(seed)
        self._rank, self._world_size = _dist_rank_world(rank, world_size)

    def _infinite_indices(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self._seed)
        while True:
            if self._shuffle:
                yield from torch.randperm(self._size, generator=g).tolist()
            else:
                yield from range(self._size)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)


class InferenceSampler(Sampler):
    """Contiguous shard ``[start, end)`` of ``range(size)`` for this process.

    Shard sizes differ by at most one (the first ``size % world_size`` ranks get one more).
    """

    def __init__(self, size: int, rank: Optional[int] = None, world_size: Optional[int] = None):
        self._size = int(size)
        if self._size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self._rank, self._world_size = _dist_rank_world(rank, world_size)
        base, extra = divmod(self._size, self._world_size)
        self._start = self._rank * base + min(self._rank, extra)
        self._end = self._start + base + (1 if self._rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._start, self._end))

    def __len__(self) -> int:
        return self._end - self._start


class GroupedBatchSampler(Sampler):
    """Batches of ``batch_size`` indices that share a group id (e.g. landscape vs portrait).

    Indices are buffered per group and a batch is emitted as soon as its group's buffer is full,
    so the order within a group follows the underlying sampler (which may be infinite).
    """

    def __init__(self, sampler: Sampler, group_ids: Sequence[int], batch_size: int):
        self.sampler = sampler
        self.group_ids = np.asarray(group_ids)
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")

    def __iter__(self) -> Iterator[List[int]]:
        buckets: Dict[int, List[int]] = defaultdict(list)
        for idx in self.sampler:
            bucket = buckets[int(self.group_ids[idx])]
            bucket.append(int(idx))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                del bucket[:]


class _SeededBatches(Sampler):
    """Attach a per-sample augmentation seed and the iteration to every index of a batch sampler's
    batches: batch ``i`` of the stream is a list of ``(index, seed, i)``.

    ``skip_batches``: leave out the first N batches of the stream (indices and seeds only; no image
    is read), so that a resumed run sees the batches the uninterrupted run would have seen.
    """

    def __init__(self, batch_sampler: Any, seed: int, rank: int):
        self.batch_sampler = batch_sampler
        self.seed, self.rank = int(seed), int(rank)
        self.skip_batches = 0

    def __iter__(self) -> Iterator[List[Tuple[int, int, int]]]:
        rng = np.random.default_rng([self.seed, self.rank])
        for i, batch in enumerate(self.batch_sampler):
            seeds = rng.integers(0, 2**63 - 1, size=len(batch), dtype=np.int64).tolist()
            if i >= self.skip_batches:
                yield [(idx, s, i) for idx, s in zip(batch, seeds)]


def skip_train_batches(loader: Any, num_batches: int) -> bool:
    """Make a loader of :func:`build_detection_train_loader` start at batch ``num_batches`` of its
    stream (before it is first iterated). Returns False for other loaders, which are left as they are.
    """
    batches = getattr(loader, "batch_sampler", None)
    if not isinstance(batches, _SeededBatches):
        return False
    batches.skip_batches = int(num_batches)
    return True


def batch_seed(seed: int, iteration: int) -> int:
    """The seed of a train loader's batch transform at ``iteration``: a function of the loader's
    shared seed and the iteration only (not the rank), so every process draws the same."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(iteration), 0xBA7C]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class _SeededMapDataset(Dataset):
    """``mapper(dataset[idx])`` run under ``torch.manual_seed(seed)`` for ``(idx, seed[, iteration])``
    keys; a mapper whose ``takes_iteration`` attribute is true is called as
    ``mapper(record, iteration=iteration)``. Whole batches (``__getitems__``, which torch's loader
    prefers) then go through ``batch_transform(samples, iteration)`` under
    :func:`batch_seed` ``(seed, iteration)``."""

    def __init__(self, dataset: Any, mapper: Optional[Callable[[Any], Any]],
                 batch_transform: Optional[Callable[[List[Any], int], List[Any]]] = None, seed: int = 0):
        self.dataset = dataset
        self.mapper = mapper
        self.batch_transform = batch_transform
        self.seed = int(seed)
        self._takes_iteration = bool(getattr(mapper, "takes_iteration", False))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, ...]) -> Any:
        idx, seed = key[0], key[1]
        iteration = key[2] if len(key) > 2 else None
        record = self.dataset[idx]
        if self.mapper is None:
            return record
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self._takes_iteration:
                return self.mapper(record, iteration=iteration)
            return self.mapper(record)

    def __getitems__(self, keys: Sequence[Tuple[int, ...]]) -> List[Any]:
        samples = [self[key] for key in keys]
        if self.batch_transform is None or not keys:
            return samples
        iteration = int(keys[0][2])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed(self.seed, iteration))
            return list(self.batch_transform(samples, iteration))


def trivial_batch_collator(batch: List[Any]) -> List[Any]:
    """Batches stay lists of samples."""
    return batch


def _worker_init_fn(worker_id: int) -> None:
    # Give numpy / random (used by custom mappers) worker-specific seeds derived from torch's.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _as_dataset(dataset: Any) -> Any:
    if isinstance(dataset, (str, tuple)) or (isinstance(dataset, list) and dataset and isinstance(dataset[0], str)):
        raise TypeError(
            "build_detection_*_loader needs a dataset, not dataset names: use "
            "dataset=L(get_detection_dataset)(names=...) in the config"
        )
    if isinstance(dataset, list):
        return DatasetFromList(dataset)
    return dataset


def _aspect_groups(dataset: Any) -> Optional[np.ndarray]:
    """1 for landscape (w > h), 0 otherwise, from the records' original sizes; None if unknown."""
    flags = np.zeros(len(dataset), dtype=np.int64)
    for i in range(len(dataset)):
        rec = dataset[i]
        if not isinstance(rec, dict) or "height" not in rec or "width" not in rec:
            return None
        flags[i] = int(rec["width"] > rec["height"])
    return flags


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------
def build_detection_train_loader(
    dataset: Any,
    mapper: Optional[Callable[[Any], Any]],
    total_batch_size: int,
    num_workers: int = 0,
    seed: Optional[int] = None,
    aspect_ratio_grouping: bool = True,
    shuffle: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    pin_memory: bool = False,
    batch_transform: Optional[Callable[[List[Any], int], List[Any]]] = None,
) -> DataLoader:
    """Infinite training loader: each iteration yields this process's share of a global batch.

    Args:
        dataset: a map-style dataset of records (e.g. :func:`get_detection_dataset`) or a list.
        mapper: record -> sample (e.g. :class:`tprd.data.DetrDatasetMapper`); ``None`` keeps records.
        total_batch_size: images per iteration summed over all processes; must be divisible by
            the world size (each process gets ``total_batch_size // world_size``).
        num_workers: data-loader worker processes.
        seed: sampling and augmentation seed (shared by all processes; ``None`` = random).
        aspect_ratio_grouping: put only landscape or only portrait images (by original size) in
            a batch, which reduces padding.
        rank, world_size: override the ``torch.distributed`` values (tests, custom launchers).
        batch_transform: optional ``(samples, iteration) -> samples`` applied to each process's
            batch after the mapper (e.g. :class:`tprd.data.BatchMultiScaleResize`); it draws from
            torch's generator, seeded by ``(seed, iteration)`` so that every process draws the same.
    """
    rank, world_size = _dist_rank_world(rank, world_size)
    total_batch_size = int(total_batch_size)
    if total_batch_size <= 0 or total_batch_size % world_size != 0:
        raise ValueError(
            f"total_batch_size ({total_batch_size}) must be a positive multiple of the number of "
            f"processes ({world_size}); change dataloader.train.total_batch_size or the number of GPUs"
        )
    batch_size = total_batch_size // world_size
    dataset = _as_dataset(dataset)
    seed = _shared_seed(seed)
    sampler = TrainingSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    groups = _aspect_groups(dataset) if aspect_ratio_grouping else None
    if groups is not None:
        batch_sampler: Any = GroupedBatchSampler(sampler, groups, batch_size)
    else:
        batch_sampler = BatchSampler(sampler, batch_size, drop_last=True)
    generator = torch.Generator()
    generator.manual_seed(seed + 1000003 * (rank + 1))
    return DataLoader(
        _SeededMapDataset(dataset, mapper, batch_transform, seed),
        batch_sampler=_SeededBatches(batch_sampler, seed, rank),
        collate_fn=trivial_batch_collator,
        num_workers=int(num_workers),
        worker_init_fn=_worker_init_fn,
        generator=generator,
        pin_memory=pin_memory,
    )


def build_detection_test_loader(
    dataset: Any,
    mapper: Optional[Callable[[Any], Any]],
    batch_size: int = 1,
    num_workers: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Finite inference loader over this process's contiguous shard (:class:`InferenceSampler`).

    ``batch_size`` is per process; the last batch may be smaller.
    """
    if int(batch_size) <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dataset = _as_dataset(dataset)
    sampler = InferenceSampler(len(dataset), rank=rank, world_size=world_size)
    return DataLoader(
        MapDataset(dataset, mapper) if mapper is not None else dataset,
        batch_sampler=BatchSampler(sampler, int(batch_size), drop_last=False),
        collate_fn=trivial_batch_collator,
        num_workers=int(num_workers),
        worker_init_fn=_worker_init_fn,
        pin_memory=pin_memory,
    )
