"""Batching: which rows go together (samplers, the pack planner) and how they become tensors (collators).

The data module serves every split through these, and ``benchmarks/train_throughput.py`` times them against a plain
padded loop. Two layouts, both consumed by ``DRGClassifier``:

* **Padded, length-bucketed** (the default). Training rows are sorted by length inside shuffled mega-batches of
  ``mega_batches * batch_size`` rows, then the batch order is shuffled -- deterministic in (seed, epoch).
  Evaluation batches are globally sorted by length, longest first (an out-of-memory shows at the first step).
* **Packed** (opt-in, ``packing=True``). Whole notes share rows of ``pack_tokens`` tokens (first-fit-decreasing,
  :func:`pack_sequences`); the model isolates them with a block-diagonal mask (``drg_llama.models.packing``, which
  keeps only the packed forward: masks and pooling).

Both samplers subclass ``DistributedSampler`` so Lightning keeps them under DDP; they shard whole batches by rank and
skip the batches a resumed run already trained in its epoch. Every batch carries ``row`` (position in its split),
so predictions can be put back in the original order.

Padded batch (:class:`Collator`; ``B`` rows padded to the longest, rounded up to a multiple of ``PAD_MULTIPLE``
(``T``), on the tokenizer's padding side)::

    input_ids       [B, T] long   token ids, pad_token_id on padding
    attention_mask  [B, T] long   1 on real tokens
    labels          [B] long      class index in label_space.drgs, -1 if the DRG is not a class
    base_labels     [B] long      two_label: index in label_space.bases (-1 if not a class); single_label: -1
    severity_mask   [B, 3] bool   severities NONE/CC/MCC the DRG admits (292 -> CC only; 872 -> NONE, CC)
    row             [B] long      row position in the split (or in the texts given to texts_dataloader)
    hadm_id         [B] long      admission id (-1 for texts_dataloader ids that are not integers)

Packed batch (:class:`PackedCollator`; ``N`` notes in ``R`` rows of width ``T``)::

    input_ids      [R, T] long   token ids, pad_token_id on padding
    position_ids   [R, T] long   0.. within each note, 0 on padding (RoPE sees the same positions as alone)
    seq_ids        [R, T] long   note index 0..N-1, -1 on padding
    seq_lengths    [N] long      tokens per note
    labels, base_labels, severity_mask, row, hadm_id    per note, as in the padded batch
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

#: Sequence lengths and packed row widths are padded up to a multiple of this (tensor-core friendly shapes, fewer
#: recompiles).
PAD_MULTIPLE = 8


def padded_width(tokens: int, multiple: int = PAD_MULTIPLE) -> int:
    """``tokens`` rounded up to a multiple of ``multiple``: the width a batch is padded to."""
    return -(-tokens // multiple) * multiple


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------


class TokenizedSplit(Dataset):
    """Rows of one split: token ids (memory-mapped Arrow) plus label arrays computed from the label space.

    Args:
        input_ids: Indexable of token-id sequences (a ``datasets.Dataset`` column or a list).
        lengths: [N] token counts.
        labels: [N] class indices (-1 when not a class).
        base_labels: [N] base indices (-1 for single_label or not a class).
        severity_mask: [N, 3] allowed severities.
        hadm_id: [N] admission ids.
    """

    def __init__(self, input_ids, lengths, labels, base_labels, severity_mask, hadm_id):
        self.input_ids = input_ids
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.base_labels = np.asarray(base_labels, dtype=np.int64)
        self.severity_mask = np.asarray(severity_mask, dtype=bool)
        self.hadm_id = np.asarray(hadm_id, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids[i],
            "labels": self.labels[i],
            "base_labels": self.base_labels[i],
            "severity_mask": self.severity_mask[i],
            "row": i,
            "hadm_id": self.hadm_id[i],
        }


class PackedRows(Dataset):
    """View of a dataset indexed by a list of rows of indices (what ``PackedBatchSampler`` yields)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, rows: list[list[int]]) -> list[list[dict[str, Any]]]:
        return [[self.dataset[i] for i in row] for row in rows]


# ----------------------------------------------------------------------------------------------------------------
# Which rows go together
# ----------------------------------------------------------------------------------------------------------------


