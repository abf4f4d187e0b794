"""Padding-free packing, the model's side: several notes share one row, each attends only to itself.

Hospital-course lengths have a long tail (mean ~500 tokens, some > 2,000), so padded batches spend much of their
compute on padding. ``drg_llama.data.batching`` plans the rows (``PackedBatchSampler``, first-fit-decreasing) and
builds the packed batch (``PackedCollator``); this module runs it: the attention mask that keeps notes apart, and
pooling each note from the packed hidden states. (The plan lives in data/ because the data module batches before
any model exists, and data/ never imports models/.)

    seqs     [a a a b b c c c c _ _]       one packed row (``_`` = padding up to a multiple of 8)
    pos      [0 1 2 0 1 0 1 2 3 0 0]       position ids restart per note (RoPE sees the same positions as alone)
    seq_ids  [0 0 0 1 1 2 2 2 2 -1 -1]     which note a token belongs to
    mask     block-diagonal causal:        token of note j sees only earlier tokens of note j

Restarting position ids alone does NOT isolate the notes: with ``sdpa``, ``eager`` or ``flex_attention`` and a 2-D
attention mask, tokens attend across note boundaries (checked on transformers 5.17 and 5.23; ``tests/test_packing.py``
documents it). transformers 5.2x only infers packed sequences from position ids when ``attention_mask is None``, which
is version-dependent behaviour we do not rely on. We always pass an explicit mask: a 4-D additive mask
``[R, 1, T, T]`` (sdpa/eager, CPU or GPU), or a flex_attention ``BlockMask`` when the backbone uses
``attn_implementation="flex_attention"`` (it skips the masked blocks, so long packed rows cost ~ the sum of the
notes' own attention instead of ``T**2``).

``DRGClassifier`` dispatches on ``seq_ids`` (:func:`is_packed`); logits come out ``[N, C]`` in the same note order as
the labels. Opt in with ``DRGDataModule(packing=True, pack_tokens=...)`` (``--data.packing true`` on the command
line).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from drg_llama.models.backbone import Pooling, _sequence_classifier, check_attention_support, head_logits


def is_packed(batch: dict[str, Any]) -> bool:
    """True for a batch from ``PackedCollator`` (it carries ``seq_ids``)."""
    return "seq_ids" in batch


# ----------------------------------------------------------------------------------------------------------------
# Masks and the packed forward
# ----------------------------------------------------------------------------------------------------------------


def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask ``[R, 1, T, T]``: 0 where query and key are in the same note and key <= query, else min.

    Padding (``seq_ids == -1``) forms its own block, so no row of the mask is fully masked (sdpa would return NaN
    there) and no real token ever sees padding.
    """
    width = seq_ids.shape[-1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]  # [R, T, T]
    causal = torch.ones(width, width, dtype=torch.bool, device=seq_ids.device).tril()  # [T, T]
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)  # [R, 1, T, T]


#: flex_attention's tile size: the BlockMask records, per tile of queries x keys, whether it is skipped, computed
#: with the mask, or computed without it.
FLEX_BLOCK = 128


