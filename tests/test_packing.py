"""Packing, the model's side: block masks, pooling, and packed logits equal to padded ones (tiny LLaMA and Qwen2).

Run: pytest tests/test_packing.py
"""

import pytest
import torch

from drg_llama.data.batching import Collator, PackedCollator, pack_sequences
from drg_llama.models.backbone import BackboneConfig, _sequence_classifier, build_classifier_backbone, pooled_logits
from drg_llama.models.classifier import DRGClassifier
from drg_llama.models.packing import block_causal_mask, packed_logits, pool_packed
from tests.test_datamodule import make_dm, write_prepared

# initializer_range 0.2 (not 0.02): larger activations make a leak across notes show far above rounding noise.
TINY = {
    arch: {
        "model_type": arch,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "initializer_range": 0.2,
    }
    for arch in ("llama", "qwen2")
}
LENGTHS = [23, 7, 40, 12, 31, 5, 18]  # 136 tokens: rows of 48 hold several notes each


def _item(ids, i):
    return {"input_ids": ids, "labels": i, "base_labels": -1, "severity_mask": [True] * 3, "row": i, "hadm_id": i}


def _notes(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (n,), generator=gen).tolist() for n in LENGTHS]


def _batches(notes, pack_tokens: int = 48):
    """The same notes as a packed batch and as a right-padded batch, in the packed batch's note order."""
    rows = pack_sequences([len(n) for n in notes], pack_tokens)
    packed = PackedCollator(pad_token_id=0)([[_item(notes[i], i) for i in row] for row in rows])
    order = packed["row"].tolist()
    padded = Collator(pad_token_id=0)([_item(notes[i], i) for i in order])
    return packed, padded


def _model(arch: str, dtype: str = "fp32", **overrides):
    torch.manual_seed(0)
    cfg = BackboneConfig(random_init=dict(TINY[arch]), dtype=dtype, lora_r=4, lora_dropout=0.0, **overrides)
    model, _ = build_classifier_backbone(cfg, num_labels=5)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Pure parts


def test_block_causal_mask_isolates_notes():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]), torch.float32)  # [1, 1, 5, 5]
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],  # note 1 does not see note 0
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],  # padding sees only itself: no fully masked row (sdpa would give NaN)
    ]


def test_pool_packed_last_and_mean():
    hidden = torch.arange(12, dtype=torch.float32).view(1, 6, 2)  # token t has state [2t, 2t+1]
    seq_ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    assert pool_packed(hidden, seq_ids, 2, "last").tolist() == [[2, 3], [8, 9]]
    assert pool_packed(hidden, seq_ids, 2, "mean").tolist() == [[1, 2], [6, 7]]


