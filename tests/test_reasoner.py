"""The reasoner on tiny random models: group log-probs, a GRPO step, end to end, and a TRL cross-check.

The synthetic corpus is built once per session into a temporary DRG_LLAMA_CACHE.
"""

import json
import os
import shutil
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import yaml

from drg_llama.data.reasoner import ReasonerDataModule, left_pad
from drg_llama.evaluate import evaluate_run
from drg_llama.models.backbone import BackboneConfig, build_causal_lm_backbone
from drg_llama.models.generation import sample_completions
from drg_llama.models.grpo import (
    answer_diversity,
    clipped_token_loss,
    combine_rewards,
    group_advantages,
    group_log_probs,
    reward_table,
)
from drg_llama.models.reasoner import VAL_METRICS, DRGReasoner, GenerationConfig, GRPOConfig, RewardConfig
from drg_llama.models.rewards import exact_drg_reward, format_reward
from drg_llama.predict import predict_file
from drg_llama.runs import Run, RunError
from drg_llama.train import CONFIG_DIR, main
from tests.test_generation import TINY, full_forward_log_probs, tiny_backbone

TINY_CONFIG = str(CONFIG_DIR / "tiny_reasoner.yaml")


# ----------------------------------------------------------------------------------------------------------------
# group log-probs: each prompt prefilled once


def test_group_log_probs_equal_per_sample_forwards_in_value_and_gradient():
    torch.manual_seed(0)
    model, tok = build_causal_lm_backbone(tiny_backbone(lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # LoRA B starts at zero; make the adapter matter so its gradients are non-trivial
            torch.nn.init.normal_(param, std=0.5)
    prompts = [list(b"note one, longer<"), list(b"two<")]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    g = 3
    out = sample_completions(model, ids, mask, g, 7, 1.0, tok.eos_token_id, tok.pad_token_id)
    comp, comp_mask = out["completion_ids"], out["completion_mask"].clone()
    comp_mask[1, 3:] = 0  # a completion that ended early: padded tail
    weights = torch.randn(comp.shape)

    def value_and_grads(fn, *prompt_args):
        model.zero_grad()
        logps = fn(model, *prompt_args, comp, comp_mask, 0.7)
        (logps * weights * comp_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return logps.detach(), grads

    shared, shared_grads = value_and_grads(group_log_probs, ids, mask)
    rep = (ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0))
    separate, separate_grads = value_and_grads(full_forward_log_probs, *rep)
    real = comp_mask.bool()
    torch.testing.assert_close(shared[real], separate[real], atol=1e-5, rtol=1e-5)
    assert separate_grads and all(g.abs().sum() > 0 for g in separate_grads.values())
    for name, grad in separate_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="groups"):
        group_log_probs(model, ids[:1].repeat(4, 1), mask[:1].repeat(4, 1), comp, comp_mask, 1.0)


def test_group_log_probs_under_gradient_checkpointing_equal_the_shared_prefill():
    # transformers drops the KV cache inside checkpointed layers in training mode; the shared prefill then had no
    # cache to repeat (AttributeError on None) and every 7B config, which checkpoints, crashed at GRPO step 1.
    torch.manual_seed(0)
    model, tok = build_causal_lm_backbone(tiny_backbone(lora_dropout=0.0, gradient_checkpointing=True))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    ids, mask = left_pad([list(b"note one, longer<"), list(b"two<")], tok.pad_token_id)
    model.eval()
    out = sample_completions(model, ids, mask, 3, 7, 1.0, tok.eos_token_id, tok.pad_token_id)
    comp, comp_mask = out["completion_ids"], out["completion_mask"]
    weights = torch.randn(comp.shape)

    def value_and_grads(train: bool):
        model.train(train)
        model.zero_grad()
        logps = group_log_probs(model, ids, mask, comp, comp_mask, 0.7)
        (logps * weights * comp_mask).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    checkpointed, checkpointed_grads = value_and_grads(train=True)  # cache dropped: prompt + completion forwards
    shared, shared_grads = value_and_grads(train=False)  # eval mode keeps the cache: the shared prefill
    real = comp_mask.bool()
    torch.testing.assert_close(checkpointed[real], shared[real], atol=1e-5, rtol=1e-5)
    for name, grad in shared_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# one GRPO step


def test_grpo_step_with_gradient_checkpointing(cache):
    model, data = tiny_grpo_reasoner(
        backbone=tiny_backbone(lora_dropout=0.0, gradient_checkpointing=True),
        batch_size=2,
        generation=GenerationConfig(max_new_tokens=4),
        # the reference log-probs (beta > 0) run under no_grad in training mode: also without a cache
        grpo=GRPOConfig(num_generations=2, micro_batch_size=4, beta=0.04),
        learning_rate=0.05,
    )
    model.rewards = [_length_reward] * len(model.rewards)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=data)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def _length_reward(completions, **kwargs):
    """Rewards longer completions: gives the random model's groups variance, hence non-zero advantages."""
    return [float(len(c)) for c in completions]


