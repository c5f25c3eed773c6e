"""The hybrid linear-attention families (Qwen3-Next, Qwen3.5-MoE) beyond test_families: several seeds
over sequences that cross the DeltaNet's 64-token chunks, a prompt prefilled in pieces against one
pass, the recurrent state through prefix reuse and continuous batching, and the chunked delta rule
against the token-by-token one in float64."""

from __future__ import annotations

import pytest
import torch

import offload_moe
from offload_moe.batch import DecodeBatch
from offload_moe.generate import DecodeTiming, Sampling
from offload_moe.kv_slots import KVSlots
from offload_moe.linear_attention import chunked_delta_rule, l2norm, recurrent_delta_rule
from test_families import PROMPT, greedy_tokens, tiny_model

HYBRID = ["qwen3_next", "qwen3_5_moe"]
MODES = {"resident": {}, "offloaded": {"cache_slots": 2}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(family, seed) -> (directory, transformers model), built once."""
    made = {}

    def get(name: str, seed: int):
        if (name, seed) not in made:
            model = tiny_model(name, seed)
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(d)
            made[(name, seed)] = d, model
        return made[(name, seed)]
    return get


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", HYBRID)
def test_seeds_over_several_delta_chunks_match_transformers(saved, name, seed, mode):
    """120 tokens: two of the chunked form's 64-token chunks, the second from the state the first left."""
    directory, reference = saved(name, seed)
    model = offload_moe.load(directory, device="cpu", **MODES[mode])
    x = ids(2, 120, seed)
    with torch.no_grad():
        expected = reference(x).logits
    assert (model.logits(x) - expected).abs().max().item() <= 1e-4
    assert model.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == \
        greedy_tokens(reference)


@pytest.mark.parametrize("name", HYBRID)
def test_prefill_in_pieces_matches_transformers_in_pieces(saved, name):
    """A 120-token prompt fed in pieces of 37 through the cache (the pieces end inside the DeltaNet's
    64-token chunks and past them; the full-attention layers read their KV cache): every position's
    logits within 1e-4 of transformers fed the same pieces through its cache, and the same argmax as one
    pass. (These random models amplify fp32 rounding: transformers' own pieces differ from its one pass
    by up to ~1e-3 on some seeds, so pieces against one pass is checked exactly, in float64, below.)"""
    from transformers import DynamicCache

    directory, reference = saved(name, 1)
    model = offload_moe.load(directory, device="cpu")
    x = ids(1, 120)
    cache = DynamicCache(config=reference.config)
    with torch.no_grad():
        expected = torch.cat([reference(x[:, s:s + 37], cache=cache, use_cache=True).logits[0]
                              for s in range(0, 120, 37)])              # (120, V)
    pieces = torch.cat([model.transformer(x[:, s:s + 37], start=s, slot=0)[0] for s in range(0, 120, 37)])
    assert (pieces - expected).abs().max().item() <= 1e-4
    assert pieces.argmax(-1).tolist() == model.logits(x)[0].argmax(-1).tolist()


@pytest.mark.parametrize("name", HYBRID)
def test_deltanet_layer_in_pieces_equals_one_pass_in_float64(saved, name):
    """One Gated DeltaNet layer in float64: pieces of 1, 5 and 37 tokens through its `RecurrentState`
    (convolution inputs and delta-rule state carried over) give the one pass's output."""
    from offload_moe.config import ModelConfig
    from offload_moe.linear_attention import GatedDeltaNet, RecurrentState

    directory, reference = saved(name, 1)
    cfg = ModelConfig.load(directory)
    layer = GatedDeltaNet(cfg).double()
    layer.load_state_dict({k: v.double() for k, v in reference.model.layers[0].linear_attn.state_dict().items()})
    x = torch.randn(1, 90, cfg.hidden_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        whole = layer(x, None, None, None, None, 0)                   # (1, 90, H)
        for piece in (1, 5, 37):
            state = RecurrentState(1, cfg, "cpu", torch.float64)
            out = torch.cat([layer(x[:, s:s + piece], None, None, None, state, s) for s in range(0, 90, piece)], dim=1)
            torch.testing.assert_close(out, whole, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", HYBRID)
def test_prefix_reuse_continues_the_state_or_starts_over(saved, name):
    """A prompt that extends everything a slot holds continues from its state; one that shares only part
    of it cannot (a recurrent state is not cut back) and is prefilled from position 0. Both give the
    tokens of a fresh cache."""
    directory, _ = saved(name, 1)
    model = offload_moe.load(directory, device="cpu")
    first = model.generate(PROMPT, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    cases = {"extends": (PROMPT + first + [7, 8], len(PROMPT) + 5), "diverges": (PROMPT[:3] + [9, 9, 9], 0)}
    for prompt, reused in cases.values():
        got = model.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids
        assert model.stats["generation"]["reused_tokens"] == reused
        model.transformer.kv_slots.clear()
        assert model.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids == got


@pytest.mark.parametrize("name", HYBRID)
def test_decode_batch_equals_solo_runs(saved, name):
    """Three sequences through two slots (one waits), prompts prefilled 4 tokens at a time between
    batched decode steps: each row's DeltaNet state is its own."""
    directory, _ = saved(name, 2)
    model = offload_moe.load(directory, device="cpu")
    prompts, lengths = [PROMPT, [1, 50, 51, 52, 53, 54, 55, 56, 57], [1, 9]], [10, 7, 12]
    solo = []
    for p, n in zip(prompts, lengths):
        model.transformer.kv_slots.clear()
        solo.append(model.generate(p, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids)
    model.transformer.set_slots(2)
    batch = DecodeBatch(model.transformer, prefill_chunk=4)
    waiting, got, together = list(range(3)), {i: [] for i in range(3)}, 0
    while waiting or batch.sequences:
        while waiting and not batch.full:
            i = waiting.pop(0)
            batch.add(prompts[i], lengths[i], Sampling(temperature=0), DecodeTiming(), owner=i)
        produced = batch.step()
        together += len(produced) > 1
        for seq, token in produced:
            got[seq.owner].append(token)
            if seq.finished:
                batch.remove(seq)
    assert [got[i] for i in range(3)] == solo
    assert together > 3


def test_a_slot_whose_state_a_failed_pass_touched_is_not_reused():
    slots = KVSlots([], recurrent=True)
    slots.ids[0] = [1, 2, 3]
    assert slots.claim([1, 2, 3, 4])[2] == 3
    slots.release(0, slots.lease[0])
    slots.stale.add(0)                     # a forward pass raised while writing slot 0
    assert slots.claim([1, 2, 3, 4])[2] == 0


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_chunked_delta_rule_equals_the_recurrence_in_float64(chunk):
    """From a nonzero state, over 37 tokens (a partial last chunk), 3 heads of (5, 7)."""
    g = torch.Generator().manual_seed(0)
    B, nv, T, dk, dv = 2, 3, 37, 5, 7
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)   # noqa: E731
    q, k = l2norm(rand(B, nv, T, dk)) * dk ** -0.5, l2norm(rand(B, nv, T, dk))
    v, state = rand(B, nv, T, dv), rand(B, nv, dk, dv)
    decay = -torch.rand(B, nv, T, generator=g, dtype=torch.float64) * 2
    beta = torch.rand(B, nv, T, generator=g, dtype=torch.float64)
    out, final = chunked_delta_rule(q, k, v, decay, beta, state, chunk)
    expected_out, expected_final = recurrent_delta_rule(q, k, v, decay, beta, state)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=1e-12)
