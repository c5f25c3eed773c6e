"""Continuous batching (`batch.DecodeBatch`, the server's `--parallel`): requests decoded together give
each the greedy tokens it gets alone (the demo in fp32), with their own sampling, stops, logprobs
and cancellation; a batched decode step's logits match one-row steps'."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

import offload_moe
from offload_moe.generation.batch import DecodeBatch
from offload_moe.generation.generate import DecodeTiming, Sampling
from offload_moe.server import create_app
from serve_fixtures import running_server

PROMPTS = ["ROMEO. What light through yonder window breaks?", "HAMLET. To be, or not to be",
           "KING. Now is the winter of our discontent made glorious summer by this sun of York;",
           "Friends, Romans,", "MACBETH. Is this a dagger which I see before me, the handle toward my hand?"]
LENGTHS = [24, 9, 17, 30, 5]


@pytest.fixture(scope="module")
def demo():
    return offload_moe.load(dtype=torch.float32)


@pytest.fixture(scope="module")
def solo(demo):
    """Each prompt's greedy continuation, generated alone (a fresh cache: no reuse)."""
    out = []
    for prompt, n in zip(PROMPTS, LENGTHS):
        demo.transformer.kv_slots.clear()
        out.append(demo.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids)
    return out


def test_batched_step_logits_match_single_rows(demo):
    """Four sequences at different positions: one batched step against four one-row steps."""
    model = demo.transformer
    model.set_slots(4)
    try:
        ids = [demo.encode_prompt(p) for p in PROMPTS[:4]]
        last = []
        for slot, seq in enumerate(ids):
            model(torch.tensor([seq[:-1]]), start=0, slot=slot)
            last.append(seq[-1])
        positions = [len(seq) - 1 for seq in ids]
        batched = model.decode_rows(torch.tensor(last), list(range(4)), positions)          # (4, V)
        rows = torch.cat([model(torch.tensor([[t]]), start=p, slot=s)[:, -1]
                          for s, (t, p) in enumerate(zip(last, positions))])                 # (4, V)
        torch.testing.assert_close(batched, rows, rtol=0, atol=1e-4)
        assert batched.argmax(-1).tolist() == rows.argmax(-1).tolist()
    finally:
        model.set_slots(1)


def test_decode_batch_equals_solo_runs(demo, solo):
    """Five sequences of different lengths through three slots (two wait for a free one), the
    prompts prefilled in chunks of 4 tokens between decode steps."""
    model = demo.transformer
    model.set_slots(3)
    try:
        batch = DecodeBatch(model, prefill_chunk=4)
        waiting = list(range(len(PROMPTS)))
        got = {i: [] for i in waiting}
        steps_with_company = 0
        while waiting or batch.sequences:
            while waiting and not batch.full:
                i = waiting.pop(0)
                batch.add(demo.encode_prompt(PROMPTS[i]), LENGTHS[i], Sampling(temperature=0), DecodeTiming(),
                          owner=i)
            produced = batch.step()
            steps_with_company += len(produced) > 1
            for seq, token in produced:
                got[seq.owner].append(token)
                if seq.finished:
                    batch.remove(seq)
        assert [got[i] for i in range(len(PROMPTS))] == solo
        assert steps_with_company > 10
    finally:
        model.set_slots(1)