def pack_sequences(lengths: Sequence[int], pack_tokens: int) -> list[list[int]]:
    """First-fit-decreasing assignment of sequences to rows of at most ``pack_tokens`` tokens.

    Args:
        lengths: Token count of each sequence (each <= ``pack_tokens``).
        pack_tokens: Capacity of a row.

    Returns:
        Rows as lists of positions into ``lengths``; rows in creation order, each row's sequences longest first.
        Deterministic in ``lengths`` (ties keep their input order).

    Raises:
        ValueError: A sequence is longer than a row.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > pack_tokens:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit pack_tokens={pack_tokens}")
    order = np.argsort(-lengths, kind="stable")
    free = np.empty(0, dtype=np.int64)  # [rows] remaining capacity
    rows: list[list[int]] = []
    for i in order.tolist():
        fits = np.flatnonzero(free >= lengths[i])
        if len(fits):
            r = int(fits[0])
            free[r] -= lengths[i]
            rows[r].append(i)
        else:
            free = np.append(free, pack_tokens - lengths[i])
            rows.append([i])
    return rows


def _pad_across_ranks(training: bool, n_batches: int, world: int) -> bool:
    """Whether DDP ranks get equal batch counts by repeating batches.

    Training must: every rank takes part in each gradient all-reduce. Evaluation need not, and must not, or the
    repeated rows would be counted twice by the metrics synchronised across ranks (torchmetrics); only when there
    are fewer batches than ranks is it padded, so no rank sits out (a rank without batches would skip the epoch-end
    synchronisation the others wait in).
    """
    return training or n_batches < world


class LengthBucketSampler(DistributedSampler):
    """Index sampler whose consecutive ``batch_size`` chunks are batches of similar length.

    Training (``shuffle=True``): shuffle, cut into mega-batches of ``mega_batches * batch_size`` rows, sort each by
    length (longest first), cut into batches, shuffle the batch order; the one short batch, if any, stays last so the
    DataLoader's ``batch_size`` chunks line up with the batches. Evaluation (``shuffle=False``): sort the whole split
    by length, longest first. With ``bucket=False`` the rows are not sorted (random or sequential batches).

    Subclassing ``DistributedSampler`` makes Lightning leave it in place under DDP; it shards whole batches
    (rank ``r`` takes batches ``r, r + W, ...``). In training it pads with repeated rows so every rank gets the same
    number of full batches; in evaluation it does not (``_pad_across_ranks``), so every row is scored once.

    Args:
        lengths: [N] token counts.
        batch_size: Rows per batch.
        shuffle: Shuffle (training) or keep a fixed order (evaluation).
        bucket: Sort by length (within mega-batches when shuffling).
        mega_batches: Batches per mega-batch (training only).
        seed: Seed of the shuffle; the epoch (``set_epoch``) is mixed in.
        num_replicas: World size.
        rank: This process's rank.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool,
        bucket: bool = True,
        mega_batches: int = 50,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        # Explicit replicas/rank: the parent would otherwise need torch.distributed initialised.
        super().__init__(self.lengths, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.bucket = bucket
        self.mega_batches = max(1, mega_batches)
        self.resume_epoch, self.resume_batches = -1, 0

    def skip_on_resume(self, epoch: int, batches: int) -> None:
        """Leave out the first ``batches`` batches of ``epoch``: they were trained before the run was killed."""
        self.resume_epoch, self.resume_batches = epoch, batches

    def batches(self) -> list[np.ndarray]:
        """This rank's batches for the current epoch, as arrays of row indices."""
        n, size, world = len(self.lengths), self.batch_size, self.num_replicas
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.bucket and self.shuffle:
            mega = size * self.mega_batches
            chunks = [order[i : i + mega] for i in range(0, n, mega)]
            # Stable sort: equal lengths keep their shuffled order, so the result depends only on (seed, epoch).
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]) if n else order
        elif self.bucket:
            order = np.argsort(-self.lengths, kind="stable")
        batches = self._shuffle_order([order[i : i + size] for i in range(0, n, size)], rng)
        padded = world > 1 and batches and _pad_across_ranks(self.shuffle, len(batches), world)
        if padded and len(batches[-1]) < size:  # top up the short batch with rows from the start
            batches[-1] = np.concatenate([batches[-1], np.resize(order, size - len(batches[-1]))])
        return self._shard(batches)

    def _shuffle_order(self, batches: list, rng: np.random.Generator) -> list:
        """Training: the full batches in a shuffled order, the one short batch (if any) last; evaluation: as is."""
        if not self.shuffle or not batches:
            return batches
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        return [full[i] for i in rng.permutation(len(full))] + short

    def _shard(self, batches: list) -> list:
        """This rank's whole batches (``r, r + W, ...``); in training the list is first padded with repeats to a
        multiple of W (``_pad_across_ranks``)."""
        world = self.num_replicas
        if world == 1 or not batches:
            return batches
        if _pad_across_ranks(self.shuffle, len(batches), world):
            batches = batches + [batches[i % len(batches)] for i in range(-len(batches) % world)]
        return batches[self.rank :: world]

    def _not_yet_trained(self, batches: list) -> list:
        """``batches`` less those trained before a resume in this epoch (once)."""
        if self.epoch == self.resume_epoch:
            # The order depends only on (seed, epoch), so the resumed epoch continues exactly where it stopped.
            batches = batches[self.resume_batches :]
            self.resume_epoch = -1  # once: a later iteration of the same epoch number is a new pass
        return batches

    def __iter__(self):
        for batch in self._not_yet_trained(self.batches()):
            yield from batch.tolist()

    def __len__(self) -> int:
        n, world = len(self.lengths), self.num_replicas
        if world == 1:
            return n
        n_batches = -(-n // self.batch_size)
        if not _pad_across_ranks(self.shuffle, n_batches, world):
            return int(sum(len(b) for b in self.batches()))
        return -(-n_batches // world) * self.batch_size


class PackedBatchSampler(LengthBucketSampler):
    """Batch sampler for padding-free packing: each item it yields is one batch, a list of packed rows.

    Rows hold whole notes (first-fit-decreasing, ``pack_sequences``) up to ``pack_tokens`` tokens; a batch has at
    most ``rows_per_batch`` rows, so its tensors never exceed ``[rows_per_batch, pack_tokens]`` -- the same
    worst case as a padded batch of ``rows_per_batch`` notes of ``pack_tokens`` tokens. Training: shuffle, pack
    within mega-batches (about ``mega_batches`` batches' worth of notes), shuffle the batch order (a short batch
    stays last). Evaluation: sort by length, longest first, then pack. Deterministic in (seed, epoch); shards
    whole batches by rank like ``LengthBucketSampler`` (whose resume and DDP behaviour it keeps).

    Use it with ``DataLoader(PackedRows(dataset), batch_size=None, sampler=..., collate_fn=PackedCollator(...))``.
    The number of batches can differ by a few between epochs (the packing depends on the shuffle); ``len`` is the
    current epoch's.

    Args:
        lengths: [N] token counts (each <= pack_tokens).
        pack_tokens: Tokens per packed row.
        rows_per_batch: Packed rows per batch.
        shuffle: Shuffle (training) or a fixed longest-first order (evaluation).
        mega_batches: Batches per packing window (training).
        seed: Seed of the shuffle; the epoch is mixed in.
        num_replicas: World size.
        rank: This process's rank.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        pack_tokens: int,
        rows_per_batch: int,
        shuffle: bool,
        mega_batches: int = 50,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__(
            lengths, rows_per_batch, shuffle, True, mega_batches, seed=seed, num_replicas=num_replicas, rank=rank
        )
        if len(self.lengths) and int(self.lengths.max()) > pack_tokens:
            raise ValueError(f"pack_tokens={pack_tokens} is shorter than the longest note ({self.lengths.max()})")
        self.pack_tokens = pack_tokens
        self._cache: tuple[int, list[list[np.ndarray]]] | None = None

    def batches(self) -> list[list[np.ndarray]]:
        """This rank's batches for the current epoch: lists of rows, each an array of dataset indices."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        n, size = len(self.lengths), self.batch_size
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.argsort(-self.lengths, kind="stable")
        per_row = max(1, self.pack_tokens // max(1, int(self.lengths.mean()) if n else 1))
        window = size * per_row * (self.mega_batches if self.shuffle else 8)  # notes packed together
        rows: list[np.ndarray] = []
        for start in range(0, n, window):
            chunk = order[start : start + window]
            rows += [chunk[r] for r in pack_sequences(self.lengths[chunk], self.pack_tokens)]
        batches = self._shard(self._shuffle_order([rows[i : i + size] for i in range(0, len(rows), size)], rng))
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self):
        for batch in self._not_yet_trained(self.batches()):
            yield [row.tolist() for row in batch]

    def __len__(self) -> int:
        return len(self.batches())


# ----------------------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------------------


class ResumesMidEpoch:
    """Mixin of the data modules: where training stands within the epoch, saved in every checkpoint.

    Lightning calls ``state_dict`` when it saves a checkpoint and ``load_state_dict`` before it builds the train
    loader of a resumed run; the module's sampler then skips what was trained (``skip_on_resume``), so a run resumed
    mid-epoch sees each row once. Put it before ``LightningDataModule`` in the bases.
    """

    _resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: the epoch and the batches of it processed so far ({} outside a Trainer)."""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": int(self.trainer.current_epoch), "batches": int(progress.processed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Keep the position for the next train loader (nothing to skip at an epoch boundary)."""
        self._resume = state if state and state.get("batches") else None


class Collator:
    """Pads a list of rows into the batch dict (see the module docstring) on ``padding_side``.

    Args:
        pad_token_id: Id written on padding positions (masked out by ``attention_mask``).
        padding_side: ``left`` or ``right``.
        pad_multiple: Padded length is rounded up to a multiple of this.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_multiple: int = PAD_MULTIPLE):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_multiple = pad_multiple

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        width = padded_width(max(lengths), self.pad_multiple)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
        for i, (row, n) in enumerate(zip(rows, lengths)):
            span = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            input_ids[i, span] = torch.as_tensor(np.asarray(row["input_ids"], dtype=np.int64))
            attention_mask[i, span] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.tensor([int(r["labels"]) for r in rows], dtype=torch.long),  # [B]
            "base_labels": torch.tensor([int(r["base_labels"]) for r in rows], dtype=torch.long),  # [B]
            "severity_mask": torch.as_tensor(np.stack([r["severity_mask"] for r in rows]), dtype=torch.bool),
            "row": torch.tensor([int(r["row"]) for r in rows], dtype=torch.long),  # [B]
            "hadm_id": torch.tensor([int(r["hadm_id"]) for r in rows], dtype=torch.long),  # [B]
        }


class PackedCollator:
    """Turns rows of dataset items (a list of lists, from ``PackedBatchSampler``) into one packed batch.

    Args:
        pad_token_id: Id written on padding positions (never attended to by a real token).
        pad_multiple: Row width is rounded up to a multiple of this.
    """

    def __init__(self, pad_token_id: int, pad_multiple: int = PAD_MULTIPLE):
        self.pad_token_id = int(pad_token_id)
        self.pad_multiple = pad_multiple

    def __call__(self, rows: list[list[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        items = [item for row in rows for item in row]  # note order = row by row
        lengths = [len(item["input_ids"]) for item in items]
        width = padded_width(max(sum(len(item["input_ids"]) for item in row) for row in rows), self.pad_multiple)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # [R, T]
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # [R, T]
        seq_ids = torch.full((len(rows), width), -1, dtype=torch.long)  # [R, T]
        j = 0
        for r, row in enumerate(rows):
            start = 0
            for item in row:
                n = len(item["input_ids"])
                input_ids[r, start : start + n] = torch.as_tensor(np.asarray(item["input_ids"], dtype=np.int64))
                position_ids[r, start : start + n] = torch.arange(n)
                seq_ids[r, start : start + n] = j
                start += n
                j += 1
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "seq_ids": seq_ids,
            "seq_lengths": torch.tensor(lengths, dtype=torch.long),  # [N]
            "labels": torch.tensor([int(x["labels"]) for x in items], dtype=torch.long),  # [N]
            "base_labels": torch.tensor([int(x["base_labels"]) for x in items], dtype=torch.long),  # [N]
            "severity_mask": torch.as_tensor(np.stack([x["severity_mask"] for x in items]), dtype=torch.bool),
            "row": torch.tensor([int(x["row"]) for x in items], dtype=torch.long),  # [N]
            "hadm_id": torch.tensor([int(x["hadm_id"]) for x in items], dtype=torch.long),  # [N]
        }


# ----------------------------------------------------------------------------------------------------------------
# What a batching costs (real tokens / computed tokens: ``DRGDataModule.padding_efficiency``)
# ----------------------------------------------------------------------------------------------------------------


def padded_tokens(lengths: np.ndarray, batches: Sequence[np.ndarray], pad_multiple: int = PAD_MULTIPLE) -> int:
    """Token positions the model computes on for ``batches``: sum of batch size x padded length."""
    return int(sum(len(b) * padded_width(int(lengths[b].max()), pad_multiple) for b in batches if len(b)))


def packed_tokens(lengths: np.ndarray, batches: Sequence[Sequence[Sequence[int]]]) -> int:
    """Token positions computed for packed ``batches`` (lists of rows of row indices): sum of R x padded T."""
    total = 0
    for rows in batches:
        if rows:
            total += len(rows) * padded_width(max(int(lengths[list(r)].sum()) for r in rows))
    return total
