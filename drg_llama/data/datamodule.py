"""``DRGDataModule``: prepared splits -> tokenised once (cached) -> length-bucketed batches for the classifier.

The data module reads a prepared folder (``python -m drg_llama.data prepare``: ``train/val/test.parquet`` and
``manifest.json``) or, with ``data_dir=None``, builds the embedded default: a synthetic corpus of ``synthetic_n``
admissions, synthesised and prepared once into the cache (``$DRG_LLAMA_CACHE`` or ``~/.cache/drg_llama``).

    from drg_llama.data.datamodule import DRGDataModule

    dm = DRGDataModule(data_dir="data/prepared", variant="two_label", tokenizer="smollm2_135m", max_length=512)
    dm.label_space                  # available right after __init__ (no tokenisation), for LightningCLI linking
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    dm.padding_efficiency("train")  # {"bucketed": 0.97, "random": 0.62, ...}

With LightningCLI the label space goes to the model with
``parser.link_arguments("data.label_space", "model.label_space", apply_on="instantiate")``.

Choices, and why:

* **Label space without tokenising.** ``label_space`` is a lazy property: the first access resolves the data folder
  (building the embedded default if needed), checks every file against the manifest (size, rows, SHA-256: a folder
  that was modified or half-copied is refused) and the manifest's DRG version, and reads only the ``drg_code``
  column of the training rows. Classes are the DRGs of the rows trained on (after ``limit_train``).
* **A trained run's classes.** ``evaluate`` and ``predict`` hand the run's own label space in (``use_label_space``)
  instead of deriving one from ``train.parquet``: a run scores any prepared folder without its training data.
* **Unseen DRGs are kept.** Val/test admissions whose DRG is not a class (not seen in training) keep label -1, so they
  count as errors; the count is logged once per split. Dropping them would inflate accuracy.
* **Tokenise once.** Each split is tokenised with ``datasets`` ``map(batched=True)`` into an Arrow file keyed by
  the tokenizer's content hash, ``max_length``, ``truncation``, the row limit and the Parquet file's size and
  mtime; later runs memory-map that file and never call the tokenizer. The ``text`` column is dropped there, so
  text never reaches a batch, a log line or a progress bar (they show counts only). Files live in
  ``DATA_DIR/tokenized/``, or under the cache when the data folder is read-only.
* **Truncation** happens on token ids, inside the tokenizer's special tokens (``drg_llama.data.tokenization``).
* **Batches** are length-bucketed and padded, or, with ``packing=True`` (opt-in), whole notes packed into rows of
  ``pack_tokens`` tokens; ``DRGClassifier`` pools each note from the packed states, giving the same logits as padded
  batches. ``drg_llama.data.batching`` holds the samplers, the collators and the batch keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from drg_llama.data.batching import (
    Collator,
    LengthBucketSampler,
    PackedBatchSampler,
    PackedCollator,
    PackedRows,
    ResumesMidEpoch,
    TokenizedSplit,
    packed_tokens,
    padded_tokens,
)
from drg_llama.data.prepared import PreparedFolder, verify
from drg_llama.data.splits import SPLITS
from drg_llama.data.tokenization import (
    TRUNCATIONS,
    encode_texts,
    special_tokens,
    tokenizer_fingerprint,
)
from drg_llama.drg import SEVERITIES, LabelSpace, resolve_version
from drg_llama.errors import UserError
from drg_llama.pretrained import SMOLLM2_NAME, default_cache_dir, load_tokenizer

logger = logging.getLogger(__name__)

#: Columns of ``split_frame``: everything an evaluation writer needs, never the text.
FRAME_COLUMNS = ("hadm_id", "subject_id", "drg_code", "base_drg", "mdc", "n_words")
# Bump when the tokenised file layout or the truncation rule changes, so stale caches are not reused.
_TOKENIZED_FORMAT = 1


class _HFColumn:
    """``ds[i]["input_ids"]`` of a ``datasets.Dataset`` without materialising the whole column."""

    def __init__(self, dataset):
        self.dataset = dataset.with_format("numpy", columns=["input_ids"])

    def __getitem__(self, i: int) -> np.ndarray:
        return self.dataset[int(i)]["input_ids"]

    def __len__(self) -> int:
        return len(self.dataset)


# ----------------------------------------------------------------------------------------------------------------
# Embedded default corpus
# ----------------------------------------------------------------------------------------------------------------


def embedded_default_dir(n: int, seed: int, drg_version: str, cache_dir: str | Path | None = None) -> Path:
    """Prepared folder of the embedded synthetic corpus for (n, seed, version), built on first use.

    The corpus is synthesised into ``CACHE/synthetic/{version}-n{n}-seed{seed}/raw`` and prepared into
    ``.../prepared``. Building happens in a private temporary folder that is renamed into place, so concurrent
    processes (DDP ranks) never read a half-written folder; the first rename wins.
    """
    version = resolve_version(drg_version)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    final = root / "synthetic" / f"{version}-n{n}-seed{seed}"
    prepared = final / "prepared"
    if _manifest_ok(prepared, version):
        return prepared
    from drg_llama.data.mimic import prepare
    from drg_llama.data.synthetic import synthesize

    logger.info("Building the embedded synthetic corpus (%d admissions, seed %d, %s) in %s", n, seed, version, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        synthesize(tmp / "raw", n, seed, version, progress=False)
        prepare(tmp / "raw", tmp / "prepared", drg_version=version, seed=seed, progress=False)
        if final.exists() and not _manifest_ok(prepared, version):
            shutil.rmtree(final)  # an interrupted or stale build
        try:
            tmp.rename(final)
        except OSError:
            if not _manifest_ok(prepared, version):  # someone else won the race only if their folder is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return prepared


def _manifest_ok(folder: Path, version: str) -> bool:
    try:
        manifest = verify(folder)
    except (OSError, ValueError):  # absent, or not what its manifest says: rebuild it
        return False
    return manifest.get("drg_version") == version


# ----------------------------------------------------------------------------------------------------------------
# The data module
# ----------------------------------------------------------------------------------------------------------------


class DRGDataModule(ResumesMidEpoch, LightningDataModule):
    """Prepared MS-DRG splits, tokenised once and batched by length, plus the label space for the model.

    Args:
        data_dir: Prepared folder (train/val/test.parquet + manifest.json); None builds the embedded synthetic
            default into the cache ($DRG_LLAMA_CACHE or ~/.cache/drg_llama) once and reuses it.
        variant: Label space: "single_label" (one output per DRG) or "two_label" (base DRG + NONE/CC/MCC).
        drg_version: MS-DRG version of the classes; must match the prepared folder's manifest.
        tokenizer: Tokenizer source as the backbone loader reads it: "smollm2_135m", a local HF folder, a .gguf
            file, a hub id, or "byte"; None to wait for set_tokenizer (the model injects its own).
        max_length: Tokens per note, special tokens included.
        truncation: Which tokens of a longer note to keep: "head", "tail" or "head_tail" (first and last halves).
        batch_size: Training rows per batch.
        eval_batch_size: Validation/test/predict rows per batch; default batch_size.
        num_workers: DataLoader worker processes.
        bucket_by_length: Sort training rows by length within shuffled mega-batches (and eval rows globally) to cut
            padding; False gives plain random (train) or sequential (eval) batches.
        bucket_mega_batches: Training batches per mega-batch that is sorted by length.
        padding_side: "left" or "right"; None follows the tokenizer.
        limit_train: Use only the first N training rows (demos, tests); None for all.
        limit_val: Use only the first N validation rows; None for all.
        limit_test: Use only the first N test rows; None for all.
        seed: Seed of the batch shuffle (mixed with the epoch) and of the embedded synthetic corpus.
        synthetic_n: Admissions in the embedded synthetic corpus (only when data_dir is None).
        cache_dir: Cache root for the embedded corpus and for tokenised files of read-only data folders; default
            $DRG_LLAMA_CACHE or ~/.cache/drg_llama.
        packing: Padding-free packing for train/val/test batches (``drg_llama.models.packing``): whole notes share
            rows of ``pack_tokens`` tokens with a block-diagonal attention mask; a batch has at most ``batch_size``
            (eval: ``eval_batch_size``) rows, so it holds more notes than a padded batch. Predict batches stay padded.
        pack_tokens: Tokens per packed row; default max_length (then a packed batch is never larger than the largest
            padded one). Must be >= max_length.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        variant: Literal["single_label", "two_label"] = "two_label",
        drg_version: str = "v43",
        tokenizer: str | None = SMOLLM2_NAME,
        max_length: int = 512,
        truncation: Literal["head", "tail", "head_tail"] = "head",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        bucket_by_length: bool = True,
        bucket_mega_batches: int = 50,
        padding_side: Literal["left", "right"] | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        seed: int = 0,
        synthetic_n: int = 5000,
        cache_dir: str | None = None,
        packing: bool = False,
        pack_tokens: int | None = None,
    ):
        super().__init__()
        if pack_tokens is not None and pack_tokens < max_length:
            raise UserError(f"pack_tokens ({pack_tokens}) must be >= max_length ({max_length}): every note must fit")
        if variant not in ("single_label", "two_label"):
            raise UserError(f"variant must be 'single_label' or 'two_label', got {variant!r}")
        if truncation not in TRUNCATIONS:
            raise UserError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        if padding_side not in (None, "left", "right"):
            raise UserError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
        if max_length < 2:
            raise UserError(f"max_length must be >= 2, got {max_length}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise UserError("batch_size and eval_batch_size must be >= 1")
        for name, limit in (("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)):
            if limit is not None and limit < 1:
                raise UserError(f"{name} must be >= 1 or None, got {limit}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.variant = variant
        self.drg_version = resolve_version(drg_version)
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.bucket_by_length = bucket_by_length
        self.bucket_mega_batches = bucket_mega_batches
        self.padding_side = padding_side
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.seed = seed
        self.synthetic_n = synthetic_n
        self.cache_dir = cache_dir
        self.packing = packing
        self.pack_tokens = pack_tokens or max_length

        self._folder: PreparedFolder | None = None
        self._label_space: LabelSpace | None = None
        self._tokenizer = None
        self._tokenizer_fp: str | None = None
        self._datasets: dict[str, TokenizedSplit] = {}
        self._predict: tuple[list[str], list[Any]] | None = None
        #: Rows per split whose DRG is not a class of the label space (kept with label -1).
        self.unseen_counts: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------------------------
    # data folder and label space

    @property
    def prepared_folder(self) -> PreparedFolder:
        """The prepared folder, opened after checking its manifest (builds the embedded default on first access)."""
        if self._folder is None:
            if self.data_dir is None:
                path = embedded_default_dir(self.synthetic_n, self.seed, self.drg_version, self.cache_dir)
            else:
                path = Path(self.data_dir).expanduser()
            hint = ", or leave data_dir unset for the embedded synthetic corpus"
            self._folder = PreparedFolder.open(path, drg_version=self.drg_version, hint=hint)
        return self._folder

    @property
    def prepared_dir(self) -> Path:
        """The path of :attr:`prepared_folder` (checked against its manifest on first access)."""
        return self.prepared_folder.path

    @property
    def label_space(self) -> LabelSpace:
        """Classes of this run: the DRGs of the training rows (two_label: their whole families). No tokenising.

        A training set needs two DRGs at least: with one, every prediction is right by construction.
        """
        if self._label_space is None:
            codes = self._read_columns("train", ["drg_code"])["drg_code"]
            path = self.prepared_folder.split_path("train")
            if not len(codes):
                raise UserError(f"{path} has no rows; nothing to train on (prepare more admissions).")
            if codes.nunique() < 2:
                raise UserError(
                    f"{path} has a single DRG ({int(codes.iloc[0])}) in the rows trained on; a classifier needs two "
                    "at least (raise data.limit_train or prepare more admissions)."
                )
            self._label_space = LabelSpace.build(self.drg_version, self.variant, codes.unique().tolist())
        return self._label_space

    def use_label_space(self, space: LabelSpace) -> None:
        """Use a trained run's classes instead of deriving them from ``train.parquet`` (evaluation, prediction).

        DRGs of the scored rows outside ``space`` keep label -1 and count as errors.
        """
        if resolve_version(space.version) != self.drg_version:
            raise UserError(f"the label space is {space.version} but drg_version is {self.drg_version}")
        self._label_space = space

    def _read_columns(self, split: str, columns: list[str]) -> pd.DataFrame:
        """The first ``limit`` rows of a split, given columns only (never loads the text unless asked)."""
        return self.prepared_folder.read(split, columns, self.limits[split])

    def split_frame(self, split: str) -> pd.DataFrame:
        """Admission facts of a split for evaluation writers, in row order (index = ``row``); no text.

        Columns: hadm_id, subject_id, drg_code, base_drg, mdc, n_words.
        """
        frame = self._read_columns(split, list(FRAME_COLUMNS))
        frame.index.name = "row"
        return frame

    # ------------------------------------------------------------------------------------------------------------
    # tokenizer

    @property
    def tokenizer(self):
        """The tokenizer: injected by ``set_tokenizer``, else loaded from ``tokenizer`` by the backbone loader."""
        if self._tokenizer is None:
            if self.tokenizer_name is None:
                raise RuntimeError(
                    "DRGDataModule has no tokenizer: set data.tokenizer (e.g. smollm2_135m or a folder) or call "
                    "set_tokenizer(tokenizer) before requesting batches."
                )
            self.set_tokenizer(load_tokenizer(self.tokenizer_name, padding_side=self.padding_side or "right"))
        return self._tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        """Use ``tokenizer`` (the model's own) from now on; datasets tokenised with a different one are rebuilt."""
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; load it with drg_llama.pretrained.load_tokenizer")
        fingerprint = tokenizer_fingerprint(tokenizer)
        if self._tokenizer_fp is not None and fingerprint != self._tokenizer_fp:
            logger.warning("set_tokenizer: a different tokenizer than before; tokenised datasets will be rebuilt.")
            self._datasets.clear()
        self._tokenizer = tokenizer
        self._tokenizer_fp = fingerprint

    def visible_text(self, texts: Sequence[str]) -> list[str]:
        """What the model reads of each note: its tokens cut to ``max_length`` as training cuts them, decoded.

        The TF-IDF baseline scores these, so a context-length comparison gives both systems the same words.
        """
        ids = encode_texts(self.tokenizer, texts, self.max_length, self.truncation)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    @property
    def resolved_padding_side(self) -> str:
        """``padding_side`` if given, else the tokenizer's."""
        return self.padding_side or getattr(self.tokenizer, "padding_side", "right") or "right"

    def collator(self) -> Collator:
        """The batch collator for the current tokenizer."""
        return Collator(self.tokenizer.pad_token_id, self.resolved_padding_side)

    # ------------------------------------------------------------------------------------------------------------
    # tokenised, cached splits

    def tokenized_path(self, split: str) -> Path:
        """Arrow file that holds (or will hold) the tokenised split for the current tokenizer and settings."""
        stat = self.prepared_folder.split_path(split).stat()
        _ = self.tokenizer  # loading the tokenizer sets _tokenizer_fp
        key_parts = [
            _TOKENIZED_FORMAT,
            self._tokenizer_fp,
            self.max_length,
            self.truncation,
            self.limits[split],
            split,
            stat.st_size,
            stat.st_mtime_ns,
        ]
        key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
        return self._tokenized_root() / f"{split}-{self.max_length}-{self.truncation}-{key}.arrow"

    def _tokenized_root(self) -> Path:
        local = self.prepared_dir / "tokenized"
        try:
            local.mkdir(exist_ok=True)
            if os.access(local, os.W_OK):
                return local
        except OSError:
            pass
        # Read-only data folder (a shared MIMIC copy): key the cache folder by the data folder's path.
        tag = hashlib.sha256(str(self.prepared_dir.resolve()).encode()).hexdigest()[:12]
        root = (Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()) / "tokenized" / tag
        root.mkdir(parents=True, exist_ok=True)
        return root

    def tokenize_split(self, split: str):
        """The tokenised split as a ``datasets.Dataset`` (columns hadm_id, input_ids, length), built once.

        The first call per (tokenizer, max_length, truncation, limit, data file) tokenises with ``map`` into the
        Arrow cache file; every later call (any process, any run) memory-maps it without calling the tokenizer.
        """
        import datasets

        features = datasets.Features(
            {
                "hadm_id": datasets.Value("int64"),
                "input_ids": datasets.List(datasets.Value("int32")),
                "length": datasets.Value("int32"),
            }
        )
        if not self.prepared_folder.num_rows(split):
            # An empty split (drg_llama_2023 has no validation rows): datasets cannot read an empty Parquet file.
            return datasets.Dataset.from_dict({"hadm_id": [], "input_ids": [], "length": []}, features=features)
        path = self.tokenized_path(split)
        if path.is_file():
            return datasets.Dataset.from_file(str(path))
        tokenizer, max_length, truncation = self.tokenizer, self.max_length, self.truncation

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            ids = encode_texts(tokenizer, batch["text"], max_length, truncation)
            return {"input_ids": ids, "length": [len(x) for x in ids]}

        # from_parquet copies the split into an Arrow file; that copy (with the text) lives in a temporary folder
        # and is deleted, only the tokenised file (no text) is kept.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".hf-") as tmp:
            raw = datasets.Dataset.from_parquet(
                str(self.prepared_folder.split_path(split)), columns=["hadm_id", "text"], cache_dir=tmp
            )
            if self.limits[split] is not None:
                raw = raw.select(range(min(self.limits[split], len(raw))))
            raw.map(
                tokenize,
                batched=True,
                batch_size=1000,
                remove_columns=["text"],
                features=features,
                cache_file_name=str(path),
                new_fingerprint=path.stem,  # the key is in the name; avoids hashing the closure (and tokenizer)
                desc=f"Tokenising {split}",  # counts only: text never reaches a progress bar
            )
        return datasets.Dataset.from_file(str(path))

    def _label_arrays(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """labels [N], base_labels [N], severity_mask [N, 3] for the DRGs in ``frame.drg_code``."""
        space = self.label_space
        per_code: dict[int, tuple[int, int, tuple[bool, ...]]] = {}
        for code in frame["drg_code"].unique().tolist():
            if code in space:
                index, base, mask = space.encode(code)
            else:  # unseen in training: an error at evaluation, but its allowed severities are still known
                allowed = space.facts([code]).severities[0]
                index, base, mask = -1, -1, tuple(s.value in allowed for s in SEVERITIES)
            per_code[int(code)] = (index, base if self.variant == "two_label" else -1, mask)
        codes = frame["drg_code"].astype(np.int64).tolist()
        labels = np.array([per_code[c][0] for c in codes], dtype=np.int64)
        base_labels = np.array([per_code[c][1] for c in codes], dtype=np.int64)
        mask = np.array([per_code[c][2] for c in codes], dtype=bool).reshape(len(codes), len(SEVERITIES))
        return labels, base_labels, mask

    def dataset(self, split: str) -> TokenizedSplit:
        """The split as a torch Dataset of tokenised rows with labels (built on first use, then kept)."""
        if split not in self._datasets:
            frame = self._read_columns(split, ["hadm_id", "drg_code"])
            labels, base_labels, mask = self._label_arrays(frame)
            unseen = int((labels < 0).sum())
            self.unseen_counts[split] = unseen
            if unseen:
                logger.warning(
                    "%s: %d of %d admissions have a DRG that is not a class of the label space (unseen in "
                    "training); they are kept with label -1 and count as errors.",
                    split,
                    unseen,
                    len(frame),
                )
            tokenized = self.tokenize_split(split)
            if not np.array_equal(np.asarray(tokenized["hadm_id"]), frame["hadm_id"].to_numpy()):
                raise RuntimeError(f"tokenised cache {self.tokenized_path(split)} is out of step; delete it")
            self._datasets[split] = TokenizedSplit(
                _HFColumn(tokenized), tokenized["length"], labels, base_labels, mask, frame["hadm_id"].to_numpy()
            )
        return self._datasets[split]

    # ------------------------------------------------------------------------------------------------------------
    # Lightning hooks

    def prepare_data(self) -> None:
        """Build the data folder and tokenised caches once (Lightning calls this on one process per node)."""
        _ = self.prepared_dir  # builds the embedded default if needed
        if self._tokenizer is None and self.tokenizer_name is None:
            return  # the model injects the tokenizer later; each process tokenises (same file, atomic rename)
        for split in SPLITS:
            self.tokenize_split(split)

    def setup(self, stage: str | None = None) -> None:
        """Check the folder and build the label space; tokenised datasets load lazily with the first batch."""
        _ = self.label_space

    def _loader(self, split: str, train: bool, packing: bool | None = None) -> DataLoader:
        data = self.dataset(split)
        world, rank = 1, 0
        if self.trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
        size = self.batch_size if train else self.eval_batch_size
        if self.packing if packing is None else packing:
            packed = PackedBatchSampler(
                data.lengths,
                self.pack_tokens,
                size,
                shuffle=train,
                mega_batches=self.bucket_mega_batches,
                seed=self.seed,
                num_replicas=world,
                rank=rank,
            )
            # batch_size=None: the sampler yields whole batches (lists of rows) and the collator packs them.
            return DataLoader(
                PackedRows(data),
                batch_size=None,
                sampler=packed,
                collate_fn=PackedCollator(self.tokenizer.pad_token_id),
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
        sampler = LengthBucketSampler(
            data.lengths,
            size,
            shuffle=train,
            bucket=self.bucket_by_length,
            mega_batches=self.bucket_mega_batches,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
        )
        return DataLoader(
            data,
            batch_size=size,
            sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, length-bucketed training batches (call ``sampler.set_epoch`` per epoch; Lightning does)."""
        loader = self._loader("train", train=True)
        if self._resume is not None:
            loader.sampler.skip_on_resume(self._resume["epoch"], self._resume["batches"])
        return loader

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches sorted by length; an empty list when the split has no rows (drg_llama_2023)."""
        if not len(self.split_frame("val")):
            logger.info("val.parquet has no rows (e.g. the drg_llama_2023 split): validation is skipped.")
            return []
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches sorted by length."""
        return self._loader("test", train=False)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Batches of any split in evaluation order (sorted by length, nothing shuffled or skipped)."""
        return self._loader(split, train=False)

    def set_predict_texts(self, texts: list[str], ids: list | None = None) -> None:
        """Make ``predict_dataloader`` serve these texts instead of the test split."""
        self._predict = (list(texts), list(ids) if ids is not None else list(range(len(texts))))

    def predict_dataloader(self) -> DataLoader:
        """Batches of the texts given to ``set_predict_texts``, else of the test split."""
        if self._predict is not None:
            return self.texts_dataloader(*self._predict)
        # Padded even with packing: Lightning's prediction loop tracks indices through a plain batch sampler.
        return self._loader("test", train=False, packing=False)

    def texts_dataloader(self, texts: list[str], ids: list | None = None) -> DataLoader:
        """Batches of arbitrary texts, tokenised and truncated like the splits (in memory, not cached).

        Batches have the usual keys; ``labels``/``base_labels`` are -1, ``severity_mask`` all True, ``row`` the
        position in ``texts`` and ``hadm_id`` the id when ``ids`` are integers (else -1: map back through ``row``).

        Raises:
            ValueError: ids and texts differ in length, or a text has no tokens (named by position).
        """
        ids = list(range(len(texts))) if ids is None else list(ids)
        if len(ids) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(ids)} ids")
        encoded = encode_texts(self.tokenizer, texts, self.max_length, self.truncation)
        prefix, suffix = special_tokens(self.tokenizer)
        empty = [i for i, x in enumerate(encoded) if len(x) == len(prefix) + len(suffix)]
        if empty:
            raise ValueError(f"texts at positions {empty[:10]} have no tokens; remove or fill them")
        numeric = [int(x) if isinstance(x, (int, np.integer)) else -1 for x in ids]
        n = len(texts)
        data = TokenizedSplit(
            encoded,
            [len(x) for x in encoded],
            np.full(n, -1),
            np.full(n, -1),
            np.ones((n, len(SEVERITIES)), dtype=bool),
            numeric,
        )
        sampler = LengthBucketSampler(data.lengths, self.eval_batch_size, shuffle=False, bucket=self.bucket_by_length)
        return DataLoader(data, batch_size=self.eval_batch_size, sampler=sampler, collate_fn=self.collator())

    # ------------------------------------------------------------------------------------------------------------
    # diagnostics

    def padding_efficiency(self, split: str = "train", batch_size: int | None = None, epoch: int = 0) -> dict:
        """Real tokens / computed (padded) tokens of one epoch's batches, bucketed vs random, for a split.

        Args:
            split: Which split's token lengths to use.
            batch_size: Rows per batch; default the training batch size.
            epoch: Epoch whose shuffle is measured.

        Returns:
            ``{"bucketed": e, "random": e, "sorted": e, "packed": e, "batch_size": B, "rows": N, "real_tokens": n}``,
            where ``bucketed`` is the training sampler (mega-batch sorting), ``random`` the same shuffle without
            sorting, ``sorted`` the evaluation order and ``packed`` the packing sampler (rows of ``pack_tokens``,
            ``B`` rows per batch), whether or not ``packing`` is on.
        """
        lengths = self.dataset(split).lengths
        size = batch_size or self.batch_size
        real = int(lengths.sum())
        result: dict[str, Any] = {"batch_size": size, "rows": len(lengths), "real_tokens": real}
        for name, shuffle, bucket in (("bucketed", True, True), ("random", True, False), ("sorted", False, True)):
            sampler = LengthBucketSampler(
                lengths, size, shuffle=shuffle, bucket=bucket, mega_batches=self.bucket_mega_batches, seed=self.seed
            )
            sampler.set_epoch(epoch)
            result[name] = real / max(1, padded_tokens(lengths, sampler.batches()))
        packer = PackedBatchSampler(
            lengths, self.pack_tokens, size, shuffle=True, mega_batches=self.bucket_mega_batches, seed=self.seed
        )
        packer.set_epoch(epoch)
        result["packed"] = real / max(1, packed_tokens(lengths, packer.batches()))
        return result