def tiny_grpo_reasoner(
    backbone: BackboneConfig | None = None, batch_size: int = 8, **settings
) -> tuple[DRGReasoner, ReasonerDataModule]:
    """A GRPO-stage reasoner on the tiny random LLaMA, and 8/4 synthetic rows with a one-line instruction."""
    L.seed_everything(0)
    data = ReasonerDataModule(
        synthetic_n=300,
        limit_train=8,
        limit_val=4,
        instruction="Give the DRG.",
        max_note_tokens=32,
        batch_size=batch_size,
    )
    model = DRGReasoner(
        backbone=backbone or tiny_backbone(lora_dropout=0.0), label_space=data.label_space, stage="grpo", **settings
    )
    data.set_tokenizer(model.tokenizer)
    return model, data


def test_one_grpo_step_changes_lora_and_not_base_weights(cache):
    model, data = tiny_grpo_reasoner(
        batch_size=4,
        generation=GenerationConfig(max_new_tokens=6),
        grpo=GRPOConfig(num_generations=4, micro_batch_size=6),  # 16 completions in micro-batches of 6, 6, 4
        learning_rate=0.05,
        rewards=RewardConfig(functions=("format",), weights=None),
    )
    model.rewards = [_length_reward]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=data)
    lora_changed = [n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(p, before[n])]
    base_changed = [n for n, p in model.named_parameters() if "lora_" not in n and not torch.equal(p, before[n])]
    assert lora_changed and not base_changed
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------------------------------------------
# end to end: train --variant sft, then --variant grpo from its adapter, evaluate, predict


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reasoner_runs")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        sft = main(["--variant", "sft", "--config", TINY_CONFIG])
        sft_dir = workdir / "runs" / "sft" / "version_0"
        grpo = main(
            [
                *("--variant", "grpo", "--config", TINY_CONFIG, "--model.init_adapter", str(sft_dir)),
                *("--model.grpo.beta", "0.1", "--model.generation.val_samples", "2"),
            ]
        )
    finally:
        os.chdir(cwd)
    return {"sft": (sft_dir, sft), "grpo": (workdir / "runs" / "grpo" / "version_0", grpo)}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sft", "grpo"])