def flex_block_mask(seq_ids: torch.Tensor, block_size: int = FLEX_BLOCK):
    """flex_attention ``BlockMask`` of the same block-diagonal causal pattern, built from tile summaries.

    ``create_block_mask`` evaluates the mask function on all ``T x T`` positions every step (or compiles it, once
    per row width). Notes are contiguous runs of ``seq_ids``, so a tile's first and last note ids say enough: a tile
    of keys above the diagonal, or whose note ids cannot meet the query tile's, is skipped; a tile below the
    diagonal where queries and keys all belong to one note needs no mask; every other tile is computed with the
    mask function. The classification is conservative (padding, ``-1``, only ever makes a tile "partial"), so the
    result is exact: the mask function decides every position of a partial tile. Cost: ``[R, T/128, T/128]``
    booleans, no host sync.
    """
    from torch.nn.attention.flex_attention import BlockMask

    rows, width = seq_ids.shape
    n = -(-width // block_size)
    # Positions past the row's end get an id of their own, so the mask function never indexes out of bounds and
    # those (padded-away) queries and keys only meet each other.
    ids = torch.cat([seq_ids, seq_ids.new_full((rows, n * block_size - width), -2)], dim=1)  # [R, n*B]
    tiles = torch.cat([seq_ids, seq_ids[:, -1:].expand(rows, n * block_size - width)], dim=1).view(rows, n, -1)
    lo, hi = tiles.amin(-1), tiles.amax(-1)  # [R, n] first/last note id range of each tile (real positions)
    q_lo, q_hi, k_lo, k_hi = lo[:, :, None], hi[:, :, None], lo[:, None, :], hi[:, None, :]  # [R, n, 1] / [R, 1, n]
    below = torch.ones(n, n, dtype=torch.bool, device=seq_ids.device).tril()  # [n, n] key tile <= query tile
    strictly_below = below.tril(-1)
    meets = below & (q_lo <= k_hi) & (k_lo <= q_hi)  # [R, n, n] some query and key may share a note
    full = strictly_below & (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)  # [R, n, n] one note on both sides
    partial = meets & ~full

    def kv_lists(kind: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = kind.sum(-1, dtype=torch.int32)[:, None]  # [R, 1, n]
        order = torch.argsort((~kind).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]  # [R, 1, n, n]
        return counts, order

    def same_note_causal(b, h, q, kv):
        return (ids[b, q] == ids[b, kv]) & (kv <= q)

    partial_lists, full_lists = kv_lists(partial), kv_lists(full)
    return BlockMask.from_kv_blocks(
        *partial_lists, *full_lists, BLOCK_SIZE=block_size, mask_mod=same_note_causal, seq_lengths=(width, width)
    )


def pool_packed(
    hidden: torch.Tensor, seq_ids: torch.Tensor, num_sequences: int, pooling: Pooling = "last"
) -> torch.Tensor:
    """Per-note pooled states ``[N, H]`` from packed hidden states ``[R, T, H]``.

    Runs without a host sync (no boolean indexing): padding goes to a spare slot ``N`` that is dropped.

    Args:
        hidden: ``[R, T, H]`` last hidden states.
        seq_ids: ``[R, T]`` note index, -1 on padding.
        num_sequences: ``N``, the number of notes in the batch.
        pooling: ``last`` (each note's last token) or ``mean`` (average of its tokens, accumulated in fp32).
    """
    flat = hidden.reshape(-1, hidden.shape[-1])  # [R*T, H]
    ids = seq_ids.reshape(-1)  # [R*T]
    ids = torch.where(ids >= 0, ids, torch.full_like(ids, num_sequences))
    if pooling == "mean":
        sums = torch.zeros(num_sequences + 1, flat.shape[-1], dtype=torch.float32, device=flat.device)
        sums.index_add_(0, ids, flat.float())  # [N+1, H]
        counts = torch.zeros(num_sequences + 1, dtype=torch.float32, device=flat.device)
        counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))  # [N+1]
        return (sums[:num_sequences] / counts[:num_sequences, None].clamp(min=1)).to(hidden.dtype)  # [N, H]
    positions = torch.arange(ids.shape[0], device=ids.device)  # [R*T]
    last = torch.zeros(num_sequences + 1, dtype=torch.long, device=ids.device)
    last.scatter_reduce_(0, ids, positions, reduce="amax")  # [N+1], flat index of each note's last token
    return flat[last[:num_sequences]]  # [N, H]


def packed_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    seq_ids: torch.Tensor,
    num_sequences: int | None = None,
    pooling: Pooling = "last",
) -> torch.Tensor:
    """Class logits ``[N, C]`` for the notes of a packed batch; equal to ``pooled_logits`` on the padded notes.

    Args:
        model: From ``build_classifier_backbone`` (PEFT-wrapped or plain).
        input_ids: ``[R, T]`` packed token ids.
        position_ids: ``[R, T]`` positions restarting at 0 for each note.
        seq_ids: ``[R, T]`` note index 0..N-1, -1 on padding.
        num_sequences: ``N``; default ``seq_ids.max() + 1`` (costs a host sync on GPU).
        pooling: ``last`` or ``mean``, as in ``pooled_logits``.
    """
    classifier = _sequence_classifier(model)
    body = getattr(classifier, classifier.base_model_prefix)
    if num_sequences is None:
        num_sequences = int(seq_ids.max()) + 1
    dtype = body.get_input_embeddings().weight.dtype
    if check_attention_support(classifier.config, input_ids.device, dtype) == "flex_attention":
        mask = flex_block_mask(seq_ids)
    else:
        mask = block_causal_mask(seq_ids, dtype)  # [R, 1, T, T]
    hidden = body(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # [R, T, H]
    return head_logits(classifier, pool_packed(hidden, seq_ids, num_sequences, pooling))  # [N, C]


__all__ = ["block_causal_mask", "flex_block_mask", "is_packed", "packed_logits", "pool_packed"]
