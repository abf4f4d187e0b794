"""The reasoner on tiny random models: prompts, shared prefill, a GRPO step, end to end, and a TRL cross-check.

The synthetic corpus is built once per module into a temporary DRG_LLAMA_CACHE.
"""

import json
import os
import shutil

import lightning as L
import pandas as pd
import pytest
import torch

from drg_llama.data.datamodule import DRGDataModule
from drg_llama.evaluate import evaluate_run
from drg_llama.models.backbone import BackboneConfig, build_causal_lm_backbone
from drg_llama.models.reasoner import (
    VAL_METRICS,
    DRGReasoner,
    answer_diversity,
    answer_stop,
    build_prompts,
    clipped_token_loss,
    combine_rewards,
    group_advantages,
    group_log_probs,
    left_pad,
    positions,
    prompt_parts,
    reward_table,
    sample_completions,
    target_text,
    token_log_probs,
)
from drg_llama.models.rewards import exact_drg_reward, format_reward, parse_answer
from drg_llama.predict import predict_file
from drg_llama.train import CONFIG_DIR, main

TINY = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 300,
    "max_position_embeddings": 1024,
}
TINY_CONFIG = str(CONFIG_DIR / "tiny_reasoner.yaml")


def full_forward_log_probs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    """The plain definition ``group_log_probs`` must equal: one forward of every (repeated) prompt + completion."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    c = completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=c + 1).logits
    return token_log_probs(logits[:, :-1], completion_ids, temperature)


def tiny_backbone(**kw) -> BackboneConfig:
    return BackboneConfig(name_or_path="random", random_init=TINY, tokenizer="byte", lora_r=4, lora_alpha=8, **kw)


# ----------------------------------------------------------------------------------------------------------------
# prompts


class _ChatTokenizer:
    """Stands in for a tokenizer with a chat template: one id per character, template markers as text."""

    chat_template = "x"
    bos_token_id = None

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        body = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(c) for c in t] for t in text]}


def test_the_note_is_truncated_and_the_instruction_never_is():
    tok = _ChatTokenizer()
    instruction = "Explain MS-DRG, CC and MCC. " * 20  # long: must survive whole
    parts = prompt_parts(tok, instruction)
    note = "A" * 50 + "B" * 50
    (prompt,) = build_prompts(tok, [note], parts, max_note_tokens=10, truncation="head_tail")
    text = "".join(chr(i) for i in prompt)
    assert text == f"<system>{instruction}</><user>Hospital course:\nAAAAABBBBB</><assistant>"
    (short,) = build_prompts(tok, ["tiny"], parts, max_note_tokens=10, truncation="tail")
    assert "".join(chr(i) for i in short).endswith("Hospital course:\ntiny</><assistant>")


def test_plain_prompt_without_chat_template_and_targets():
    _, tok = build_causal_lm_backbone(tiny_backbone())
    assert tok.chat_template is None  # the byte tokenizer: documented plain layout
    parts = prompt_parts(tok, "Give the DRG.")
    (prompt,) = build_prompts(tok, ["x" * 100], parts, max_note_tokens=8, truncation="head")
    text = tok.decode(prompt, skip_special_tokens=True)
    assert text == "### Instruction\nGive the DRG.\n\n### Hospital course\nxxxxxxxx\n\n### Response\n"
    assert prompt[0] == tok.bos_token_id
    target = target_text(291, "v43", "I50.9 is the principal diagnosis.")
    assert parse_answer(target).drg == 291 and parse_answer(target).format_ok
    assert parse_answer(target_text(871, "v43", None)).format_ok  # answer-only: an empty think block


# ----------------------------------------------------------------------------------------------------------------
# shared prefill


def test_shared_prefill_matches_per_sample_prefill():
    torch.manual_seed(0)
    model, tok = build_causal_lm_backbone(tiny_backbone(lora_dropout=0.0))
    model.eval()
    prompts = [list(b"note one, longer<"), list(b"two<")]  # different lengths: left padding
    ids, mask = left_pad(prompts, tok.pad_token_id)
    g = 3
    out = sample_completions(model, ids, mask, g, 6, 0.7, tok.eos_token_id, tok.pad_token_id)
    # the first token's distribution from one prefill per prompt == from G separate prefills of each prompt
    with torch.no_grad():
        rep_ids, rep_mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
        pos = (rep_mask.cumsum(-1) - 1).clamp(min=0)
        per_sample = model(input_ids=rep_ids, attention_mask=rep_mask, position_ids=pos).logits[:, -1]
    torch.testing.assert_close(out["first_logits"].softmax(-1), per_sample.float().softmax(-1))
    # the expanded cache keeps decoding right: greedy from the shared prefill == greedy on each unpadded prompt
    shared = sample_completions(model, ids, mask, g, 8, 0.0, tok.eos_token_id, tok.pad_token_id)["completion_ids"]
    for i, prompt in enumerate(prompts):
        alone_ids, alone_mask = left_pad([prompt], tok.pad_token_id)
        alone = sample_completions(model, alone_ids, alone_mask, 1, 8, 0.0, tok.eos_token_id, tok.pad_token_id)
        for j in range(g):
            assert shared[i * g + j].tolist() == alone["completion_ids"][0].tolist()
    # the loss scores sampled tokens exactly as the sampler saw them (positions and masks agree)
    logps = full_forward_log_probs(
        model, rep_ids, rep_mask, out["completion_ids"], out["completion_mask"], temperature=0.7
    )  # [B*G, C]
    first = (out["first_logits"] / 0.7).log_softmax(-1).gather(1, out["completion_ids"][:, :1]).squeeze(1)
    torch.testing.assert_close(logps[:, 0], first, atol=1e-5, rtol=1e-5)


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


def test_sampling_stops_at_the_closing_answer_tag():
    torch.manual_seed(0)
    model, tok = build_causal_lm_backbone(tiny_backbone())
    ids, mask = left_pad([list(b"a note<")], tok.pad_token_id)
    closing = tok("</answer>", add_special_tokens=False)["input_ids"]
    # a model that can only write "</answer>" then "x" forever: the completion must end at the tag
    (x,) = tok("x", add_special_tokens=False)["input_ids"]
    script = closing + [x] * 20

    class Scripted(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids, use_cache, past_key_values=None, **kw):
            step = 0 if past_key_values is None else past_key_values.step + 1
            cache = past_key_values or _StepCache()
            cache.step = step
            logits = torch.full((input_ids.shape[0], 1, 300), -1e9)
            logits[:, :, script[step]] = 0.0
            return type("Out", (), {"logits": logits, "past_key_values": cache})()

    stop = answer_stop(tok)
    for check_every in (1, 3, 8):  # the host looks every few tokens; the completion still ends at the tag
        out = sample_completions(
            Scripted(), ids, mask, 2, 16, 1.0, tok.eos_token_id, tok.pad_token_id, stop=stop, check_every=check_every
        )
        assert out["completion_ids"].shape[1] == len(closing)
        assert tok.decode(out["completion_ids"][0].tolist()) == "</answer>"
        assert out["completion_mask"].all() and not out["truncated"].any()
    unstopped = sample_completions(Scripted(), ids, mask, 2, 16, 1.0, tok.eos_token_id, tok.pad_token_id)
    assert unstopped["completion_ids"].shape[1] == 16 and unstopped["truncated"].all()
    # first_close: the length of the shortest prefix that closes the tag, 0 where none does
    assert stop.first_close(torch.tensor([closing + [x, x], [x] * (len(closing) + 2)])).tolist() == [len(closing), 0]
    spaced = tok("</ ANSWER >", add_special_tokens=False)["input_ids"]
    assert stop.first_close(torch.tensor([[x] * 5 + spaced])).tolist() == [5 + len(spaced)]  # as tolerant as the parser


class _RowScript(torch.nn.Module):
    """A 'model' whose row r writes script[r] token by token (one-hot logits), whatever it is fed; NaN on request."""

    def __init__(self, scripts: list[list[int]], vocab: int = 300, nan_at: int | None = None):
        super().__init__()
        self.scripts, self.vocab, self.nan_at = scripts, vocab, nan_at

    def forward(self, input_ids, attention_mask, position_ids, use_cache, past_key_values=None, **kw):
        step = 0 if past_key_values is None else past_key_values.step + 1
        cache = past_key_values or _StepCache()
        cache.step = step
        logits = torch.full((input_ids.shape[0], 1, self.vocab), -1e9)
        for r in range(input_ids.shape[0]):
            logits[r, 0, self.scripts[r % len(self.scripts)][step]] = 0.0
        if step == self.nan_at:
            logits[1, 0, 7] = float("nan")
        return type("Out", (), {"logits": logits, "past_key_values": cache})()


def test_checking_every_few_tokens_gives_the_same_completions_as_every_token():
    torch.manual_seed(0)
    model, tok = build_causal_lm_backbone(tiny_backbone(lora_dropout=0.0))
    model.eval()
    ids, mask = left_pad([list(b"note one, longer<"), list(b"two<")], tok.pad_token_id)

    def sample(check_every: int, seed: int = 3) -> dict[str, torch.Tensor]:
        rng = torch.Generator().manual_seed(seed)
        eos, pad = tok.eos_token_id, tok.pad_token_id
        return sample_completions(model, ids, mask, 4, 12, 1.0, eos, pad, rng, check_every=check_every)

    reference = sample(1)
    for check_every in (2, 5, 12):
        for key in ("completion_ids", "completion_mask", "truncated"):
            assert torch.equal(sample(check_every)[key], reference[key]), (check_every, key)
    # rows ending at different tokens, by eos or by the tag, each cut at its own token
    closing = tok("</answer>", add_special_tokens=False)["input_ids"]
    (x,) = tok("x", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    scripts = [[x] * 3 + closing + [x] * 20, [x, eos] + [x] * 30, [x] * 30, [x] * 9 + closing + [x] * 20]
    outs = [
        sample_completions(
            _RowScript(scripts), ids[:1], mask[:1], 4, 20, 1.0, eos, 0, stop=answer_stop(tok), check_every=k
        )
        for k in (1, 4, 7)
    ]
    lengths = outs[0]["completion_mask"].sum(1).tolist()
    assert lengths == [3 + len(closing), 2, 20, 9 + len(closing)]
    assert outs[0]["truncated"].tolist() == [False, False, True, False]
    for out in outs[1:]:
        assert all(torch.equal(out[k], outs[0][k]) for k in ("completion_ids", "completion_mask", "truncated"))


def test_non_finite_logits_stop_sampling_with_a_clear_error():
    # Without the check, NaN reaches torch.multinomial: a RuntimeError on a CPU, a device-side assert that poisons
    # the whole process on a GPU.
    from drg_llama.models.reasoner import NonFiniteLogitsError

    ids, mask = left_pad([[5, 6, 7]], 0)
    for temperature in (1.0, 0.0):
        with pytest.raises(NonFiniteLogitsError, match="NaN or infinite logits at completion token"):
            sample_completions(_RowScript([[9] * 20], nan_at=2), ids, mask, 2, 16, temperature, 1, 0, check_every=4)


class _StepCache:
    def batch_repeat_interleave(self, repeats):
        pass


# ----------------------------------------------------------------------------------------------------------------
# one GRPO step


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


def test_grpo_step_with_gradient_checkpointing(cache):
    model = tiny_grpo_reasoner(
        backbone=tiny_backbone(lora_dropout=0.0, gradient_checkpointing=True),
        batch_size=2,
        num_generations=2,
        max_new_tokens=4,
        micro_batch_size=4,
        learning_rate=0.05,
        beta=0.04,  # the reference log-probs run under no_grad in training mode: also without a cache
    )
    model.rewards = [_length_reward] * len(model.rewards)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def _length_reward(completions, **kwargs):
    """Rewards longer completions: gives the random model's groups variance, hence non-zero advantages."""
    return [float(len(c)) for c in completions]


