"""Sampling completions from a causal LM: one shared prefill per prompt, host checks every few tokens, static cache.

    from drg_llama.models.generation import answer_stop, sample_completions
    out = sample_completions(model, prompt_ids, prompt_mask, num_samples=8, max_new_tokens=48, temperature=0.7,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, stop=answer_stop(tok))

GRPO samples G completions per prompt at every step and evaluation samples greedy and k sampled answers per note, so
this loop is most of the reasoner's time:

* **Shared prefill.** Each prompt's KV cache is computed once and repeated G times along the batch
  (``DynamicCache.batch_repeat_interleave``): the prefill costs B forwards, not B*G.
* **Few host syncs.** eos is tracked on the device; the host looks at the rows every ``CHECK_EVERY`` tokens (stop
  tags, all rows done, non-finite logits). Completions still end at their exact token.
* **NaN guard.** Non-finite logits never reach ``torch.multinomial`` (a device-side assert on a GPU poisons the
  process); the next check raises ``NonFiniteLogitsError``.
* **Static cache and CUDA graphs.** ``StaticDecoder`` decodes over a preallocated cache and 4-D mask, and on a CUDA
  device replays each decode step as one CUDA graph.

Sampling stops at ``</answer>`` (``AnswerStop``): nothing after it is read by the parser (``drg.answers``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import torch

from drg_llama.drg.answers import answer_closed

logger = logging.getLogger(__name__)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding does not shift positions)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


#: Sampling checks on the host (stop tags, all rows done, non-finite logits) once per this many tokens: each check
#: is a device-to-host sync, and the GPU runs ahead between them. A row's completion still ends at the exact token.
CHECK_EVERY = 8


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or infinite logits while sampling."""


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    stop: AnswerStop | None = None,
    check_every: int = CHECK_EVERY,
    kv_cache: KVCacheMode = "auto",
) -> dict[str, torch.Tensor]:
    """Sample ``num_samples`` completions per prompt, prefilling each prompt once.

    The prompt's KV cache is computed for B rows and then repeated G times along the batch (row order
    ``[p0 s0, p0 s1, …, p1 s0, …]``, as ``repeat_interleave``), so the prefill costs B forwards, not B*G.

    The loop stays on the device: eos is detected on token ids, and the host looks at the rows only every
    ``check_every`` tokens (stop tags, whether every row is done, non-finite logits). A row that ended between two
    checks keeps being fed tokens until the next one; they are cut off, and since every row draws its own random
    numbers the other rows are unaffected, so the result equals checking after every token (``check_every=1``).
    Non-finite logits never reach ``torch.multinomial``: on a GPU that is a device-side assert that poisons the
    process; here the row samples from a uniform stand-in and the next check raises ``NonFiniteLogitsError``.

    Args:
        model: Causal LM (PEFT-wrapped or plain), in eval mode (gradient checkpointing drops the KV cache in
            training mode).
        prompt_ids: ``[B, P]`` left-padded prompts.
        prompt_mask: ``[B, P]``.
        num_samples: G completions per prompt.
        max_new_tokens: Completion budget; rows still running then are ``truncated``.
        temperature: Sampling temperature; 0 means greedy.
        eos_token_id: Ends a completion (kept as its last token).
        pad_token_id: Written after a completion ended.
        generator: Optional RNG for reproducible sampling.
        stop: Optional ``AnswerStop``: rows end at the token that closes ``</answer>`` (nothing after it is read, so
            sampling it only costs time and drifts).
        check_every: Tokens between host checks (>= 1).
        kv_cache: ``dynamic`` (transformers' growing cache), ``static`` (``StaticDecoder``: preallocated cache and
            mask), ``graph`` (static, each decode step replayed as one CUDA graph), or ``auto``: ``graph`` on a CUDA
            device, else ``dynamic``. A static setup or graph capture that fails falls back with a warning.

    Returns:
        ``completion_ids`` [B*G, C], ``completion_mask`` [B*G, C] (1 up to and including eos or the stop),
        ``truncated`` [B*G] bool, ``first_logits`` [B*G, V] (the distribution of the first token, for tests);
        C is the longest completion.
    """
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    g = num_samples
    pos = positions(prompt_mask)  # [B, P]
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    if cache is None:
        raise RuntimeError("the model returned no KV cache; sample in eval mode (gradient checkpointing drops it)")
    cache.batch_repeat_interleave(g)  # [B, …] -> [B*G, …]: the shared prefill
    logits = out.logits[:, -1].float().repeat_interleave(g, dim=0)  # [B*G, V]
    first_logits = logits.clone()
    n, p, device = logits.shape[0], prompt_mask.shape[1], logits.device
    decoder = StaticDecoder.build(model, cache, prompt_mask.repeat_interleave(g, dim=0), max_new_tokens, kv_cache)
    if decoder is not None:
        out = cache = None  # the prompt's keys/values now live in the decoder's preallocated cache
    not_ended = max_new_tokens + 1
    mask = torch.ones((n, p + max_new_tokens), dtype=prompt_mask.dtype, device=device)  # [B*G, P+C], preallocated
    mask[:, :p] = prompt_mask.repeat_interleave(g, dim=0)
    tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)  # [B*G, C]
    ended = torch.full((n,), not_ended, dtype=torch.long, device=device)  # [B*G] completion length once ended
    non_finite = torch.zeros((), dtype=torch.bool, device=device)
    last = pos[:, -1].repeat_interleave(g, dim=0)  # [B*G]
    uniform = torch.full_like(logits[:1], 1.0 / logits.shape[-1])  # [1, V] stand-in for a non-finite row
    checked = 0  # tokens [0, checked) were seen by the host's stop check
    length = 0
    for step in range(max_new_tokens):
        if temperature > 0:
            probs = (logits / temperature).softmax(-1)  # a NaN/inf logit makes its row NaN
            bad = probs.isnan().any(-1, keepdim=True)  # [B*G, 1]
            nxt = torch.multinomial(torch.where(bad, uniform, probs), 1, generator=generator).squeeze(-1)
        else:
            bad = logits.isnan().any(-1, keepdim=True) | logits.isposinf().any(-1, keepdim=True)
            nxt = logits.argmax(-1)
        non_finite |= bad.any()
        live = ended == not_ended  # [B*G] as far as the device knows
        nxt = torch.where(live, nxt, torch.full_like(nxt, pad_token_id))
        tokens[:, step] = nxt
        ended = torch.where(live & (nxt == eos_token_id), step + 1, ended)
        length = step + 1
        if length % check_every == 0 or length == max_new_tokens:
            if bool(non_finite):
                raise NonFiniteLogitsError(
                    f"the model produced NaN or infinite logits at completion token {length}; its weights or inputs "
                    "have diverged (check the learning rate and train/loss, and use bf16-mixed rather than fp16)"
                )
            if stop is not None:
                ended = stop.end_rows(tokens, ended, not_ended, checked, length)
            checked = length
            if not bool((ended == not_ended).any()) or length == max_new_tokens:
                break
        last = last + 1
        if decoder is not None:
            logits = decoder.step(nxt, last, p + length - 1)
            continue
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask[:, : p + length],
            position_ids=last[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1].float()
    truncated = ended == not_ended
    lengths = torch.where(truncated, length, ended)  # [B*G]
    width = int(lengths.max()) if n else 0
    completion_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()  # [B*G, C]
    completion_ids = torch.where(completion_mask.bool(), tokens[:, :width], pad_token_id)
    return {
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "truncated": truncated,
        "first_logits": first_logits,
    }