def test_train_reasoner_writes_every_artifact(runs, variant):
    run_dir, results = runs[variant]
    for name in ("config.yaml", "metrics.csv", "label_space.json", "test_metrics.json", "reasoner.json"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    marker = json.loads((run_dir / "reasoner.json").read_text())
    assert marker["stage"] == variant and marker["run_type"] == "reasoner"
    test = json.loads((run_dir / "test_metrics.json").read_text())
    keys = {"top1", "top5", "macro_f1_present", "macro_auc", "base_acc", "severity_acc", "format_valid", "invalid_drg"}
    assert keys | {"pass1_sampled", "maj_at_k", "pass_at_k", "reward_greedy", "reward_sampled"} <= set(test["metrics"])
    # the tiny config's rewards are format/exact/invalid (weights 1): the held-out reward lies in [-1, 2]
    assert -1.0 <= test["metrics"]["reward_greedy"] <= 2.0
    assert test["metrics"]["top1"] == test["metrics"]["pass1_greedy"] and test["metrics"]["n"] == 8
    assert set(results) == {f"{variant} (last)"}
    metrics = pd.read_csv(run_dir / "metrics.csv")
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)  # trainable tensors only
    if variant == "sft":
        assert metrics["train/loss"].notna().sum() == 2 and metrics["val/loss"].notna().any()
        greedy_only = {f"val/{k}" for k in VAL_METRICS if k != "reward_sampled"}
        assert greedy_only <= set(metrics.columns) and "val/reward_sampled" not in metrics  # val_samples: 0
        assert marker["rationale_counts"].get("grounded", 0) > 0  # grounded targets were built from the codes
    else:
        logged = {"reward", "reward_std", "frac_reward_zero_std", "completion_length", "truncated_fraction"}
        logged |= {"clip_ratio", "kl", "rewards/format", "rewards/exact", "rewards/invalid", "entropy"}
        logged |= {"distinct_answers", "group_distinct"}
        assert {f"train/{k}" for k in logged} <= set(metrics.columns)
        assert metrics["train/reward"].notna().sum() == 2
        # the held-out curve: the SFT policy before any update (a validate before fit), then every 2 steps
        assert metrics["val/optimizer_steps"].dropna().tolist() == [0.0, 2.0]
        assert metrics["val/reward_greedy"].notna().sum() == 2 and metrics["val/reward_sampled"].notna().sum() == 2
        assert marker["init_adapter"].endswith("version_0")
        assert (run_dir / "reward_curve.png").stat().st_size > 1000


def test_validation_samples_repeat_the_same_draws_at_every_check(cache):
    # val/reward_sampled compares checks: with an unchanged policy, every check must sample the very same answers.
    model, data = tiny_grpo_reasoner(generation=GenerationConfig(max_new_tokens=8, val_samples=3))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    draws = []
    for _ in range(2):
        trainer.validate(model, datamodule=data, verbose=False)
        draws.append([row["sampled"] for row in model.last_eval["rows"]])
        batch = next(iter(data.val_dataloader()))
        model.generate(batch["prompt_ids"], batch["prompt_mask"], samples=3)  # the training sampler's RNG moves
    assert len(draws[0]) == 4 and all(len(s) == 3 for s in draws[0])
    assert draws[0] == draws[1]
    assert len({text for row in draws[0] for text in row}) > 1  # really sampled, not greedy


def test_evaluate_and_predict_reasoner_runs(runs, tmp_path):
    run_dir, _ = runs["grpo"]
    report = evaluate_run(run_dir, "test")
    recorded = json.loads((run_dir / "test_metrics.json").read_text())["metrics"]
    assert report["variant"] == "grpo" and report["metrics"]["n"] == recorded["n"]
    assert report["metrics"]["top1"] == pytest.approx(recorded["top1"])
    predictions = pd.read_parquet(run_dir / "eval" / "predictions.parquet")
    assert {"hadm_id", "gold_drg", "pred_drg", "answer_status", "format_ok"} <= set(predictions.columns)
    assert "reasoning" not in predictions.columns and "text" not in predictions.columns  # opt-in only

    notes = tmp_path / "notes.csv"
    pd.DataFrame({"id": ["a", "b"], "text": ["sepsis with acute kidney injury", " "]}).to_csv(notes, index=False)
    out = predict_file(run_dir, notes, tmp_path / "pred.csv")
    written = pd.read_csv(tmp_path / "pred.csv")
    assert list(written["id"].astype(str)) == ["a", "b"] and "text" not in written.columns
    assert written.loc[1, "skipped"] == "empty_text" and out.loc[0, "answer_status"] in (
        "ok",
        "missing",
        "empty",
        "invalid_drg",
    )
    with_reasoning = predict_file(run_dir, notes, tmp_path / "pred2.parquet", with_reasoning=True)
    assert "reasoning" in with_reasoning.columns