def tiny_grpo_reasoner(backbone: BackboneConfig | None = None, **settings) -> DRGReasoner:
    """A GRPO-stage reasoner on the tiny random LLaMA with a one-line instruction, attached to 8/4 synthetic rows."""
    L.seed_everything(0)
    data = DRGDataModule(variant="single_label", tokenizer=None, synthetic_n=300, limit_train=8, limit_val=4)
    model = DRGReasoner(
        backbone=backbone or tiny_backbone(lora_dropout=0.0),
        label_space=data.label_space,
        stage="grpo",
        instruction="Give the DRG.",
        max_note_tokens=32,
        **settings,
    )
    model.attach_data(data)
    return model


def test_one_grpo_step_changes_lora_and_not_base_weights(cache):
    model = tiny_grpo_reasoner(
        batch_size=4,
        num_generations=4,
        max_new_tokens=6,
        micro_batch_size=6,  # 16 completions in micro-batches of 6, 6, 4
        learning_rate=0.05,
        reward_funcs=["format"],
    )
    model.rewards = [_length_reward]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model)
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
                *("--model.beta", "0.1", "--model.val_samples", "2"),
            ]
        )
    finally:
        os.chdir(cwd)
    return {"sft": (sft_dir, sft), "grpo": (workdir / "runs" / "grpo" / "version_0", grpo)}


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
    model = tiny_grpo_reasoner(max_new_tokens=8, val_samples=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    draws = []
    for _ in range(2):
        trainer.validate(model, verbose=False)
        draws.append([row["sampled"] for row in model.last_eval["rows"]])
        batch = next(iter(model.val_dataloader()))
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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_cache_decoding_equals_the_dynamic_cache(arch):
    """The preallocated cache and 4-D mask (what a CUDA graph replays on a GPU) sample what the dynamic cache does."""
    torch.manual_seed(0)
    model, tok = build_causal_lm_backbone(
        tiny_backbone(lora_dropout=0.0)
        if arch == "llama"
        else BackboneConfig(
            random_init={**TINY, "model_type": "qwen2"}, tokenizer="byte", lora_r=4, lora_alpha=8, lora_dropout=0.0
        )
    )
    model.eval()
    ids, mask = left_pad([list(b"note one, longer<"), list(b"two<")], tok.pad_token_id)  # left padding: masked keys

    def sample(kv_cache: str, temperature: float) -> dict[str, torch.Tensor]:
        rng = torch.Generator().manual_seed(5)
        eos, pad = tok.eos_token_id, tok.pad_token_id
        return sample_completions(model, ids, mask, 3, 10, temperature, eos, pad, rng, kv_cache=kv_cache)

    for temperature in (0.0, 1.0):
        dynamic, static = sample("dynamic", temperature), sample("static", temperature)
        assert torch.equal(dynamic["completion_ids"], static["completion_ids"]), temperature
        assert torch.equal(dynamic["completion_mask"], static["completion_mask"])
    assert torch.equal(sample("auto", 1.0)["completion_ids"], dynamic["completion_ids"])  # auto on a CPU: dynamic
