"""The CPU decode step's C calls (`decode_cpu.py`, `decode.c`) against the torch path they replace:
one token's attention (every family option: q/k norms per head and over the projection, clamp,
sinks, sliding window, grouped and plain heads, rotations of (i, i + d/2) and of (2i, 2i + 1) pairs), few-row
RMSNorm, the routers' top-k. fp32 agrees to float rounding; bf16 is at least as close to float64 math as the
torch path (it rounds once). A batched step's calls (several sequences, each in its own KV slot) give each row
the bits its one-sequence call gives."""

from types import SimpleNamespace

import pytest
import torch

from offload_moe.kernels import decode_step as decode_cpu
from offload_moe.model.attention import Attention, KVCache, RMSNorm
from offload_moe.model.moe import MoEBlock

pytestmark = pytest.mark.skipif(decode_cpu.native.load_decode() is None, reason="no C compiler for decode.c")

BF16_ULP = 2 ** -7   # one bf16 step at magnitude 1


def attention_config(nh, nkv, hd, qk_norm=None, clip=None, sinks=False, rope_pairs="half"):
    family = SimpleNamespace(qk_norm=qk_norm, attention_sinks=sinks, rope_interleaved=False,
                             attention_output_gate=False, norm_scale_fp32=False)
    return SimpleNamespace(family=family, qk_norm=qk_norm, rope_dim=hd, num_heads=nh, num_kv_heads=nkv, head_dim=hd,
                           hidden_size=48, qkv_bias=False, o_bias=False, clip_qkv=clip, rms_norm_eps=1e-5,
                           rope_pairs=rope_pairs, nope_layers=(), qk_l2_norm=False, attn_temperature=None)


def rotary(positions: int, hd: int, dtype):
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    freqs = torch.arange(positions).float()[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def randomise(module, g):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0) + (1.0 if "norm" in name else 0))


def attention_under_test(case: dict, dtype, g) -> tuple:
    """(config, an `Attention` with random weights in dtype, ready for the C step, its window) of a case."""
    case = dict(case)
    window = case.pop("window", None)
    cfg = attention_config(**case)
    attn = Attention(cfg, window)
    randomise(attn, g)
    attn = attn.to(dtype)
    attn.prepare_cpu_decode()
    return cfg, attn, window


ATTENTION_CASES = [
    dict(nh=8, nkv=2, hd=64),
    dict(nh=4, nkv=4, hd=16, qk_norm="head"),
    dict(nh=4, nkv=2, hd=8, qk_norm="full", clip=0.7),
    dict(nh=4, nkv=2, hd=40, sinks=True, window=5),
    dict(nh=6, nkv=3, hd=32, window=64),   # a window longer than the sequence: every key
    dict(nh=8, nkv=2, hd=64, rope_pairs="adjacent"),   # q/k rows in llama.cpp's order (a Mixtral GGUF)
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_attention_matches_the_torch_path(case, dtype):
    g = torch.Generator().manual_seed(0)
    cfg, attn, window = attention_under_test(case, dtype, g)
    S, prompt = 24, 11
    cos, sin = rotary(S, cfg.head_dim, dtype)
    cache = KVCache(1, cfg.num_kv_heads, S, cfg.head_dim, "cpu", dtype)
    step, attn.decode_step = attn.decode_step, None
    with torch.no_grad():
        attn(torch.randn(1, prompt, 48, generator=g).to(dtype), cos[:prompt], sin[:prompt],
             torch.ones(prompt, prompt).tril().bool(), cache, 0)                       # the prompt, torch path
        for pos in range(prompt, prompt + 3):
            x = torch.randn(1, 1, 48, generator=g).to(dtype)
            mask = (torch.arange(pos + 1) > pos - window)[None] if window and pos + 1 > window else None
            twin = KVCache(1, cfg.num_kv_heads, S, cfg.head_dim, "cpu", dtype)
            twin.k.copy_(cache.k), twin.v.copy_(cache.v)
            attn.decode_step = None
            torchs = attn(x, cos[pos:pos + 1], sin[pos:pos + 1], mask, twin, pos)
            attn.decode_step = step
            ours = attn(x, cos[pos:pos + 1], sin[pos:pos + 1], mask, cache, pos)
            exact = reference(attn.double(), x.double(), cos[:pos + 1].double(), sin[:pos + 1].double(), cache, pos,
                              window)
            attn.to(dtype)
            assert ours.dtype == dtype and ours.shape == torchs.shape
            if dtype == torch.float32:
                torch.testing.assert_close(ours, torchs, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(cache.k[:, :, :pos + 1], twin.k[:, :, :pos + 1], rtol=1e-5, atol=1e-6)
            else:
                scale = exact.abs().max().item()
                assert (ours.double() - exact).abs().max() <= (torchs.double() - exact).abs().max() + 2 * BF16_ULP * scale
                assert (cache.k[:, :, pos].double() - twin.k[:, :, pos].double()).abs().max() <= \
                    2 * BF16_ULP * twin.k[:, :, pos].double().abs().max()
            assert torch.equal(cache.v[:, :, pos], twin.v[:, :, pos])


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_attention_rows_equal_their_one_sequence_calls(case, dtype):
    """Three sequences of different lengths in slots 2, 0, 3 of a four-slot cache, one step in one call
    (q/k/v views of one fused projection): each row's output and cached key/value are the bits its
    own one-sequence call writes; slot 1 is untouched."""
    g = torch.Generator().manual_seed(3)
    cfg, attn, window = attention_under_test(case, dtype, g)
    S, slots, positions = 24, [2, 0, 3], [9, 3, 14]
    cos, sin = rotary(S, cfg.head_dim, dtype)
    cache = KVCache(4, cfg.num_kv_heads, S, cfg.head_dim, "cpu", dtype)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g)), cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    alone = KVCache(4, cfg.num_kv_heads, S, cfg.head_dim, "cpu", dtype)
    alone.k.copy_(cache.k), alone.v.copy_(cache.v)
    nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qkv = torch.randn(3, 1, nq + 2 * nkv, generator=g).to(dtype)
    q, k, v = qkv.split((nq, nkv, nkv), dim=-1)
    rows = decode_cpu.DecodeRows(4).set(slots, positions)
    ours = attn.decode_step.rows(q, k, v, cos, sin, cache, rows)
    assert ours is not None and ours.shape == (3, 1, nq)
    for b, (s, p) in enumerate(zip(slots, positions)):
        one = attn.decode_step(q[b:b + 1].contiguous(), k[b:b + 1].contiguous(), v[b:b + 1].contiguous(),
                               cos[p:p + 1], sin[p:p + 1], alone.slot_rows[s], p)
        assert torch.equal(ours[b:b + 1], one)
    assert torch.equal(cache.k, alone.k) and torch.equal(cache.v, alone.v)


