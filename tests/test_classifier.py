"""DRGClassifier: losses on hand-made tensors, one optimisation step, checkpoints that hold only trainable tensors."""

import math

import pytest
import torch

from drg_llama.drg import LabelSpace
from drg_llama.metrics import score_predictions
from drg_llama.models.backbone import BackboneConfig
from drg_llama.models.classifier import DRGClassifier, partial_label_nll
from tests.tiny import TINY_LLAMA


def tiny_classifier(variant: str, **kwargs) -> DRGClassifier:
    torch.manual_seed(0)
    space = LabelSpace.build("v43", variant, [291, 292, 293, 871, 872])
    backbone = BackboneConfig(name_or_path="random", random_init=TINY_LLAMA, tokenizer="byte", lora_r=4, lora_alpha=8)
    return DRGClassifier(backbone=backbone, label_space=space, **kwargs)


def batch_for(model: DRGClassifier, drgs: list[int]) -> dict[str, torch.Tensor]:
    space = model.label_space
    enc = [space.encode(d) for d in drgs]
    ids = torch.randint(3, 250, (len(drgs), 12))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([e[0] for e in enc]),
        "base_labels": torch.tensor([e[1] for e in enc]),
        "severity_mask": torch.tensor([e[2] for e in enc]),
        "row": torch.arange(len(drgs)),
        "hadm_id": torch.arange(len(drgs)) + 100,
    }


def test_partial_label_nll_hand_computed():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]]))
    # row 0: gold 292 -> {CC}; row 1: gold 872 "without MCC" -> {NONE, CC}: two allowed severities
    allowed = torch.tensor([[False, True, False], [True, True, False]])
    expected = (-math.log(0.5) - math.log(0.7)) / 2
    assert partial_label_nll(logits, allowed).item() == pytest.approx(expected, rel=1e-6)


def test_two_label_loss_is_base_ce_plus_weighted_severity():
    model = tiny_classifier("two_label", severity_weight=0.5)
    space = model.label_space  # bases (291, 871) + NONE/CC/MCC
    logits = torch.tensor([[2.0, 0.0, 0.1, 0.2, 0.3], [0.0, 1.0, 1.0, 0.0, -1.0]])
    batch = batch_for(model, [292, 872])
    losses = model.loss(logits, batch)
    base = torch.nn.functional.cross_entropy(logits[:, :2], torch.tensor([0, 1]))
    sev = partial_label_nll(logits[:, 2:], batch["severity_mask"])
    assert space.bases == (291, 871)
    assert losses["loss"].item() == pytest.approx((base + 0.5 * sev).item(), rel=1e-6)


def test_single_label_loss_is_cross_entropy():
    model = tiny_classifier("single_label")
    logits = torch.randn(3, model.label_space.num_outputs)
    batch = batch_for(model, [291, 872, 293])
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"])
    assert model.loss(logits, batch)["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("variant", ["single_label", "two_label"])
def test_one_step_changes_lora_and_head_only(variant):
    model = tiny_classifier(variant)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = batch_for(model, [291, 292, 872, 293])
    loss = model.loss(model(batch["input_ids"], batch["attention_mask"]), batch)["loss"]
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "no parameter moved"
    assert changed <= trainable
    assert any("score" in n for n in changed)
    # LoRA B starts at zero, so A receives no gradient on the first step; B must move.
    assert any("lora_B" in n for n in changed)


def test_checkpoint_keeps_only_trainable_tensors():
    model = tiny_classifier("two_label")
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    model.on_load_checkpoint(checkpoint)  # complete: no error
    checkpoint["state_dict"].pop(next(iter(trainable)))
    with pytest.raises(RuntimeError, match="lacks 1 trainable"):
        model.on_load_checkpoint(checkpoint)


def test_distribution_over_drgs_and_unseen_gold_counts_as_error():
    model = tiny_classifier("two_label")
    probs = model.drg_probs(torch.randn(4, model.label_space.num_outputs))
    assert probs.shape == (4, 5) and torch.allclose(probs.sum(-1), torch.ones(4))
    gold = torch.tensor([0, 1, 2, -1]).numpy()
    perfect = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 5).float().numpy()
    metrics = score_predictions(model.label_space, perfect, gold)
    assert metrics["top1"] == pytest.approx(0.75)  # the unseen DRG is a miss, not dropped
    assert metrics["n"] == 4 and metrics["unseen_gold"] == 1


def test_argmax_decode_gives_one_hot():
    model = tiny_classifier("two_label", decode="argmax")
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0, 2.0]])  # base 291, severity MCC
    probs = model.drg_probs(logits)
    assert model.label_space.drgs[int(probs.argmax())] == 291 and probs.sum() == 1


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="label space"):
        DRGClassifier(backbone=BackboneConfig(), label_space=None)
    with pytest.raises(ValueError, match="decode"):
        tiny_classifier("two_label", decode="beam")
