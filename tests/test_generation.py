"""Sampling (drg_llama.models.generation) on tiny random models: shared prefill, stop at </answer>, host checks,
the NaN guard and the static cache."""

import pytest
import torch

from drg_llama.data.reasoner import left_pad
from drg_llama.models.backbone import BackboneConfig, build_causal_lm_backbone
from drg_llama.models.generation import NonFiniteLogitsError, answer_stop, positions, sample_completions
from drg_llama.models.grpo import token_log_probs

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


def full_forward_log_probs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    """The plain definition ``group_log_probs`` must equal: one forward of every (repeated) prompt + completion."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    c = completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=c + 1).logits
    return token_log_probs(logits[:, :-1], completion_ids, temperature)


def tiny_backbone(**kw) -> BackboneConfig:
    return BackboneConfig(name_or_path="random", random_init=TINY, tokenizer="byte", lora_r=4, lora_alpha=8, **kw)


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
    ids, mask = left_pad([[5, 6, 7]], 0)
    for temperature in (1.0, 0.0):
        with pytest.raises(NonFiniteLogitsError, match="NaN or infinite logits at completion token"):
            sample_completions(_RowScript([[9] * 20], nan_at=2), ids, mask, 2, 16, temperature, 1, 0, check_every=4)


class _StepCache:
    def batch_repeat_interleave(self, repeats):
        pass


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
