"""``ReasonerDataModule``: prompts, SFT targets and batches of prepared splits for the generative reasoner.

    from drg_llama.data.reasoner import ReasonerDataModule

    dm = ReasonerDataModule(data_dir="data/prepared", max_note_tokens=1024, rationale="grounded")
    dm.label_space                     # one class per training DRG, right after __init__ (LightningCLI linking)
    dm.set_tokenizer(model.tokenizer)  # the model's own: chat template, eos and pad
    batch = next(iter(dm.train_dataloader()))

The prepared folder (or the embedded synthetic default), its checks against the manifest, the row limits and the
label space come from a ``DRGDataModule`` held here (single-label: the reasoner answers DRGs, one class each); it is
never asked to tokenise. The note text is read, turned into token ids and dropped: it never reaches a batch or a log.

**Prompt.** The tokenizer's chat template renders the system instruction (``drg.answers.INSTRUCTION``: what MS-DRG,
CC and MCC mean, and the answer format) and the hospital course. The note alone is truncated to ``max_note_tokens``
(head, tail or head and tail); the instruction never is. The template is rendered once around a placeholder and the
note's ids are spliced in, so truncation happens on token ids. A tokenizer without a chat template (the byte
tokenizer of tests) uses ``PLAIN_TEMPLATE``.

**Targets** (train and val rows; GRPO reads the val targets only, for ``val/loss``): ``<think>rationale</think>
<answer>DRG NNN: TITLE</answer>`` + eos, with grounded rationales written from the admission's codes and the
grouper's output (``drg_llama.data.rationales``), or an empty think block with ``rationale="answer_only"`` or where an
admission has no usable codes (counted in ``rationale_counts``).

Batch (what ``DRGReasoner`` consumes), ``B`` rows:

    prompt_ids        [B, P] long   prompts, left-padded so that every prompt ends where generation starts
    prompt_mask       [B, P] long   1 on prompt tokens
    drg_code          [B] long      gold DRG
    row               [B] long      row position in the split (or in the texts given to texts_dataloader)
  with targets:
    input_ids         [B, T] long   prompt + target, left-padded
    attention_mask    [B, T] long
    labels            [B, T] long   target ids, -100 on prompt and padding
    completion_width  [] long       the longest target: the loss needs logits for the last width + 1 positions only
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from drg_llama.data.batching import ResumesMidEpoch
from drg_llama.data.datamodule import DRGDataModule
from drg_llama.data.tokenization import TRUNCATIONS, truncate_ids
from drg_llama.drg import LabelSpace
from drg_llama.drg.answers import instruction_for, target_text
from drg_llama.errors import UserError

logger = logging.getLogger(__name__)

RATIONALES = ("grounded", "answer_only")
#: Columns read from a prepared split; the text is dropped once its tokens are in the prompts.
_COLUMNS = ["hadm_id", "drg_code", "text"]


# ----------------------------------------------------------------------------------------------------------------
# Prompts and batches (pure functions, tested on literal ids)


#: Prompt layout for tokenizers without a chat template (the byte tokenizer of tests).
PLAIN_TEMPLATE = "### Instruction\n{instruction}\n\n### Hospital course\n{note}\n\n### Response\n"
_NOTE = "\x00NOTE\x00"  # placeholder the template is rendered around; never appears in a note


def prompt_parts(tokenizer, instruction: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the note: the rendered chat template (or ``PLAIN_TEMPLATE``) split at the note.

    Args:
        tokenizer: Any HF tokenizer; its ``chat_template`` is used when set.
        instruction: The system instruction (kept whole).

    Returns:
        ``(prefix_ids, suffix_ids)``; a prompt is ``prefix + note_ids + suffix`` and ends where the answer starts.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": instruction},
            {"role": "user", "content": f"Hospital course:\n{_NOTE}"},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos: list[int] = []  # the template writes its own special tokens
    else:
        text = PLAIN_TEMPLATE.format(instruction=instruction, note=_NOTE)
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    before, after = text.split(_NOTE)
    encode = tokenizer(add_special_tokens=False, text=[before, after])["input_ids"]
    return bos + list(encode[0]), list(encode[1])


def build_prompts(
    tokenizer, texts: Sequence[str], parts: tuple[list[int], list[int]], max_note_tokens: int, truncation: str
) -> list[list[int]]:
    """Prompt ids per note: the note's ids truncated to ``max_note_tokens`` between the template parts."""
    notes = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [parts[0] + truncate_ids(ids, max_note_tokens, truncation) + parts[1] for ids in notes]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, P]`` ids and mask, left-padded so every prompt ends at the last column (where generation starts)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def sft_batch(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt + completion, labels -100 everywhere but the completion tokens.

    Left padding puts every completion at the right edge, so the loss needs logits for the last
    ``max completion length + 1`` positions only (``logits_to_keep``), not for the whole prompt: with a 49k
    vocabulary the full-sequence logits would dominate the step's memory and time.
    """
    seqs = [list(r["prompt"]) + list(r["completion"]) for r in rows]
    ids, mask = left_pad(seqs, pad_id)  # [B, T]
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n = len(r["completion"])
        labels[i, ids.shape[1] - n :] = torch.as_tensor(list(r["completion"]))
    width = max(len(r["completion"]) for r in rows)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "completion_width": torch.tensor(width)}


def collate(rows: list[dict], pad_id: int) -> dict[str, Any]:
    """Batch of examples: left-padded prompts (generation), the SFT tensors, and the label columns."""
    prompt_ids, prompt_mask = left_pad([r["prompt"] for r in rows], pad_id)
    batch: dict[str, Any] = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "drg_code": torch.tensor([r["drg_code"] for r in rows], dtype=torch.long),
        "row": torch.tensor([r["row"] for r in rows], dtype=torch.long),
    }
    if all(r.get("completion") is not None for r in rows):
        batch.update(sft_batch(rows, pad_id))
    return batch


class EpochShuffle(Sampler[int]):
    """Training rows in a shuffled order per epoch, deterministic in (seed, epoch), able to resume mid-epoch.

    Lightning restarts an interrupted epoch from its first batch unless the sampler can skip what was trained; this
    one can (``skip_on_resume``). Lightning calls ``set_epoch``. The first epoch is the order of
    ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` (tested).
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.resume_epoch, self.resume_rows = 0, -1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_on_resume(self, epoch: int, rows: int) -> None:
        """Leave out the first ``rows`` rows of ``epoch``: they were trained before the run was stopped."""
        self.resume_epoch, self.resume_rows = epoch, rows

    def order(self) -> list[int]:
        """Row indices of the current epoch."""
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch + 1):
            # What DataLoader(shuffle=True, generator=...) draws: its workers' base seed, then the permutation.
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.num_rows, generator=generator)
        return order.tolist()

    def __iter__(self):
        order = self.order()
        if self.epoch == self.resume_epoch:
            order = order[self.resume_rows :]
            self.resume_epoch = -1  # once: a later pass over the same epoch number is a new pass
        return iter(order)

    def __len__(self) -> int:
        return self.num_rows


# ----------------------------------------------------------------------------------------------------------------
# The data module


class ReasonerDataModule(ResumesMidEpoch, LightningDataModule):
    """Prepared MS-DRG splits as prompts (and SFT targets) for the generative reasoner, plus its label space.

    Args:
        data_dir: Prepared folder (train/val/test.parquet + manifest.json); None builds the embedded synthetic
            default into the cache ($DRG_LLAMA_CACHE or ~/.cache/drg_llama) once and reuses it.
        drg_version: MS-DRG version of the classes and answers; must match the prepared folder's manifest.
        instruction: System instruction; None uses ``drg.answers.INSTRUCTION`` (``{version}`` is filled in).
        max_note_tokens: Token budget of the hospital course in the prompt (the instruction is never truncated).
        truncation: Which note tokens to keep: ``head``, ``tail`` or ``head_tail``.
        rationale: SFT targets: ``grounded`` (from codes + grouper, answer-only where unavailable) or ``answer_only``.
        codes_dir: ``hosp/`` folder with diagnoses_icd/procedures_icd; None finds it from the prepared folder.
        batch_size: Prompts per training step (GRPO samples ``num_generations`` completions for each).
        eval_batch_size: Prompts per validation/test/predict batch.
        limit_train: Use only the first N training rows; None for all.
        limit_val: Use only the first N validation rows (the held-out reward curve's notes); None for all.
        limit_test: Use only the first N test rows; None for all.
        seed: Seed of the training shuffle (mixed with the epoch) and of the embedded synthetic corpus.
        synthetic_n: Admissions in the embedded synthetic corpus (only when data_dir is None).
        cache_dir: Cache root for the embedded corpus; default $DRG_LLAMA_CACHE or ~/.cache/drg_llama.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        drg_version: str = "v43",
        instruction: str | None = None,
        max_note_tokens: int = 128,
        truncation: Literal["head", "tail", "head_tail"] = "head_tail",
        rationale: Literal["grounded", "answer_only"] = "answer_only",
        codes_dir: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        seed: int = 0,
        synthetic_n: int = 5000,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if truncation not in TRUNCATIONS:
            raise UserError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        if rationale not in RATIONALES:
            raise UserError(f"rationale must be one of {RATIONALES}, got {rationale!r}")
        if max_note_tokens < 1:
            raise UserError(f"max_note_tokens must be >= 1, got {max_note_tokens}")
        if batch_size < 1 or eval_batch_size < 1:
            raise UserError("batch_size and eval_batch_size must be >= 1")
        self.save_hyperparameters()
        # The folder, its checks, the limits and the classes; it never tokenises (tokenizer=None).
        self.splits = DRGDataModule(
            data_dir=data_dir,
            variant="single_label",
            drg_version=drg_version,
            tokenizer=None,
            limit_train=limit_train,
            limit_val=limit_val,
            limit_test=limit_test,
            seed=seed,
            synthetic_n=synthetic_n,
            cache_dir=cache_dir,
        )
        self.instruction = instruction
        self.max_note_tokens = max_note_tokens
        self.truncation = truncation
        self.rationale = rationale
        self.codes_dir = codes_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self._tokenizer = None
        self._examples: dict[str, list[dict]] = {}
        #: Why SFT targets are grounded or answer-only, counted over the rows built so far (never any text).
        self.rationale_counts: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------------------------
    # folder, limits and classes: those of the DRGDataModule held here

    @property
    def prepared_dir(self) -> Path:
        """The prepared folder, after checking its manifest (builds the embedded default on first access)."""
        return self.splits.prepared_dir

    @property
    def limits(self) -> dict[str, int | None]:
        """Rows used per split (None: all)."""
        return self.splits.limits

    @property
    def label_space(self) -> LabelSpace:
        """Classes of this run: one per DRG of the training rows (the reasoner's answers are DRGs)."""
        return self.splits.label_space

    @property
    def version(self) -> str:
        """MS-DRG version of the classes, targets and answers."""
        return self.splits.drg_version

    def use_label_space(self, space: LabelSpace) -> None:
        """Use a trained run's classes instead of deriving them from ``train.parquet`` (evaluation, prediction)."""
        self.splits.use_label_space(space)

    def split_frame(self, split: str) -> pd.DataFrame:
        """Admission facts of a split in row order (index = ``row``), no text (``DRGDataModule.split_frame``)."""
        return self.splits.split_frame(split)

    # ------------------------------------------------------------------------------------------------------------
    # tokenizer and examples

    @property
    def tokenizer(self):
        """The model's tokenizer, handed over by ``set_tokenizer``."""
        if self._tokenizer is None:
            raise RuntimeError("ReasonerDataModule has no tokenizer: call set_tokenizer(model.tokenizer) first")
        return self._tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        """Render prompts and targets with ``tokenizer`` (the model's own) from now on."""
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs pad and eos tokens; load it with drg_llama.models.backbone")
        if tokenizer is not self._tokenizer:
            self._examples.clear()
        self._tokenizer = tokenizer

    def prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """Prompt ids of each text: the instruction and the note (truncated to ``max_note_tokens``) in the template."""
        parts = prompt_parts(self.tokenizer, instruction_for(self.version, self.instruction))
        return build_prompts(self.tokenizer, texts, parts, self.max_note_tokens, self.truncation)

    def examples(self, split: str) -> list[dict]:
        """Prompt ids (and, for train and val, SFT completion ids) per row of a split, built once; no text kept."""
        if split not in self._examples:
            frame = self._read(split)
            prompts = self.prompts(frame["text"].tolist())
            completions: list[list[int] | None] = [None] * len(frame)
            if split in ("train", "val") and len(frame):
                rationales = self._rationales(frame)
                texts = [target_text(int(d), self.version, r) for d, r in zip(frame["drg_code"], rationales)]
                ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
                completions = [list(x) + [self.tokenizer.eos_token_id] for x in ids]
            self._examples[split] = [
                {"prompt": p, "completion": c, "drg_code": int(d), "row": i}
                for i, (p, c, d) in enumerate(zip(prompts, completions, frame["drg_code"]))
            ]
        return self._examples[split]

    def _read(self, split: str) -> pd.DataFrame:
        """hadm_id, drg_code and text of the split's first ``limit`` rows (row order = index)."""
        import pyarrow.parquet as pq

        frame = pq.read_table(self.prepared_dir / f"{split}.parquet", columns=_COLUMNS).to_pandas()
        limit = self.limits[split]
        return frame.iloc[:limit].reset_index(drop=True) if limit is not None else frame

    def _rationales(self, frame: pd.DataFrame) -> list[str | None]:
        if self.rationale == "answer_only":
            return [None] * len(frame)
        from drg_llama.data.rationales import find_codes_dir, grounded_rationales

        codes_dir = self.codes_dir or find_codes_dir(self.prepared_dir)
        if codes_dir is None:
            logger.warning("no diagnoses_icd next to %s: SFT targets are answer-only", self.prepared_dir)
            return [None] * len(frame)
        rationales, counts = grounded_rationales(codes_dir, frame, self.version)
        for key, value in counts.items():
            self.rationale_counts[key] = self.rationale_counts.get(key, 0) + value
        logger.info("SFT targets: %s", dict(counts))  # counts only, never text
        return rationales

    # ------------------------------------------------------------------------------------------------------------
    # Lightning hooks

    def prepare_data(self) -> None:
        """Build the embedded default once (Lightning calls this on one process per node)."""
        self.splits.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Check the folder and build the label space; examples are built with the first batch."""
        _ = self.label_space

    def _loader(self, rows: list[dict], size: int, sampler: Sampler | None = None) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        # The loader's own generator: its per-epoch seed draw leaves the global RNG alone.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(rows, size, sampler=sampler, generator=generator, collate_fn=lambda r: collate(r, pad))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (``EpochShuffle``), resuming mid-epoch where a checkpoint stopped."""
        rows = self.examples("train")
        sampler = EpochShuffle(len(rows), self.seed)
        if self._resume is not None:
            sampler.skip_on_resume(self._resume["epoch"], self._resume["batches"] * self.batch_size)
        return self._loader(rows, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in row order; an empty list when the split has no rows (drg_llama_2023)."""
        return self.eval_dataloader("val") if self.examples("val") else []

    def test_dataloader(self) -> DataLoader:
        """Test batches in row order."""
        return self.eval_dataloader("test")

    def eval_dataloader(self, split: str) -> DataLoader:
        """Batches of any split in row order (nothing shuffled or skipped)."""
        return self._loader(self.examples(split), self.eval_batch_size)

    def texts_dataloader(self, texts: Sequence[str]) -> DataLoader:
        """Batches of prompts of arbitrary texts, in order (``row`` = position; ``drg_code`` -1: no gold)."""
        rows = [{"prompt": p, "drg_code": -1, "row": i} for i, p in enumerate(self.prompts(texts))]
        return self._loader(rows, self.eval_batch_size)


__all__ = [
    "PLAIN_TEMPLATE",
    "EpochShuffle",
    "ReasonerDataModule",
    "build_prompts",
    "collate",
    "left_pad",
    "prompt_parts",
    "sft_batch",
]
