"""``DRGReasoner``: a causal LM with LoRA that writes a rationale and an MS-DRG — SFT cold start, then GRPO.

    python -m drg_llama.train --variant sft                                           # CPU demo on the embedded data
    python -m drg_llama.train --variant grpo --model.init_adapter runs/sft/version_0  # starts from the SFT adapter

It trains on the batches of ``drg_llama.data.reasoner.ReasonerDataModule`` (prompts and SFT targets) and writes
``<think>…</think><answer>DRG NNN: TITLE</answer>`` (the format and its parser: ``drg.answers``; the rewards:
``rewards``).

**SFT** (``stage="sft"``): cross-entropy on the completion tokens only (prompt and padding are labelled -100).

**GRPO** (``stage="grpo"``, manual optimisation), per training step with B prompts:

1. Sample G completions per prompt (``generation.sample_completions``: one shared prefill per prompt).
2. Score them with the reward functions and turn the rewards into group advantages (``grpo``).
3. Minimise the clipped token loss (``grpo.clipped_token_loss``) over micro-batches of whole groups, with the
   completions' log-probs from ``grpo.group_log_probs`` (each prompt prefilled once, with gradient).
4. One optimizer step per generation batch (``grpo.iterations`` > 1 reuses the samples for more steps; then the old
   log-probs are computed once before the first step and the clip matters).

**KL reference.** With ``init_adapter_mode="merge"`` (default) the SFT adapter is merged into the base weights and
GRPO trains a fresh LoRA on top, so the reference (the SFT policy) is the same model with the adapter disabled: no
second copy. With ``"continue"`` GRPO keeps training the SFT adapter itself, so a frozen copy of the SFT model is kept
as the reference (twice the memory), only when ``beta > 0``.

**Settings** come in three groups besides the backbone and the optimiser: ``generation`` (completion budget and the
samples drawn at evaluation), ``grpo`` (the RL step) and ``rewards`` (functions and weights, also reported by SFT
evaluation). Their defaults are those of ``configs/grpo.yaml``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch

from drg_llama.drg import LabelSpace
from drg_llama.drg.answers import ParsedAnswer, parse_answer
from drg_llama.errors import UserError
from drg_llama.metrics import f1_scores, score_predictions
from drg_llama.models.backbone import (
    BackboneConfig,
    build_causal_lm_backbone,
    check_trainable_tensors,
    check_training_setup,
    keep_trainable_fp32,
    keep_trainable_tensors,
    save_adapter,
)
from drg_llama.models.generation import answer_stop, positions, sample_completions
from drg_llama.models.grpo import (
    SCALE_REWARDS,
    answer_diversity,
    clipped_token_loss,
    combine_rewards,
    group_advantages,
    group_log_probs,
    nanstd,
    reward_table,
)
from drg_llama.models.rewards import REWARD_FUNCTIONS, score_answers

#: The test metrics logged to metrics.csv (test_metrics.json holds them all).
SUMMARY_METRICS = (
    "top1",
    "format_valid",
    "invalid_drg",
    "base_acc",
    "severity_acc",
    "pass_at_k",
    "reward_greedy",
    "top_answer_share",
)
#: The metrics of each validation check (the same fixed notes every time), logged as ``val/<key>``: of greedy
#: answers, and ``reward_sampled`` only with ``generation.val_samples``.
VAL_METRICS = (
    "reward_greedy",
    "reward_sampled",
    "top1",
    "base_acc",
    "severity_acc",
    "mdc_acc",
    "invalid_drg",
    "top_answer_share",
)


# ----------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class GenerationConfig:
    """How completions are generated, in training and evaluation."""

    max_new_tokens: int = 48
    """Completion budget in training and evaluation (sampling also stops at </answer>)."""
    eval_samples: int = 4
    """Answers sampled per test note besides the greedy one, for Pass@1 sampled, Maj@k and Pass@k (0: greedy only)."""
    eval_temperature: float = 0.7
    """Temperature of those samples."""
    val_samples: int = 4
    """Completions sampled per validation note at grpo.temperature, the same draws at every check, for
    val/reward_sampled: the reward GRPO maximises, on notes it never trains on (0: greedy only)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.eval_samples < 0 or self.val_samples < 0:
            raise UserError("generation.eval_samples and generation.val_samples must be >= 0 (0: greedy only)")
        if not self.eval_temperature > 0:
            raise UserError(f"generation.eval_temperature must be > 0, got {self.eval_temperature}")