KVCacheMode = Literal["auto", "dynamic", "static", "graph"]
#: Eager decode steps before a CUDA graph is captured (libraries allocate their workspaces on first use).
GRAPH_WARMUP_STEPS = 2


class StaticDecoder:
    """One decode step at a time over a preallocated KV cache and mask, optionally replayed as a CUDA graph.

    transformers' dynamic cache grows by concatenation and its 2-D mask is turned into a 4-D mask on every step;
    a 7B model's decode step then costs tens of kernel launches per layer issued from Python, several times the
    ~3.5 ms an H200 needs to read the weights once. Here the cache (``StaticCache``), the additive 4-D mask
    ``[N, 1, 1, P+C]`` and the input buffers have fixed addresses, so after ``GRAPH_WARMUP_STEPS`` eager steps the
    whole forward is captured once and each later token is one ``graph.replay()``. Sampling stays outside the
    graph. A graph lives for one ``sample_completions`` call, so weights updated between GRPO steps are read fresh.
    """

    def __init__(self, model: torch.nn.Module, cache, prompt_mask: torch.Tensor, max_new_tokens: int, graph: bool):
        from transformers import StaticCache

        layers = cache.layers
        dtype, device = layers[0].keys.dtype, layers[0].keys.device
        n, p = prompt_mask.shape
        self.cache = StaticCache(config=model.config, max_cache_len=p + max_new_tokens)
        for i, layer in enumerate(layers):
            self.cache.update(layer.keys, layer.values, i)  # the prompt's keys/values at positions [0, P)
        self.mask = torch.full((n, 1, 1, p + max_new_tokens), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.mask[:, 0, 0, :p].masked_fill_(prompt_mask.bool(), 0.0)  # [N, 1, 1, P+C], 0 where a key is visible
        self.ids = torch.zeros((n, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((n, 1), dtype=torch.long, device=device)
        self.model, self.use_graph, self.steps = model, graph, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None

    @classmethod
    def build(cls, model, cache, prompt_mask, max_new_tokens: int, mode: str) -> StaticDecoder | None:
        """The decoder ``mode`` asks for on this device (None: keep the dynamic cache)."""
        on_cuda = prompt_mask.device.type == "cuda"
        if mode == "dynamic" or (mode == "auto" and not on_cuda):
            return None
        try:
            return cls(model, cache, prompt_mask, max_new_tokens, graph=mode != "static" and on_cuda)
        except Exception as err:  # noqa: BLE001 - an unusual cache layout: the dynamic cache still works
            logger.warning(
                "static KV cache unavailable (%s: %s); decoding with the dynamic cache", type(err).__name__, err
            )
            return None

    def _forward(self) -> torch.Tensor:
        out = self.model(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1].float()  # [N, V]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, column: int) -> torch.Tensor:
        """Logits ``[N, V]`` after feeding ``tokens`` [N] at ``positions`` [N], written to cache slot ``column``.

        The returned tensor is overwritten by the next step when a graph is in use.
        """
        self.ids.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        self.mask[:, 0, 0, column] = 0.0  # the new token sees itself; later slots stay masked
        self.steps += 1
        # Autocast's cast cache would hand the graph copies made during capture: no caching while decoding.
        autocast = contextlib.nullcontext()
        if torch.is_autocast_enabled(self.ids.device.type):
            autocast = torch.autocast(self.ids.device.type, torch.get_autocast_dtype(self.ids.device.type), True, False)
        with autocast:
            if not self.use_graph:
                return self._forward()
            if self.graph is None:
                if self.steps <= GRAPH_WARMUP_STEPS:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        logits = self._forward()
                    torch.cuda.current_stream().wait_stream(side)
                    return logits
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        self.graph_logits = self._forward()  # recorded, not run: the cache does not move here
                    self.graph = graph
                except Exception as err:  # noqa: BLE001 - a kernel that cannot be captured: stay eager
                    logger.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(err).__name__, err)
                    self.use_graph = False
                    return self._forward()
            self.graph.replay()
            return self.graph_logits


class AnswerStop:
    """Ends sampled rows at the token that closes ``</answer>`` (the reasoner's output reads nothing after it).

    It reads decoded text, not token ids, because ``</answer>`` tokenizes differently after different words.
    ``sample_completions`` calls ``end_rows`` every few tokens; it decodes only the new tokens of the rows still
    running, plus ``lookback`` tokens before them (twice the tag's own token count, room for the spaced and cased
    variants the parser accepts), and, for the rare row that closed the tag, finds the exact token.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lookback = 2 * len(tokenizer("</answer>", add_special_tokens=False)["input_ids"]) + 2

    def first_close(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, t]`` token windows -> ``[N]`` long: each row's shortest prefix that closes the tag, 0 if none does."""
        rows = tokens.tolist()
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)

        def closes(row: list[int], t: int) -> bool:
            return answer_closed(self.tokenizer.decode(row[:t], skip_special_tokens=True))

        found = [
            next(t for t in range(1, len(row) + 1) if closes(row, t)) if answer_closed(text) else 0
            for row, text in zip(rows, texts)
        ]
        return torch.tensor(found, dtype=torch.long)

    def end_rows(
        self, tokens: torch.Tensor, ended: torch.Tensor, not_ended: int, checked: int, length: int
    ) -> torch.Tensor:
        """``ended`` with the running rows that closed the tag in tokens ``[checked, length)`` set to their length."""
        running = (ended == not_ended).nonzero().squeeze(-1)  # [k]
        if running.numel() == 0:
            return ended
        start = max(0, checked - self.lookback)
        close = self.first_close(tokens[running, start:length]).to(ended.device)  # [k]
        return ended.index_put((running,), torch.where(close > 0, start + close, ended[running]))


def answer_stop(tokenizer) -> AnswerStop:
    """The stop rule of the reasoner's sampling: end at ``</answer>``."""
    return AnswerStop(tokenizer)


__all__ = [
    "CHECK_EVERY",
    "AnswerStop",
    "KVCacheMode",
    "NonFiniteLogitsError",
    "StaticDecoder",
    "answer_stop",
    "positions",
    "sample_completions",
]
