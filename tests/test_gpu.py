"""GPU-only checks, opt-in: ``pytest -m gpu`` on a machine with CUDA (the default run deselects them).

Each checks on CUDA what the CPU suite can only check with CPU kernels: the CUDA-graph decoder against the dynamic
cache, packed flex_attention against padded sdpa, QLoRA's CUDA kernels, and the precision policy under autocast.
``benchmarks/gpu_check.sh`` measures; these assert.
"""

import pytest
import torch

from benchmarks.gpu_check import SMALL_LLAMA as SMALL  # head size 64: flex_attention's GPU kernels need >= 16
from drg_llama.data.reasoner import left_pad
from drg_llama.models.backbone import BackboneConfig, build_causal_lm_backbone, build_classifier_backbone
from drg_llama.models.generation import sample_completions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_graph_decoding_equals_the_dynamic_cache():
    torch.manual_seed(0)
    model, tok = build_causal_lm_backbone(BackboneConfig(random_init=SMALL, lora_r=4, lora_dropout=0.0))
    model = model.cuda().eval()
    ids, mask = left_pad([list(b"a longer first note<"), list(b"two<")], tok.pad_token_id)
    ids, mask = ids.cuda(), mask.cuda()
    runs = {}
    for kv_cache in ("dynamic", "static", "graph"):
        rng = torch.Generator(device="cuda").manual_seed(1)
        out = sample_completions(
            model, ids, mask, 4, 24, 0.0, tok.eos_token_id, tok.pad_token_id, rng, kv_cache=kv_cache
        )
        runs[kv_cache] = out["completion_ids"]
    assert torch.equal(runs["static"], runs["dynamic"]) and torch.equal(runs["graph"], runs["dynamic"])


def test_packed_flex_attention_equals_padded_sdpa_on_cuda():
    from drg_llama.data.batching import PackedCollator
    from drg_llama.models.backbone import pooled_logits
    from drg_llama.models.packing import packed_logits

    models = {}
    for attn in ("sdpa", "flex_attention"):
        torch.manual_seed(0)
        cfg = BackboneConfig(random_init=SMALL, lora_r=4, attn_implementation=attn)
        models[attn] = build_classifier_backbone(cfg, 8)[0].cuda().eval()
    gen = torch.Generator().manual_seed(0)
    lengths = [300, 41, 170, 9, 260]
    notes = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in lengths]
    items = [
        {"input_ids": x, "labels": 0, "base_labels": -1, "severity_mask": [True] * 3, "row": i, "hadm_id": i}
        for i, x in enumerate(notes)
    ]
    rows = [[0, 1, 3], [2, 4]]
    packed = {k: v.cuda() for k, v in PackedCollator(0)([[items[i] for i in r] for r in rows]).items()}
    ids = torch.zeros(len(notes), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, note in enumerate(notes):
        ids[i, : len(note)], mask[i, : len(note)] = torch.tensor(note), 1
    with torch.no_grad():
        ref = pooled_logits(models["sdpa"], ids.cuda(), mask.cuda())[[0, 1, 3, 2, 4]]
        out = packed_logits(models["flex_attention"], packed["input_ids"], packed["position_ids"], packed["seq_ids"], 5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_qlora_builds_and_steps_on_cuda(tmp_path):
    import bitsandbytes as bnb

    from drg_llama.models.backbone import pooled_logits

    torch.manual_seed(0)
    base, tok = build_causal_lm_backbone(BackboneConfig(random_init=SMALL, lora_r=0))
    base.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = build_classifier_backbone(
        BackboneConfig(name_or_path=str(tmp_path), quantization="4bit", dtype="bf16"), 3
    )
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ids = torch.randint(3, 250, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = pooled_logits(model, ids, torch.ones_like(ids))
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 2], device="cuda")).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