# ----------------------------------------------------------------------------------------------------------------
# Packed == padded


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_logits_equal_padded_fp32(arch, pooling):
    model = _model(arch)
    packed, padded = _batches(_notes())
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # several notes really share rows
    with torch.no_grad():
        ref = pooled_logits(model, padded["input_ids"], padded["attention_mask"], pooling)  # [N, C]
        out = packed_logits(model, packed["input_ids"], packed["position_ids"], packed["seq_ids"], 7, pooling)
    assert out.shape == ref.shape == (7, 5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_logits_equal_padded_bf16(arch, pooling):
    model = _model(arch, dtype="bf16")
    packed, padded = _batches(_notes(1))
    with torch.no_grad():
        ref = pooled_logits(model, padded["input_ids"], padded["attention_mask"], pooling).float()
        out = packed_logits(model, packed["input_ids"], packed["position_ids"], packed["seq_ids"], 7, pooling).float()
    # bf16 keeps 8 bits of mantissa: allow a few ulps of the logits' scale (different kernels sum in other orders).
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 0.03 * scale + 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flex_attention_block_mask_equals_padded(arch):
    """With attn_implementation="flex_attention" the packed forward uses a BlockMask (runs eagerly on CPU)."""
    padded_model, flex_model = _model(arch), _model(arch, attn_implementation="flex_attention")
    packed, padded = _batches(_notes())
    with torch.no_grad():
        ref = pooled_logits(padded_model, padded["input_ids"], padded["attention_mask"], "last")
        out = packed_logits(flex_model, packed["input_ids"], packed["position_ids"], packed["seq_ids"], 7, "last")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_position_ids_alone_leak_across_notes(arch):
    """The pitfall: restarting position ids with a plain 2-D mask lets notes attend to each other.

    (transformers 5.2x infers packing from position ids only when ``attention_mask`` is None; we never rely on it.)
    """
    model = _model(arch)
    packed, padded = _batches(_notes())
    classifier = _sequence_classifier(model)
    body = getattr(classifier, classifier.base_model_prefix)
    with torch.no_grad():
        ref = pooled_logits(model, padded["input_ids"], padded["attention_mask"], "last")
        hidden = body(
            input_ids=packed["input_ids"],
            attention_mask=(packed["seq_ids"] >= 0).long(),  # 2-D: marks padding, not note boundaries
            position_ids=packed["position_ids"],
            use_cache=False,
        ).last_hidden_state
        leaky = classifier.score(pool_packed(hidden, packed["seq_ids"], 7, "last"))
    diff = (leaky - ref).abs().amax(-1)  # [N]
    starts = torch.tensor([p == 0 for p in _row_positions(packed)])  # a row's first note sees nothing foreign
    assert starts.any() and (~starts).any()
    assert torch.all(diff[starts] < 1e-5)
    assert torch.all(diff[~starts] > 1e-3)


def _row_positions(packed) -> list[int]:
    """Index of each note within its packed row (0 = the row's first note)."""
    out = []
    for row in packed["seq_ids"]:
        notes = [int(s) for s in dict.fromkeys(row.tolist()) if s >= 0]
        out += list(range(len(notes)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Data module and classifier hooks


def test_datamodule_packing_gives_the_same_logits_and_loss(tmp_path):
    folder = tmp_path / "prepared"
    write_prepared(folder)
    plain = make_dm(folder, max_length=64, batch_size=4)
    packed = make_dm(folder, max_length=64, batch_size=4, packing=True)
    with pytest.raises(ValueError, match="pack_tokens"):
        make_dm(folder, max_length=64, packing=True, pack_tokens=32)
    eff = packed.padding_efficiency("train")
    assert eff["packed"] > eff["random"] and eff["packed"] > 0.9

    train = list(packed.train_dataloader())
    rows = sorted(r for b in train for r in b["row"].tolist())
    assert rows == list(range(40))  # every training row once per epoch
    assert all(b["input_ids"].shape[0] <= 4 and b["input_ids"].shape[1] <= 64 for b in train)
    assert len(train) < len(plain.train_dataloader())  # fewer, fuller batches

    torch.manual_seed(0)
    space = packed.label_space
    backbone = BackboneConfig(random_init=dict(TINY["llama"]), tokenizer="byte", lora_r=4, lora_dropout=0.0)
    model = DRGClassifier(backbone=backbone, label_space=space).eval()
    batch = train[0]
    order = batch["row"].tolist()
    ds = plain.dataset("train")
    padded = plain.collator()([ds[i] for i in order])
    with torch.no_grad():
        out, ref = model.batch_logits(batch), model.batch_logits(padded)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.loss(out, batch)["loss"], model.loss(ref, padded)["loss"])
    assert model.training_step(batch, 0).isfinite()
    val = next(iter(packed.val_dataloader()))
    model.test_step(val, 0)  # per-note keys only: would fail on [R, T] tensors indexed by a [N] mask
    assert model._eval_outputs[-1]["probs"].shape[0] == val["labels"].shape[0]
    model.validation_step(val, 0)
    assert model.val_metrics.compute()["top1"] >= 0.0 and model._val_batches == 1
    assert "seq_ids" not in next(iter(packed.predict_dataloader()))  # predict stays padded


@pytest.mark.parametrize("block_size", [16, 128])
def test_flex_block_mask_from_tiles_is_exact(block_size):
    """The BlockMask built from per-tile note ids gives the same attention as the dense 4-D block mask.

    Tiles of 16 make the classification matter: tiles above the diagonal or between different notes are skipped,
    tiles inside one note below the diagonal run without the mask function, the rest with it.
    """
    from torch.nn.attention.flex_attention import flex_attention

    from drg_llama.models.packing import flex_block_mask

    torch.manual_seed(0)
    seq_ids = torch.full((2, 70), -1)
    seq_ids[0, :20], seq_ids[0, 20:50], seq_ids[0, 50:64] = 0, 1, 2
    seq_ids[1, :40], seq_ids[1, 40:] = 3, 4
    mask = flex_block_mask(seq_ids, block_size=block_size)
    if block_size == 16:
        assert mask.full_kv_num_blocks.sum() > 0  # (tile 1, tile 0) of row 1 lies inside note 3
        assert mask.kv_num_blocks[0, 0].tolist() == [1, 2, 2, 3, 1]  # row 0: partial tiles per query tile
    q, k, v = (torch.randn(2, 2, 70, 16) for _ in range(3))
    with torch.no_grad():
        out = flex_attention(q, k, v, block_mask=mask)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(seq_ids, q.dtype))
    real = (seq_ids >= 0)[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_flex_attention_refuses_what_its_kernels_cannot_run():
    from types import SimpleNamespace

    from drg_llama.models.backbone import check_attention_support

    config = SimpleNamespace(_attn_implementation="flex_attention", hidden_size=32, num_attention_heads=4, head_dim=8)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ValueError, match="no backward pass on a CPU"):
        check_attention_support(config, cpu, torch.float32)  # gradients on: training
    with torch.no_grad():
        assert check_attention_support(config, cpu, torch.float32) == "flex_attention"  # fp32 inference works
        with pytest.raises(ValueError, match="fp32 only"):
            check_attention_support(config, cpu, torch.bfloat16)
        with pytest.raises(ValueError, match="head size of at least 16 and this model's is 8"):
            check_attention_support(config, cuda, torch.bfloat16)
    wide = SimpleNamespace(**{**vars(config), "head_dim": 64})
    assert check_attention_support(wide, cuda, torch.bfloat16) == "flex_attention"
    sdpa = SimpleNamespace(_attn_implementation="sdpa")
    assert check_attention_support(sdpa, cpu, torch.bfloat16) == "sdpa"
    # what the check stands in for, on a CPU: flex_attention's backward is not implemented
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 1, 16, 16, requires_grad=True)
    with pytest.raises(Exception):  # noqa: B017 - torch raises NotImplementedError or a compile error by version
        flex_attention(q, q, q).sum().backward()
