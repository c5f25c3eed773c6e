"""Prefix reuse (`kv_slots.KVSlots`): a prompt that shares a prefix of token ids with a sequence the
KV cache still holds prefills only the rest, and what it computes equals a fresh run's. The oracle
is the stateless forward pass (`Model.logits`, no KV cache) over the whole sequence."""

from __future__ import annotations

import pytest
import torch

import offload_moe
from offload_moe.api.chat_session import ChatSession
from offload_moe.model.kv_slots import KVSlots, shared_prefix
from offload_moe import Placement

TURNS = ["Speak, what news?", "Who comes here?", "What say you, my lord?", "Is the king dead?",
         "Then let us go."]


@pytest.fixture(scope="module")
def demo():
    return offload_moe.load(dtype=torch.float32)


@pytest.fixture(scope="module")
def quantized_demo(tmp_path_factory):
    dst = tmp_path_factory.mktemp("q") / "demo-int4"
    offload_moe.quantize(offload_moe.load().path, dst, experts="int4", attention="int8", group_size=32,
                         method="rtn")
    return offload_moe.load(dst)


def oracle_logprobs(model, ids: list[int], first: int) -> torch.Tensor:
    """log-softmax of the stateless forward at positions first-1.., (the distributions of ids[first:])."""
    logits = model.logits(torch.tensor([ids]))[0]                      # (T, V)
    return torch.log_softmax(logits[first - 1:-1], dim=-1)


@pytest.mark.parametrize("which", ["demo", "quantized_demo"])
def test_five_chat_turns_prefill_only_their_new_tokens(which, request):
    model = request.getfixturevalue(which)
    session = ChatSession(model, temperature=0, max_new_tokens=12)
    before: list[int] = []                  # the previous turn's prompt and reply ids
    for n, text in enumerate(TURNS):
        turn = session.send(text)
        "".join(turn)
        g = turn.result.stats["generation"]
        new = len(turn.prompt_ids) - shared_prefix(turn.prompt_ids, before)
        assert g["prefill_tokens"] + g["reused_tokens"] == len(turn.prompt_ids)
        if n == 0:
            assert g["reused_tokens"] == 0
        else:  # the new tokens, and at most the reply's last token (generated, never fed back)
            assert new <= g["prefill_tokens"] <= new + 1, (n, g, new)
            assert g["prefill_tokens"] < len(turn.prompt_ids) // 2
        before = turn.prompt_ids + turn.result.token_ids