def test_a_reasoner_run_from_before_the_grouped_settings_is_named(runs, tmp_path):
    """Its prompt settings sat in the model section: rebuilt now, it would prompt and answer differently."""
    run_dir = Path(shutil.copytree(runs["sft"][0], tmp_path / "old"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    settings = config["model"]["init_args"]
    old = {k: v for k, v in settings.items() if k not in ("generation", "grpo", "rewards")}
    config["model"] = {**old, "max_note_tokens": 48, "max_new_tokens": 16}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(RunError, match="written before the reasoner's settings were grouped"):
        Run.open(run_dir)


def test_grpo_run_carries_its_sft_adapter(runs, tmp_path):
    """The SFT adapter merged into a GRPO run's base travels in the run (init_adapter/): a copy of the run predicts
    the same answers with the SFT run gone."""
    run_dir, _ = runs["grpo"]
    sft_dir, _ = runs["sft"]
    assert (run_dir / "init_adapter" / "adapter_model.safetensors").is_file()
    notes = tmp_path / "notes.csv"
    pd.DataFrame({"id": ["a", "b"], "text": ["sepsis with acute kidney injury", "heart failure"]}).to_csv(notes)
    before = predict_file(run_dir, notes, tmp_path / "before.csv")
    copy = shutil.copytree(run_dir, tmp_path / "grpo_copy")
    hidden = sft_dir.with_name("hidden")
    sft_dir.rename(hidden)
    try:
        after = predict_file(copy, notes, tmp_path / "after.csv")
    finally:
        hidden.rename(sft_dir)
    pd.testing.assert_frame_equal(before, after)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sft", "grpo"])
def test_cli_resume_continues_the_same_run_folder(runs, variant, tmp_path, monkeypatch, capsys):
    """``--ckpt_path last`` as for the classifier: the same run folder, its metrics.csv rows kept, two more steps."""
    work = Path(shutil.copytree(runs["sft"][0].parent.parent.parent, tmp_path / "work"))
    monkeypatch.chdir(work)
    run_dir = work / "runs" / variant / "version_0"
    column = "train/loss" if variant == "sft" else "train/reward"
    before = pd.read_csv(run_dir / "metrics.csv").dropna(subset=[column])
    extra = ["--model.init_adapter", str(runs["sft"][0])] if variant == "grpo" else []
    main(["--variant", variant, "--config", TINY_CONFIG, *extra, "--ckpt_path", "last", "--trainer.max_steps", "4"])
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]  # no new version
    trained = pd.read_csv(run_dir / "metrics.csv").dropna(subset=[column])
    assert len(before) == 2 and len(trained) == 4 and trained["step"].is_monotonic_increasing
    pd.testing.assert_frame_equal(trained.iloc[:2][["step", column]], before[["step", column]])  # history kept
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    if variant == "grpo":  # its base holds the SFT adapter, which the checkpoint does not: resuming needs it
        capsys.readouterr()
        with pytest.raises(SystemExit, match="2"):
            main(["--variant", "grpo", "--config", TINY_CONFIG, "--ckpt_path", "last", "--trainer.max_steps", "6"])
        assert f"pass --model.init_adapter {runs['sft'][0]}" in capsys.readouterr().err


class _Killed(RuntimeError):
    """Stands for the process dying right after the checkpoint of a step was written."""


def _sft_fit(folder: Path, kill_at: int | None = None, ckpt_path: str | None = None) -> DRGReasoner:
    """Four SFT steps of the tiny reasoner on 16 rows (one epoch), a checkpoint after every step."""
    L.seed_everything(0)
    settings_of_data = {"instruction": "Give the DRG.", "max_note_tokens": 32, "batch_size": 4}
    data = ReasonerDataModule(synthetic_n=300, limit_train=16, limit_val=4, **settings_of_data)
    model = DRGReasoner(backbone=tiny_backbone(lora_dropout=0.0), label_space=data.label_space, learning_rate=0.05)
    data.set_tokenizer(model.tokenizer)

    class KillAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == kill_at:
                raise _Killed(f"killed at step {kill_at}")

    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        callbacks=[checkpoint, KillAt()],
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return model


def test_a_killed_sft_run_resumes_on_the_batches_it_had_not_trained(cache, tmp_path):
    """Killed mid-epoch and resumed, SFT ends with the weights of an uninterrupted run: the data module's sampler
    leaves out the batches trained before the kill, as the classifier's does (teacher forcing draws nothing)."""
    whole = _sft_fit(tmp_path / "whole")
    with pytest.raises(_Killed):
        _sft_fit(tmp_path / "killed", kill_at=3)
    assert torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = _sft_fit(tmp_path / "resumed", ckpt_path=str(tmp_path / "killed" / "last.ckpt"))
    trained = {n: p for n, p in whole.named_parameters() if p.requires_grad}
    assert trained
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, trained[name], msg=f"{name} differs after resume")