def test_concurrent_server_requests_equal_solo_runs(demo, solo):
    """Five concurrent requests (streamed and not, one with logprobs) to a server with --parallel 4."""
    app = create_app(demo, model_name="demo", parallel=4)
    results = {}

    def ask(url, i):
        body = {"model": "demo", "prompt": PROMPTS[i], "max_tokens": LENGTHS[i], "temperature": 0,
                "ignore_eos": True, "logprobs": 1 if i == 2 else None}
        body = {k: v for k, v in body.items() if v is not None}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        results[i] = r.json()

    with running_server(app) as url:
        threads = [threading.Thread(target=ask, args=(url, i)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(f"{url}/metrics").json()
    try:
        for i, ids in enumerate(solo):
            choice = results[i]["choices"][0]
            assert choice["text"] == demo.tokenizer.decode(ids), i
            assert results[i]["usage"]["completion_tokens"] == LENGTHS[i]
        assert len(results[2]["choices"][0]["logprobs"]["tokens"]) == LENGTHS[2]
        assert metrics["requests"]["served"] == len(PROMPTS)
        assert metrics["queue"]["parallel"] == 4
    finally:
        demo.transformer.set_slots(1)


def test_a_stop_string_and_a_cancelled_request_leave_the_others_running(demo, solo):
    model = demo.transformer
    model.set_slots(3)
    try:
        stopping = demo.start(PROMPTS[3], max_new_tokens=LENGTHS[3], temperature=0, ignore_eos=True,
                              stop=demo.tokenizer.decode(solo[3][2:4]))
        other = demo.start(PROMPTS[0], max_new_tokens=LENGTHS[0], temperature=0, ignore_eos=True)
        cancelled = demo.start(PROMPTS[2], max_new_tokens=LENGTHS[2], temperature=0, ignore_eos=True,
                               should_stop=lambda: len(cancelled.token_ids) >= 3)
        batch = DecodeBatch(model)
        for run in (stopping, other, cancelled):
            batch.add(run.ids, run.max_new_tokens, run.sampling, run.begin(), owner=run)
        while batch.sequences:
            for seq, token in batch.step():
                run = seq.owner
                run.push(token)
                if run.finish_reason is not None or seq.finished:
                    run.end()
                    batch.remove(seq)
        assert stopping.result.finish_reason == "stop"
        assert len(stopping.result.token_ids) < LENGTHS[3]
        assert other.result.token_ids == solo[0]
        assert cancelled.result.finish_reason == "cancelled"
        assert cancelled.result.token_ids == solo[2][:3]
    finally:
        model.set_slots(1)


@pytest.fixture(scope="module")
def demo_q8(tmp_path_factory):
    """The demo as a GGUF whose experts and attention are Q8_0: its experts have a C kernel entry, so a
    decode step's experts run through `decode_cpu.ExpertRows`' gather-and-compute calls."""
    from gguf import GGMLQuantizationType as T
    from gguf_fixtures import write_gguf

    path = write_gguf(offload_moe.__path__[0] + "/demo", tmp_path_factory.mktemp("q8") / "demo-q8.gguf",
                      experts=T.Q8_0, attention=T.Q8_0, embeddings=T.Q8_0)
    return offload_moe.load(str(path))


def test_gguf_batch_equals_solo_runs_through_the_c_expert_calls(demo_q8):
    """Four sequences in four slots, one batched C step per token (norms, attention, routers and
    each expert's rows in C): each gets its solo greedy tokens, and a step's logits are its rows'
    one-sequence logits up to the experts' summation order."""
    model = demo_q8.transformer
    solo = []
    for prompt, n in zip(PROMPTS[:4], LENGTHS[:4]):
        model.kv_slots.clear()
        solo.append(demo_q8.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids)
    model.set_slots(4)
    try:
        batch = DecodeBatch(model, prefill_chunk=64)
        for i in range(4):
            batch.add(demo_q8.encode_prompt(PROMPTS[i]), LENGTHS[i], Sampling(temperature=0), DecodeTiming(), owner=i)
        got = {i: [] for i in range(4)}
        while batch.sequences:
            for seq, token in batch.step():
                got[seq.owner].append(token)
                if seq.finished:
                    batch.remove(seq)
        assert [got[i] for i in range(4)] == solo
        used = [e for block in model.moe_blocks for e in block.experts.experts[block.layer] if e is not None]
        assert used and all(e.entry is not None for e in used)   # the experts ran through their C entry
    finally:
        model.set_slots(1)