@dataclass(frozen=True)
class GRPOConfig:
    """One GRPO step: G samples per prompt, group advantages, the clipped loss and its optimizer step(s)."""

    num_generations: int = 8
    """G completions sampled per prompt (>= 2: advantages are relative to the group)."""
    temperature: float = 0.7
    """Sampling temperature, also of the loss's log-probs (tokens are scored as they were drawn)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std (GRPO), the batch's, or not at all (Dr. GRPO)."""
    epsilon_low: float = 0.2
    """Lower clip of the probability ratio."""
    epsilon_high: float | None = 0.28
    """Upper clip (None: epsilon_low); a larger one is DAPO's clip-higher."""
    beta: float = 0.04
    """KL coefficient to the reference (SFT) policy; 0 skips the reference forward."""
    iterations: int = 1
    """Optimizer steps per generation batch; > 1 reuses the samples and makes the clip active."""
    micro_batch_size: int = 32
    """Completions per forward/backward of the loss, rounded down to whole groups (at least one prompt x G)."""
    max_grad_norm: float = 1.0
    """Gradient norm clip of each step (0 disables)."""

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise UserError("grpo.num_generations must be >= 2: GRPO's advantages are relative to the group")
        if self.scale_rewards not in SCALE_REWARDS:
            raise UserError(f"grpo.scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if not self.temperature > 0:
            raise UserError(f"grpo.temperature must be > 0, got {self.temperature}")
        if self.iterations < 1 or self.micro_batch_size < 1:
            raise UserError("grpo.iterations and grpo.micro_batch_size must be >= 1")
        if self.beta < 0 or self.epsilon_low < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise UserError("grpo.beta, grpo.epsilon_low and grpo.epsilon_high must be >= 0")


@dataclass(frozen=True)
class RewardConfig:
    """The rewards GRPO maximises; SFT and GRPO evaluation report the same (``reward_greedy``)."""

    functions: tuple[str, ...] = ("format", "exact", "partial", "invalid")
    """Names in rewards.REWARD_FUNCTIONS: format, exact, partial, invalid."""
    weights: tuple[float, ...] | None = (0.2, 1.0, 0.5, 1.0)
    """One weight per function (None: 1.0 each); the reward is their weighted sum."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.functions if name not in REWARD_FUNCTIONS]
        if unknown or not self.functions:
            raise UserError(f"rewards.functions {list(self.functions)}: choose from {sorted(REWARD_FUNCTIONS)}")
        if self.weights is not None and len(self.weights) != len(self.functions):
            raise UserError(
                f"rewards.weights has {len(self.weights)} values for {len(self.functions)} rewards.functions; "
                "give one weight per function"
            )

    @property
    def weight_tensor(self) -> torch.Tensor:
        """``[F]`` float32 weights (1.0 each when none are given)."""
        weights = self.weights if self.weights is not None else [1.0] * len(self.functions)
        return torch.tensor(weights, dtype=torch.float32)


def adapter_folder(init_adapter: str | Path) -> Path:
    """The PEFT adapter folder ``init_adapter`` names: an SFT run's ``adapter/``, or the folder itself."""
    folder = Path(init_adapter).expanduser()
    return folder / "adapter" if (folder / "adapter" / "adapter_config.json").is_file() else folder


def _settings(cls, value):
    """A settings dataclass from itself, a dict (a checkpoint's hyper-parameters) or None (the defaults)."""
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value


# ----------------------------------------------------------------------------------------------------------------
# SFT loss and the metrics of generated answers


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over completion tokens (``sft_batch`` layout), computing logits only where needed."""
    keep = int(batch["completion_width"]) + 1
    mask = batch["attention_mask"]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions(mask), logits_to_keep=keep
    ).logits  # [B, K, V]
    targets = batch["labels"][:, -keep + 1 :]  # [B, K-1]: logits at t predict token t+1
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def generation_metrics(
    space: LabelSpace,
    greedy: Sequence[ParsedAnswer],
    gold: Sequence[int],
    sampled: Sequence[Sequence[ParsedAnswer]] | None = None,
) -> dict[str, float]:
    """The classifier's metric keys (``top1`` … ``severity_acc``) plus the generation metrics of ``score_answers``.

    The greedy answer is a one-hot "distribution" over the label space's DRGs (all zeros for an invalid answer or a
    DRG outside the space), so top-k, AUC and ECE are those of a point prediction: ``top1`` = Pass@1 greedy and
    ``top5`` = ``top1``. Base, severity and MDC accuracy and F1 are computed on the answered DRG itself, so a valid
    DRG outside the training classes still earns base/severity credit and an invalid answer predicts no class.
    """
    n, c = len(gold), space.num_classes
    probs = np.zeros((n, c), dtype=np.float64)
    pred = np.full(n, c, dtype=np.int64)  # c = "no class of the space"
    for i, p in enumerate(greedy):
        if p.drg is not None and p.drg in space:
            pred[i] = space.index(p.drg)
            probs[i, pred[i]] = 1.0
    gold_index = np.array([space.index(g) if g in space else -1 for g in gold], dtype=np.int64)
    metrics = score_predictions(space, probs, gold_index)
    answers = score_answers(greedy, gold, space.version, sampled)
    metrics.update(answers)
    metrics["top1"] = answers["pass1_greedy"]
    for key in ("base_acc", "severity_acc", "mdc_acc"):
        metrics[key] = answers[f"answer_{key}"]
    gold_ext = np.where(gold_index < 0, c + 1, gold_index)  # unseen gold DRGs: their own column, never predicted
    present = f1_scores(pred, gold_ext, c + 2)
    metrics["macro_f1_present"] = present["macro_f1_present"]
    metrics["micro_f1"] = present["micro_f1"]
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# The LightningModule


class DRGReasoner(L.LightningModule):
    """Generative MS-DRG reasoner over a causal LM with LoRA: SFT cold start and GRPO.

    Args:
        backbone: Which causal LM to load and how to adapt it (LoRA rank, dtype, quantisation…).
        label_space: Classes of the run (for the classifier-style metrics); linked from ``data.label_space``.
        stage: ``sft`` (teacher forcing on the data module's targets) or ``grpo`` (sampling + rewards).
        init_adapter: LoRA adapter folder to start from (the SFT run's ``adapter/``, or the run folder itself).
        init_adapter_mode: ``merge`` it into the base and train a fresh LoRA (reference = adapter disabled), or
            ``continue`` training it (reference = a frozen copy, kept only when ``grpo.beta`` > 0).
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps, then constant.
        generation: Completion budget and evaluation sampling (``GenerationConfig``).
        grpo: The GRPO step (``GRPOConfig``); unused by SFT.
        rewards: Reward functions and weights (``RewardConfig``).
        seed: Seed of sampling (training, and the validation samples' fixed draws).
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        label_space: LabelSpace | dict | None = None,
        stage: Literal["sft", "grpo"] = "sft",
        init_adapter: str | None = None,
        init_adapter_mode: Literal["merge", "continue"] = "merge",
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        generation: GenerationConfig = GenerationConfig(),
        grpo: GRPOConfig = GRPOConfig(),
        rewards: RewardConfig = RewardConfig(),
        seed: int = 0,
    ):
        super().__init__()
        if label_space is None:
            raise ValueError("DRGReasoner needs a label space; it comes from the data module (data.label_space).")
        if isinstance(label_space, dict):
            label_space = LabelSpace.from_dict(label_space)
        if stage not in ("sft", "grpo"):
            raise UserError(f"stage must be 'sft' or 'grpo', got {stage!r}")
        if init_adapter_mode not in ("merge", "continue"):
            raise UserError(f"init_adapter_mode must be 'merge' or 'continue', got {init_adapter_mode!r}")
        self.label_space = label_space
        self.backbone_config = _settings(BackboneConfig, backbone)
        self.generation_config = _settings(GenerationConfig, generation)
        self.grpo_config = _settings(GRPOConfig, grpo)
        self.reward_config = _settings(RewardConfig, rewards)
        self.version = label_space.version
        self.save_hyperparameters(ignore=["backbone", "label_space", "generation", "grpo", "rewards"])
        # Plain values only: a checkpoint's hyper-parameters load with the safe unpickler (weights_only).
        self.hparams.update(
            backbone=asdict(self.backbone_config),
            label_space=label_space.to_dict(),
            generation=asdict(self.generation_config),
            grpo=asdict(self.grpo_config),
            rewards=asdict(self.reward_config),
            # absolute, so evaluate/predict can rebuild the model from any working directory
            init_adapter=str(Path(init_adapter).expanduser().resolve()) if init_adapter else None,
        )
        self.model, self.tokenizer = self._build_model(self.backbone_config, init_adapter, init_adapter_mode)
        self.model.train()  # from_pretrained returns eval mode, which would silently disable LoRA dropout
        self.reference = None
        beta = self.grpo_config.beta
        if stage == "grpo" and beta > 0 and init_adapter and init_adapter_mode == "continue":
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.automatic_optimization = stage == "sft"
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self.rewards = [REWARD_FUNCTIONS[name] for name in self.reward_config.functions]
        self._stop = answer_stop(self.tokenizer)
        self._eval: list[dict] = []
        self.last_eval: dict[str, Any] = {}

    @staticmethod
    def _build_model(cfg: BackboneConfig, init_adapter: str | None, mode: str):
        if not init_adapter:
            return build_causal_lm_backbone(cfg)
        from peft import LoraConfig, PeftModel, get_peft_model

        folder = adapter_folder(init_adapter)
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"init_adapter {init_adapter} holds no adapter_config.json; pass the SFT run's adapter/ folder"
            )
        base, tokenizer = build_causal_lm_backbone(replace(cfg, lora_r=0))
        if mode == "continue":
            model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
            keep_trainable_fp32(model)
            return model, tokenizer
        if cfg.quantization is not None:
            raise UserError("a quantized base cannot absorb a merged adapter; use init_adapter_mode: continue")
        merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
        if cfg.lora_r == 0:
            return merged, tokenizer
        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
        )
        model = get_peft_model(merged, lora)
        keep_trainable_fp32(model)
        return model, tokenizer

    @property
    def init_adapter(self) -> Path | None:
        """The PEFT adapter folder training started from (None: a fresh LoRA on the base)."""
        recorded = self.hparams.init_adapter
        return adapter_folder(recorded) if recorded else None

    # ----------------------------------------------------------------------------------------------------------
    # SFT

    def sft_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the completion tokens of a left-padded batch (prompt and padding are -100)."""
        return sft_loss(self.model, batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        if self.hparams.stage == "sft":
            loss = self.sft_loss(batch)
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
            return loss
        self.grpo_step(batch)
        return None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Teacher-forced loss of the gold target: cheap, and shows whether GRPO drifts from the SFT behaviour.
        if "labels" in batch:
            self.log("val/loss", self.sft_loss(batch), prog_bar=True, batch_size=batch["input_ids"].shape[0])
        # Greedy answers on the same fixed notes at every check: the held-out reward curve. GRPO's training reward
        # is measured on new prompts each step, so it moves with which notes were drawn as much as with the policy.
        # Samples (val_samples) use the training temperature and a generator re-seeded at every check: the same
        # random draws each time, so a change between checks is the policy's, not the dice's.
        if batch_idx == 0:
            self._val_rng = torch.Generator(device=self.device).manual_seed(self.hparams.seed + 2_000)
        samples, temperature = self.generation_config.val_samples, self.grpo_config.temperature
        self._collect(batch, samples, temperature=temperature, generator=self._val_rng)

    def on_validation_epoch_end(self) -> None:
        metrics = self._summarise()
        if metrics is None:
            return
        for key in (k for k in VAL_METRICS if k in metrics):
            self.log(f"val/{key}", metrics[key], prog_bar=key == "reward_greedy", sync_dist=True)
        # The logger's step column is one behind during fit and 0 for a validate before fit: plot against this.
        self.log("val/optimizer_steps", float(self.global_step), sync_dist=True)

    # ----------------------------------------------------------------------------------------------------------
    # GRPO

    def _generator(self) -> torch.Generator:
        if not hasattr(self, "_rng"):
            self._rng = torch.Generator(device=self.device).manual_seed(self.hparams.seed + 1_000 * self.global_rank)
        return self._rng

    def _reference_logps(self, *args) -> torch.Tensor:
        if self.reference is not None:
            return group_log_probs(self.reference, *args)
        with self.model.disable_adapter():  # base (+ merged SFT adapter) = the reference policy
            return group_log_probs(self.model, *args)

    def score(
        self, texts: list[str], gold: list[int], ids: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The run's rewards of completions: per function ``[N, F]`` and weighted ``[N]`` (training and evaluation)."""
        ids = ids if ids is not None else self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        columns = {"drg_code": gold, "drg_version": [self.version] * len(gold)}
        per_fn = reward_table(self.rewards, [None] * len(texts), texts, ids, columns)
        return per_fn, combine_rewards(per_fn, self.reward_config.weight_tensor)

    def grpo_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One GRPO step on a batch of prompts: sample, score, advantages, clipped loss, optimizer step(s)."""
        hp = self.grpo_config
        g, temperature = hp.num_generations, hp.temperature
        self.model.eval()  # no dropout while sampling
        sample = sample_completions(
            self.model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            g,
            self.generation_config.max_new_tokens,
            temperature,
            self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id,
            self._generator(),
            stop=self._stop,
        )
        self.model.train()
        comp_ids, comp_mask = sample["completion_ids"], sample["completion_mask"]  # [B*G, C]
        ids_list = [row[m.bool()].tolist() for row, m in zip(comp_ids, comp_mask)]
        texts = self.tokenizer.batch_decode(ids_list, skip_special_tokens=True)
        per_fn, rewards = self.score(texts, batch["drg_code"].repeat_interleave(g).tolist(), ids_list)
        advantages, zero_std = group_advantages(rewards, g, hp.scale_rewards)
        advantages = advantages.to(self.device)

        n_tokens = comp_mask.sum().float()
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            # Normalise by the mean token count per rank so that DDP's gradient average equals sum / global tokens.
            n_tokens = self.trainer.strategy.reduce(n_tokens, reduce_op="sum") / world
        # Micro-batches hold whole groups, so each prompt is prefilled once per forward (group_log_probs).
        per_micro = max(1, hp.micro_batch_size // g)
        prompts = [slice(i, i + per_micro) for i in range(0, batch["prompt_ids"].shape[0], per_micro)]
        slices = [(p, slice(p.start * g, p.stop * g)) for p in prompts]  # (prompt rows, completion rows)

        def args(p: slice, c: slice) -> tuple:
            return batch["prompt_ids"][p], batch["prompt_mask"][p], comp_ids[c], comp_mask[c], temperature

        old, ref = None, None
        with torch.no_grad():
            if hp.iterations > 1:
                old = torch.cat([group_log_probs(self.model, *args(p, c)) for p, c in slices])
            if hp.beta > 0:
                ref = torch.cat([self._reference_logps(*args(p, c)) for p, c in slices])
        opt = self.optimizers()
        scheduler = self.lr_schedulers()
        totals = {"loss": 0.0, "tokens": 0.0, "clipped": 0.0, "kl_sum": 0.0, "logp_sum": 0.0}
        for _ in range(hp.iterations):
            for p, c in slices:
                logps = group_log_probs(self.model, *args(p, c))  # [m*G, C]
                terms = clipped_token_loss(
                    logps,
                    old[c] if old is not None else logps.detach(),
                    advantages[c],
                    comp_mask[c],
                    hp.epsilon_low,
                    hp.epsilon_high,
                    ref[c] if ref is not None else None,
                    hp.beta,
                    num_tokens=n_tokens,
                )
                self.manual_backward(terms["loss"])
                for key in ("loss", "tokens", "clipped", "kl_sum"):
                    totals[key] += float(terms[key].detach())
                totals["logp_sum"] += float((logps.detach() * comp_mask[c]).sum())
            if hp.max_grad_norm > 0:
                self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()

        lengths = comp_mask.sum(1).float()
        tokens = max(totals["tokens"], 1.0)
        stats = {
            "reward": float(torch.nanmean(rewards)),
            "reward_std": float(nanstd(rewards)) if rewards.numel() > 1 else 0.0,
            "frac_reward_zero_std": float(zero_std.float().mean()),
            "completion_length": float(lengths.mean()),
            "truncated_fraction": float(sample["truncated"].float().mean()),
            "clip_ratio": totals["clipped"] / tokens,
            "kl": totals["kl_sum"] / tokens,
            "loss": totals["loss"] / hp.iterations,
            # Collapse shows here before it shows in the reward: the policy's per-token entropy (estimated by the
            # sampled tokens' -log p) falls and every prompt gets the same answer.
            "entropy": -totals["logp_sum"] / tokens,
            **answer_diversity([parse_answer(t, self.version).drg for t in texts], g),
        }
        for name, column in zip(self.reward_config.functions, per_fn.T):
            stats[f"rewards/{name}"] = float(torch.nanmean(column)) if not torch.isnan(column).all() else math.nan
        size = batch["prompt_ids"].shape[0]
        for key, value in stats.items():
            self.log(f"train/{key}", value, prog_bar=key == "reward", batch_size=size)
        return stats

    # ----------------------------------------------------------------------------------------------------------
    # generation for evaluation and prediction

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        samples: int = 0,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[str], list[list[str]]]:
        """Greedy completion per prompt, and ``samples`` sampled ones (shared prefill), as text."""
        was_training = self.model.training
        self.model.eval()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        args = (self.model, prompt_ids.to(self.device), prompt_mask.to(self.device))

        def decode(out: dict[str, torch.Tensor]) -> list[str]:
            rows = [r[m.bool()].tolist() for r, m in zip(out["completion_ids"], out["completion_mask"])]
            return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

        limit, stop = self.generation_config.max_new_tokens, self._stop
        greedy = decode(sample_completions(*args, 1, limit, 0.0, eos, pad, stop=stop))
        sampled: list[list[str]] = [[] for _ in greedy]
        if samples > 0:
            temp = self.generation_config.eval_temperature if temperature is None else temperature
            rng = generator if generator is not None else self._generator()
            out = decode(sample_completions(*args, samples, limit, temp, eos, pad, rng, stop=stop))
            sampled = [out[i * samples : (i + 1) * samples] for i in range(len(greedy))]
        self.model.train(was_training)
        return greedy, sampled

    def _collect(self, batch: dict[str, torch.Tensor], samples: int, **sampling: Any) -> None:
        """Generate for an evaluation batch and keep gold + completions (in memory only) for ``_summarise``."""
        greedy, sampled = self.generate(batch["prompt_ids"], batch["prompt_mask"], samples, **sampling)
        for i, row in enumerate(batch["row"].tolist()):
            self._eval.append(
                {"row": row, "gold": int(batch["drg_code"][i]), "greedy": greedy[i], "sampled": sampled[i]}
            )

    def _summarise(self) -> dict[str, float] | None:
        """Metrics of the collected completions (``generation_metrics`` + held-out rewards); sets ``last_eval``."""
        if not self._eval:
            return None
        rows = sorted(self._eval, key=lambda r: r["row"])
        self._eval = []
        _, first = np.unique([r["row"] for r in rows], return_index=True)  # DDP padding repeats rows
        rows = [rows[i] for i in first]
        greedy = [parse_answer(r["greedy"], self.version) for r in rows]
        sampled = [[parse_answer(t, self.version) for t in r["sampled"]] for r in rows] if rows[0]["sampled"] else None
        gold = [r["gold"] for r in rows]
        metrics = generation_metrics(self.label_space, greedy, gold, sampled)
        # The training reward on held-out notes: whether what GRPO optimised carries over beyond its prompts.
        metrics["reward_greedy"] = float(torch.nanmean(self.score([r["greedy"] for r in rows], gold)[1]))
        if sampled is not None:
            k = len(rows[0]["sampled"])
            texts = [t for r in rows for t in r["sampled"]]
            metrics["reward_sampled"] = float(torch.nanmean(self.score(texts, [g for g in gold for _ in range(k)])[1]))
        self.last_eval = {"metrics": metrics, "rows": rows, "greedy": greedy, "sampled": sampled}
        return metrics

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._collect(batch, self.generation_config.eval_samples)

    def on_test_epoch_end(self) -> None:
        metrics = self._summarise()
        if metrics is None:
            return
        for key in SUMMARY_METRICS:
            if key in metrics:
                self.log(f"test/{key}", metrics[key], sync_dist=True)

    # ----------------------------------------------------------------------------------------------------------
    # optimisation and checkpoints

    def setup(self, stage: str) -> None:
        check_training_setup(self.trainer, self, self.backbone_config, stage, generative=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep_trainable_tensors(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_trainable_tensors(self, checkpoint)

    def save_adapter(self, folder: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the LoRA adapter as safetensors (PEFT layout); ``state_dict`` as for ``DRGClassifier.save_adapter``."""
        save_adapter(self, "model", folder, state_dict)


__all__ = [
    "SUMMARY_METRICS",
    "VAL_METRICS",
    "DRGReasoner",
    "GRPOConfig",
    "GenerationConfig",
    "RewardConfig",
    "generation_metrics",
    "sft_loss",
]