def test_answer_diversity_shows_mode_collapse():
    varied = answer_diversity([291, 292, 871, None, 193, 194, 195, 196], group_size=4)
    assert varied == {"distinct_answers": 4.0, "group_distinct": 1.0}  # 8 distinct answers for 2 prompts
    collapsed = answer_diversity([871] * 8, group_size=4)
    assert collapsed == {"distinct_answers": 0.5, "group_distinct": 0.25}


# ----------------------------------------------------------------------------------------------------------------
# TRL cross-check


def test_advantages_logprobs_and_loss_gradient_match_trl(tmp_path):
    """Same tiny model, data, seed and settings: TRL samples one generation batch; our math on it equals TRL's.

    Sampling itself is not compared (TRL samples with ``model.generate``, we with our own shared-prefill loop), so
    TRL's completions are fed to our functions. Matched: rewards -> advantages (group std, Bessel, eps 1e-4),
    per-token log-probs at temperature 0.7, and the gradient of the clipped loss normalised by the generation
    batch's token count (TRL's default ``loss_type="dapo"``). Prompts have different lengths (left padding).
    """
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from drg_llama.pretrained import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    fields = {k: v for k, v in TINY.items() if k != "model_type"}
    config = AutoConfig.for_model("llama", **fields, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    data = Dataset.from_dict({"prompt": ["note: heart failure, long<", "sepsis<"], "drg_code": [291, 871]})
    rewards = [format_reward, exact_drg_reward, _length_reward]
    g, temperature = 4, 0.7
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2 * g,
        num_generations=g,
        max_completion_length=8,
        temperature=temperature,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=0.2,
        epsilon_high=0.28,
        report_to=[],
        use_cpu=True,
        max_steps=1,
        seed=0,
        save_strategy="no",
        bf16=False,  # TRL would autocast its log-prob forward to bf16 where the CPU supports it; compare fp32 math
    )
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=data, processing_class=tok)
    rows = [data[i] for i in range(2) for _ in range(g)]  # TRL's sampler repeats each prompt G times
    inputs = trainer._generate_and_score_completions(rows)
    mask = inputs["completion_mask"]

    ids_list = [r[m.bool()].tolist() for r, m in zip(inputs["completion_ids"], mask)]
    texts = tok.batch_decode(ids_list, skip_special_tokens=True)
    columns = {"drg_code": [r["drg_code"] for r in rows]}
    per_fn = reward_table(rewards, [r["prompt"] for r in rows], texts, ids_list, columns)
    advantages, _ = group_advantages(combine_rewards(per_fn, torch.ones(len(rewards))), g, "group")
    torch.testing.assert_close(advantages, inputs["advantages"])
    assert advantages.abs().sum() > 0  # the length reward makes the comparison non-trivial

    model.train()
    full_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    full_mask = torch.cat([inputs["prompt_mask"], mask], 1)
    trl_logps = trainer._get_per_token_logps_and_entropies(model, full_ids, full_mask, mask.shape[1])[0]
    prompts = (inputs["prompt_ids"][::g], inputs["prompt_mask"][::g])  # TRL repeats each prompt G times; we don't
    ours = group_log_probs(model, *prompts, inputs["completion_ids"], mask, temperature)
    torch.testing.assert_close(ours[mask.bool()], trl_logps[mask.bool()], atol=1e-5, rtol=1e-5)

    trainer.current_gradient_accumulation_steps = 1  # Trainer.train() sets this; we call compute_loss directly
    model.zero_grad()
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ours_loss = clipped_token_loss(ours, ours.detach(), advantages, mask, 0.2, 0.28, num_tokens=mask.sum())["loss"]
    ours_loss.backward()
    assert ours_loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert trl_grads and any(g.abs().max() > 0 for g in trl_grads.values())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, trl_grads[name], atol=1e-6, rtol=1e-4, msg=name)