def reference(attn, x, cos, sin, cache, pos, window):
    """The new token's attention output in float64 from the cached keys/values before `pos` (which
    both paths wrote alike up to rounding) and its own, through the torch path's ops."""
    hd, nkv = attn.hd, attn.nkv
    saved = KVCache(1, nkv, cache.k.shape[2], hd, "cpu", torch.float64)
    saved.k.copy_(cache.k), saved.v.copy_(cache.v)
    mask = (torch.arange(pos + 1) > pos - window)[None] if window and pos + 1 > window else None
    step, attn.decode_step = attn.decode_step, None
    y = attn(x, cos[pos:pos + 1], sin[pos:pos + 1], mask, saved, pos)
    attn.decode_step = step
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_fp32", [False, True])
def test_one_row_rmsnorm_matches_the_torch_path(dtype, scale_fp32):
    g = torch.Generator().manual_seed(1)
    for hidden in (8, 100, 1024):
        norm = RMSNorm(hidden, 1e-6, scale_fp32)
        norm.weight.data = (torch.randn(hidden, generator=g) + 1).to(dtype)
        x = (torch.randn(1, 1, hidden, generator=g) * 3).to(dtype)
        ours = decode_cpu.rms_norm_row(x, norm.weight, norm.eps, scale_fp32)
        torchs = norm(x.expand(decode_cpu.MAX_ROWS + 1, 1, hidden).contiguous())[:1]   # too many rows: torch
        assert ours is not None and ours.dtype == torchs.dtype and ours.shape == x.shape
        if dtype == torch.float32:
            torch.testing.assert_close(ours, torchs, rtol=1e-6, atol=1e-6)
        else:
            assert (ours.float() - torchs.float()).abs().max() <= BF16_ULP * torchs.float().abs().max()
        assert torch.equal(norm(x), ours)   # the module takes the C call for one row
        rows = torch.cat([(torch.randn(2, 1, hidden, generator=g) * 3).to(dtype), x])     # (3, 1, hidden)
        assert torch.equal(norm(rows)[2:], ours)   # and for a few: each row as alone


def router_config(rule, E, k, norm, scaling=1.0, bias=False, fp32=False):
    family = SimpleNamespace(router_rule=rule, router_fp32=fp32, router_bias=bias, shared_expert_gate=False,
                             score_bias=None, router_scales_input=False)
    return SimpleNamespace(family=family, hidden_size=64, num_experts=E, top_k=k, shared_expert_size=0, n_group=1,
                           topk_group=1, norm_topk_prob=norm, routed_scaling_factor=scaling)


ROUTERS = [("softmax_topk", 8, 2, True, 1.0, False, False), ("softmax_topk", 60, 4, False, 2.5, False, True),
           ("topk_softmax", 32, 4, False, 1.0, True, True), ("softmax_topk", 16, 1, True, 1.0, True, False)]


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: f"{r[0]}-E{r[1]}-k{r[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_routing_matches_the_torch_path(router, dtype):
    g = torch.Generator().manual_seed(2)
    block = MoEBlock(router_config(*router), 0, experts=None)
    randomise(block, g)
    block = block.to(dtype)
    step = decode_cpu.RouteStep(block)
    for n in [1] * 20 + [5, 7]:
        x = torch.randn(n, 64, generator=g).to(dtype)
        with torch.no_grad():
            weights, ids = step(x)
            torch_weights, torch_ids = block.route(x)
        assert ids.dtype == torch.long and weights.dtype == dtype
        assert torch.equal(ids, torch_ids)
        tol = 1e-6 if dtype == torch.float32 else BF16_ULP
        torch.testing.assert_close(weights.float(), torch_weights.float(), rtol=tol, atol=tol)
        if n > 1:   # each row as alone
            assert torch.equal(step(x[-1:])[1], ids[-1:]) and torch.equal(step(x[-1:])[0], weights[-1:])


