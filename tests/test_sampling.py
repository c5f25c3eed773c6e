"""Penalties and min-p against their reference definitions on fixed logits: transformers' logits
processors for repetition_penalty and min_p, OpenAI's formula (written out in float64) for presence
and frequency penalties; then the decode loop applying them, and the recorded log-probabilities."""

from __future__ import annotations

import pytest
import torch

from offload_moe.generation.generate import Sampling, Steering, decode_tokens, logits_to_probs, sample
from offload_moe.generation.penalties import LogprobRecord, TokenCounts, penalize
from offload_moe.model.kv_slots import KVSlots

V = 50


def fixed_logits(seed=0):
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


def counts_after(prompt, generated):
    counts = TokenCounts(V, prompt, torch.device("cpu"))
    for t in generated:
        counts.add(torch.tensor(t))
    return counts


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = fixed_logits()
    prompt, generated = [3, 7, 7, 11], [20, 3, 41]
    ours = penalize(logits, counts_after(prompt, generated), repetition_penalty=penalty)
    ids = torch.tensor([prompt + generated])
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()[None])[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.8), (1.5, -0.4), (-1.0, 2.0)])
def test_presence_and_frequency_penalties_follow_openai(presence, frequency):
    logits = fixed_logits(1)
    prompt, generated = [1, 2, 3], [5, 5, 5, 9, 2, 5, 9]
    ours = penalize(logits, counts_after(prompt, generated), presence_penalty=presence,
                    frequency_penalty=frequency)
    # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, c over sampled tokens
    expected = []
    for j, mu in enumerate(logits.double().tolist()):
        c = generated.count(j)
        expected.append(mu - c * frequency - float(c > 0) * presence)
    torch.testing.assert_close(ours.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("min_p, temperature", [(0.05, 1.0), (0.3, 0.7), (0.9, 1.5)])
def test_min_p_equals_transformers(min_p, temperature):
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper

    logits = fixed_logits(2)
    ours = logits_to_probs(logits, Sampling(temperature=temperature, top_p=1.0, min_p=min_p))
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone()[None])
    scores = MinPLogitsWarper(min_p)(None, scores)
    theirs = torch.softmax(scores, -1)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert (ours == 0).sum() > 0  # the cut removed something


def test_min_p_with_top_p_and_top_k_equals_transformers():
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = fixed_logits(3)
    ours = logits_to_probs(logits, Sampling(temperature=0.8, top_p=0.9, top_k=20, min_p=0.1))
    scores = logits.clone()[None]
    for warper in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(20), TopPLogitsWarper(0.9),
                   MinPLogitsWarper(0.1)):
        scores = warper(None, scores)
    torch.testing.assert_close(ours, torch.softmax(scores, -1)[0], rtol=1e-5, atol=1e-6)


class FixedModel:
    """A 'transformer' whose logits depend only on the last token: row `token` of a fixed table."""

    def __init__(self, table):
        self.table, self.device, self.max_seq_len = table, torch.device("cpu"), 64
        self.kv_slots = KVSlots([])
        self.calls = []

    def __call__(self, tokens, start, last_only=True, slot=None):
        return self.table[tokens[0, -1]][None, None]


def test_decode_loop_applies_penalties_as_the_reference_loop():
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(4)) * 4
    model = FixedModel(table)
    s = Sampling(temperature=0.0, repetition_penalty=1.8, presence_penalty=0.7, frequency_penalty=0.3)
    prompt = [4, 9, 4]
    ours = list(decode_tokens(model, prompt, 12, s))
    # reference: transformers' repetition penalty, then OpenAI's penalties, greedy
    from transformers import RepetitionPenaltyLogitsProcessor
    seq, out = list(prompt), []
    for _ in range(12):
        logits = RepetitionPenaltyLogitsProcessor(1.8)(torch.tensor([seq]), table[seq[-1]].clone()[None])[0]
        logits = logits - torch.tensor([out.count(j) * 0.3 + (out.count(j) > 0) * 0.7 for j in range(V)])
        t = int(torch.argmax(logits))
        seq.append(t)
        out.append(t)
    assert ours == out
    assert ours != list(decode_tokens(model, prompt, 12, Sampling(temperature=0.0)))  # the penalties mattered


def test_logprob_record_is_log_softmax_of_the_sampled_logits():
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(5))
    model = FixedModel(table)
    record = LogprobRecord(top=3)
    ids = list(decode_tokens(model, [1], 5, Sampling(temperature=1.0, seed=0), steer=Steering(logprobs=record)))
    prev = 1
    for token, entry in zip(ids, record.entries):
        expected = torch.log_softmax(table[prev].double(), -1)
        assert entry["token"] == token
        assert entry["logprob"] == pytest.approx(float(expected[token]), abs=1e-5)
        top = torch.topk(expected, 3)
        assert [i for i, _ in entry["top"]] == top.indices.tolist()
        prev = token


def test_one_generator_across_calls_differs_from_reseeding():
    logits = fixed_logits(6) / 4
    s = Sampling(temperature=1.0, top_p=1.0)
    g = torch.Generator().manual_seed(0)
    shared = [int(sample(logits, s, g)) for _ in range(8)]
    reseeded = [int(sample(logits, s, torch.Generator().manual_seed(0))) for _ in range(8)]
    assert len(set(reseeded)) == 1 and len(set(shared)) > 1