def test_reused_logits_equal_a_fresh_forward(demo):
    """Greedy tokens and every token's log-probabilities with reuse equal the stateless oracle's."""
    system = demo.chat_ids([{"role": "user", "content": "Good morrow, sir. What news from the court?"}])
    first = demo.generate(system, max_new_tokens=8, temperature=0, ignore_eos=True)
    follow = system + first.token_ids + demo.encode_prompt(" And what of the king?")
    again = demo.generate(follow, max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    g = again.stats["generation"]
    assert g["reused_tokens"] == len(system) + len(first.token_ids) - 1
    ids = follow + again.token_ids
    expected = oracle_logprobs(demo, ids, len(follow))                 # (8, V)
    assert again.token_ids == expected.argmax(-1).tolist()
    got = torch.tensor([e["logprob"] for e in again.logprobs])
    want = expected.gather(-1, torch.tensor(again.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_a_kept_sequence_comes_back_after_another_prompt(demo):
    """A, then an unrelated B in the only slot, then A again: A's cache was kept and is restored."""
    a = demo.encode_prompt("ROMEO. What light through yonder window breaks? It is the east,")
    b = demo.encode_prompt("HAMLET. To be, or not to be, that is the question.")
    demo.generate(a, max_new_tokens=4, temperature=0)
    demo.generate(b, max_new_tokens=4, temperature=0)
    assert demo.transformer.kv_slots.stats()["kept_sequences"] >= 1
    out = demo.generate(a + demo.encode_prompt(" and Juliet"), max_new_tokens=6, temperature=0, logprobs=0)
    assert out.stats["generation"]["reused_tokens"] >= len(a)
    ids = a + demo.encode_prompt(" and Juliet") + out.token_ids
    expected = oracle_logprobs(demo, ids, len(ids) - len(out.token_ids))
    assert out.token_ids == expected.argmax(-1).tolist()


def test_the_same_prompt_twice_prefills_its_last_token(demo):
    ids = demo.encode_prompt("KING. Now is the winter of our discontent")
    one = demo.generate(ids, max_new_tokens=5, temperature=0)
    two = demo.generate(ids, max_new_tokens=5, temperature=0)
    assert two.stats["generation"]["prefill_tokens"] == 1
    assert one.token_ids == two.token_ids


def test_kept_sequences_stay_within_the_byte_budget(demo):
    slots = KVSlots(demo.transformer.kv_caches, keep_bytes=0)
    per = slots.position_bytes
    slots.keep_bytes = 40 * per
    for n in range(5):   # five unrelated 15-token sequences through one slot: at most two fit
        slot, lease, _ = slots.claim([100 + n] * 15)
        slots.wrote(slot, lease, [100 + n] * 15)
        slots.release(slot, lease)
    assert slots.kept_bytes <= slots.keep_bytes
    assert [key[0] for key in slots.kept] == [102, 103]                # least recently used out first


def test_an_abandoned_generation_cannot_write_into_the_next_ones_cache(demo):
    ids = demo.encode_prompt("KING. Now is the winter of our discontent")
    abandoned = demo.stream(ids, max_new_tokens=20, temperature=0)
    next(abandoned)
    demo.generate(demo.encode_prompt("HAMLET. To be"), max_new_tokens=3, temperature=0)
    with pytest.raises(offload_moe.OffloadMoeError, match="abandoned"):
        list(abandoned)


def test_context_shift_moves_keys_to_their_new_positions(demo):
    """Drop a stretch from the middle of a cached sequence: layer 0's keys and values (which depend
    on each token and its position only) equal those of a fresh prefill of the shortened sequence."""
    model = demo.transformer
    model.kv_slots.clear()
    head = demo.encode_prompt("KING. Now is the winter of our discontent")
    def encode(text):
        return demo.tokenizer.encode(text, add_special_tokens=False)

    middle = encode(" made glorious summer by this sun of York; and all the clouds")
    tail = encode(" that loured upon our house in the deep bosom of the ocean buried.")
    demo.generate(head + middle + tail, max_new_tokens=1, temperature=0)
    more = encode(" Now")
    shifted = demo.generate(head + tail + more, max_new_tokens=3, temperature=0)
    g = shifted.stats["generation"]
    assert (g["reused_tokens"], g["prefill_tokens"]) == (len(head) + len(tail), len(more))
    k_shift = model.kv_caches[0].k[0, :, :len(head) + len(tail)].clone()
    v_shift = model.kv_caches[0].v[0, :, :len(head) + len(tail)].clone()
    model.kv_slots.clear()
    demo.generate(head + tail, max_new_tokens=1, temperature=0)
    torch.testing.assert_close(k_shift, model.kv_caches[0].k[0, :, :len(head) + len(tail)], rtol=0, atol=1e-5)
    torch.testing.assert_close(v_shift, model.kv_caches[0].v[0, :, :len(head) + len(tail)], rtol=0, atol=1e-6)


def test_a_chat_that_outgrows_the_context_keeps_prefilling_only_new_tokens(tmp_path):
    """A 160-token context: the session drops its oldest turns; the engine shifts the rest."""
    model = offload_moe.load(placement=Placement(context_length=160), dtype=torch.float32)
    session = ChatSession(model, system="Speak as a king.", temperature=0, max_new_tokens=16)
    shifted = 0
    for text in TURNS * 2:
        turn = session.send(text)
        "".join(turn)
        g = turn.result.stats["generation"]
        if turn.dropped_turns:
            shifted += 1
            assert g["prefill_tokens"] < len(turn.prompt_ids) // 3, g
    assert shifted >= 2