def test_other_devices_dtypes_and_shapes_take_the_torch_path():
    x16 = torch.randn(1, 1, 32).half()
    assert decode_cpu.rms_norm_row(x16, torch.ones(32).half(), 1e-6, False) is None
    many = decode_cpu.MAX_ROWS + 1                                                             # prefill
    assert decode_cpu.rms_norm_row(torch.randn(many, 32), torch.ones(32), 1e-6, False) is None
    assert decode_cpu.rms_norm_row(torch.randn(1, 32), torch.ones(32).bfloat16(), 1e-6, False) is None
    block = MoEBlock(router_config("softmax_topk", 8, 2, True), 0, experts=None)
    assert decode_cpu.RouteStep(block)(torch.randn(many, 64)) is None
    grouped = router_config("softmax_topk", 8, 2, True)
    grouped.n_group = 4
    assert decode_cpu.RouteStep(MoEBlock(grouped, 0, experts=None))(torch.randn(1, 64)) is None


def test_without_the_libraries_a_bf16_model_decodes_through_torch(tmp_path):
    """OFFLOAD_MOE_NATIVE=0, or a -march=native build asked for without a C compiler: no C decode
    step, oneDNN for bf16, and it still generates."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import torch, offload_moe; from offload_moe.model.attention import Attention; "
             "m = offload_moe.load('offload_moe/demo', device='cpu', dtype=torch.bfloat16); "
             "steps = [a.decode_step for a in m.transformer.modules() if isinstance(a, Attention)]; "
             "g = m.generate([1, 2, 3], max_new_tokens=4, temperature=0, ignore_eos=True); "
             "print(all(s is None for s in steps), len(g.token_ids), m.settings.cpu_kernel)")
    root = Path(__file__).resolve().parents[1]
    for env in ({"OFFLOAD_MOE_NATIVE": "0"}, {"OFFLOAD_MOE_ISA": "native", "CC": "/nonexistent/cc",
                                            "XDG_CACHE_HOME": str(tmp_path)}):
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root), **env})
        assert done.returncode == 0, done.stderr
        none, tokens, kernel = done.stdout.split(maxsplit=2)
        assert none == "True" and tokens == "4" and kernel.startswith("oneDNN (bf16mv ")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0 and done.stdout.split()[0] == "False", done.stderr   # and with them: C steps


def q8_expert(g, H, I):
    """A SwiGLU expert of Q8_0 matrices (the ggml kernel's whole-expert entry point)."""
    import gguf
    from offload_moe.model.expert_interface import Expert, ExpertWeights
    from offload_moe.kernels.ggml import GGMLWeight

    def q8(o, i):
        w = (torch.randn(o, i, generator=g) * 0.2).numpy()
        data = torch.from_numpy(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).copy())
        return GGMLWeight(data, gguf.GGMLQuantizationType.Q8_0, (o, i))
    return Expert(ExpertWeights(q8(I, H), q8(I, H), q8(H, I)))


def test_expert_rows_gather_each_experts_tokens_and_sum_choices_in_order():
    """Five tokens, two choices each, eight experts: every expert computes its tokens' rows in one C
    call (held one by one, as from a slot cache, or all at once over the threads, as resident experts),
    the same bits both ways, and each token gets sum_c weight * its expert's output on it alone."""
    from offload_moe.kernels.ggml import kernel

    if kernel() is None:
        pytest.skip("no ggml kernel")
    g = torch.Generator().manual_seed(4)
    H, I, E, k = 64, 96, 8, 2
    experts = [q8_expert(g, H, I) for _ in range(E)]
    assert all(e.entry is not None for e in experts)
    h = torch.randn(5, H, generator=g)
    ids = torch.tensor([[3, 0], [1, 2], [5, 3], [7, 6], [4, 0]])
    weights = torch.rand(5, k, generator=g)
    step = decode_cpu.ExpertRows(k, H, E)
    used = sorted(set(ids.flatten().tolist()))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one_by_one = step(h, weights, ids.flatten(), ((e, experts[e]) for e in used), stable=False)
        all_at_once = step(h, weights, ids.flatten(), ((e, experts[e]) for e in used), stable=True)   # 8 experts >= 2 x 2 threads
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_by_one, all_at_once)
    expected = torch.zeros(5, H)
    for b in range(5):
        for c in range(k):
            expected[b] += experts[int(ids[b, c])](h, torch.tensor([b]))[0] * weights[b, c]
    torch.testing.assert_close(all_at_once, expected, rtol=1e-6, atol=1e-6)
