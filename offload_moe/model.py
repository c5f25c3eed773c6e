"""The MoE decoder in plain PyTorch, following transformers' `MixtralForCausalLM` math; the other
families (Qwen3-MoE, OLMoE, Qwen2-MoE, DeepSeek-V2, gpt-oss) are small branches switched by
`ModelConfig` fields and the family's adapter (`cfg.family`, see `arch`).

Read top to bottom: RMSNorm, rotary embeddings, a preallocated KV cache, grouped-query attention
(optional biases, q/k norms, clamp, sinks, sliding window), multi-head latent attention, the
router rules, a dense SwiGLU MLP (dense layers and shared experts), the sparse MoE block, one
decoder layer, the whole stack. Routed experts are not part of this module: the MoE block asks an
injected provider (`experts.interface.ExpertProvider`: `fetch(layer, ids, tokens, guesses)`) for
the experts its tokens chose and hands over its guesses of the next layers' in the same call, so
offloading, caching and prefetch live elsewhere and never call back into this file. Routing ids and
guesses reach the host in one copy per MoE layer (`HostIds`); a benchmark replays a trace by giving
the model a `Routing` strategy.

Shape letters: B batch, T new tokens, S cached positions, H hidden size, nh / nkv query / key-value
heads, hd head dim, E experts, k experts per token, N = B*T tokens, V vocab, r latent rank (MLA),
d rotated dims per head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol
from itertools import accumulate

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .experts.interface import ExpertProvider
from .quant.cpu_bf16 import pack_linears
from .quant.modules import QEmbedding, QLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, scale_fp32: bool = False):
        super().__init__()
        self.eps, self.scale_fp32 = eps, scale_fp32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # normalise in fp32 as the reference does, whatever the weight dtype
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_fp32:
            return (self.weight * h).to(x.dtype)
        return self.weight * h.to(x.dtype)


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _yarn(cfg: ModelConfig, d: int, device) -> tuple[torch.Tensor, float]:
    """YaRN: (inv_freq (d/2,), factor applied to cos and sin), as transformers computes them."""
    y, base = cfg.rope_scaling, cfg.rope_theta
    factor, original = y["factor"], y["original_max_position_embeddings"]
    attention_factor = y["attention_factor"]
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, y["mscale"]) / yarn_mscale(factor, y["mscale_all_dim"])
                            if y["mscale"] and y["mscale_all_dim"] else yarn_mscale(factor))

    def correction_dim(rotations):
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y["beta_fast"] or 32), correction_dim(y["beta_slow"] or 1)
    if y["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2, device=device).float() / d)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def rope_tables(cfg: ModelConfig, max_seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (max_seq_len, d), computed in fp32 then cast (as transformers does)."""
    d = cfg.rope_dim
    if cfg.rope_scaling:
        inv_freq, scale = _yarn(cfg, d, device)
    else:
        inv_freq, scale = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device)
                                                    .float() / d)), 1.0
    freqs = torch.arange(max_seq_len, device=device).float()[:, None] * inv_freq[None, :]  # (S, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, d)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, d); cos, sin: (T, d). Rotates the pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, d); cos, sin: (T, d). Rotates the pairs (2i, 2i + 1) in fp32 (DeepSeek)."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half].float(), sin[..., :half].float()           # (T, d/2)
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()             # (B, heads, T, d/2)
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of every position so far, preallocated once: (B, nkv, S, hd) and
    (B, nkv, S, v_dim). MLA stores its latent as the "keys" and its rotated key as the "values"."""

    def __init__(self, batch: int, kv_heads: int, max_seq_len: int, head_dim: int, device, dtype,
                 v_dim: int | None = None):
        super().__init__()
        shape = (batch, kv_heads, max_seq_len)
        self.register_buffer("k", torch.zeros(*shape, head_dim, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(*shape, v_dim or head_dim, device=device, dtype=dtype),
                             persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hd) at positions start.. and return the filled prefix (B, nkv, start+T, hd)."""
        B, end = k.shape[0], start + k.shape[2]
        self.k[:B, :, start:end] = k
        self.v[:B, :, start:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]


class Attention(nn.Module):
    """Grouped-query attention; per family optional q/k/v (and o) biases, q/k RMSNorm per head
    ("head") or over the whole projection ("full"), a clamp of q, k, v, and attention sinks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        fam = cfg.family
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm, self.clip = fam.qk_norm, cfg.clip_qkv
        if fam.qk_norm:
            head = fam.qk_norm == "head"
            self.q_norm = RMSNorm(self.hd if head else self.nh * self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd if head else self.nkv * self.hd, cfg.rms_norm_eps)
        self.sinks = nn.Parameter(torch.zeros(self.nh)) if fam.attention_sinks else None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)      # (B, T, nh*hd), (B, T, nkv*hd) x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(B, T, self.nh, self.hd)
        k = k.view(B, T, self.nkv, self.hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)                                          # (B, nh, T, hd)
        k = k.transpose(1, 2)                                          # (B, nkv, T, hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)            # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)                           # (B, nkv, S, hd)
        if self.sinks is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nh != self.nkv)
        else:
            y = self._attend_with_sinks(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))

    def _attend_with_sinks(self, q, k, v, mask) -> torch.Tensor:
        """Softmax over the keys and one learned logit per head that takes weight but has no value."""
        k = k.repeat_interleave(self.nh // self.nkv, dim=1)             # (B, nh, S, hd)
        v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        scores = q @ k.transpose(-1, -2) * self.hd ** -0.5              # (B, nh, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        sinks = self.sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)
        probs = torch.softmax(torch.cat((scores, sinks), dim=-1), dim=-1)[..., :-1]
        return probs @ v                                                # (B, nh, T, hd)


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2). Keys and values come from a rank-r latent shared by
    all heads, which is what the cache holds (with the rotated d-dim key part, also shared); they
    are decompressed for every head at each step. RoPE rotates (even, odd) pairs here."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m, H = cfg.mla, cfg.hidden_size
        self.nh, self.nope, self.rope, self.v_dim, self.rank = (cfg.num_heads, m.qk_nope_head_dim,
                                                                m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank)
        qk = self.nope + self.rope
        self.q_lora = bool(m.q_lora_rank)
        if self.q_lora:
            self.q_a_proj = nn.Linear(H, m.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, 1e-6)  # transformers leaves these at their default eps
            self.q_b_proj = nn.Linear(m.q_lora_rank, self.nh * qk, bias=False)
        else:
            self.q_proj = nn.Linear(H, self.nh * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, self.nh * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.nh * self.v_dim, H, bias=False)
        self.scale = qk ** -0.5
        y = cfg.rope_scaling
        if y and y["mscale_all_dim"]:  # YaRN's attention temperature, squared (transformers' yarn_apply_mscale)
            self.scale *= yarn_mscale(y["factor"], y["mscale_all_dim"]) ** 2

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(B, T, self.nh, self.nope + self.rope).transpose(1, 2)        # (B, nh, T, nope+d)
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)  # (B, T, r), (B, T, d)
        latent = self.kv_a_layernorm(latent).view(B, 1, T, self.rank)          # (B, 1, T, r)
        k_rot = k_rot.view(B, 1, T, self.rope)
        q_rot, k_rot = apply_rope_interleaved(q_rot, cos, sin), apply_rope_interleaved(k_rot, cos, sin)
        if cache is not None:
            latent, k_rot = cache.update(start, latent, k_rot)                 # (B, 1, S, r), (B, 1, S, d)
        S = latent.shape[2]
        kv = self.kv_b_proj(latent).view(B, S, self.nh, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)                  # (B, nh, S, nope), (B, nh, S, v)
        k = torch.cat((k_nope, k_rot.expand(B, self.nh, S, self.rope)), dim=-1)  # (B, nh, S, nope+d)
        q = torch.cat((q_nope, q_rot), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, nh, T, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.v_dim))


# ---- router rules: gate logits (N, E) -> weights (N, k) fp32, expert ids (N, k) ----
def softmax_topk(logits: torch.Tensor, cfg: ModelConfig, forced: torch.Tensor | None):
    """Softmax over all experts, top-k (within the best topk_group of n_group groups), then
    renormalise (norm_topk_prob) or scale by routed_scaling_factor. Mixtral, Qwen, OLMoE, DeepSeek."""
    probs = F.softmax(logits.float(), dim=-1)                         # (N, E)
    if forced is not None:
        ids = forced.to(probs.device)
        weights = probs.gather(-1, ids)
    else:
        eligible = probs
        if cfg.n_group > 1:
            groups = probs.view(probs.shape[0], cfg.n_group, -1)      # (N, groups, E/groups)
            best = groups.amax(dim=-1).topk(cfg.topk_group, dim=-1).indices
            keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            eligible = groups.masked_fill(~keep[..., None], 0.0).view_as(probs)
        weights, ids = torch.topk(eligible, cfg.top_k, dim=-1)        # (N, k)
    if cfg.norm_topk_prob:
        return weights / weights.sum(dim=-1, keepdim=True), ids
    return weights * cfg.routed_scaling_factor, ids


def topk_softmax(logits: torch.Tensor, cfg: ModelConfig, forced: torch.Tensor | None):
    """Top-k of the logits, then a softmax over those k (gpt-oss)."""
    if forced is not None:
        ids = forced.to(logits.device)
        top = logits.gather(-1, ids)
    else:
        top, ids = torch.topk(logits, cfg.top_k, dim=-1)              # (N, k)
    return F.softmax(top.float(), dim=-1), ids


ROUTER_RULES = {"softmax_topk": softmax_topk, "topk_softmax": topk_softmax}


class MLP(nn.Module):
    """A dense SwiGLU MLP that stays on the device: a dense layer's, or a shared expert."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Routing(Protocol):
    """A routing strategy the model can be given in place of its own routers' choices (benchmarks
    replay recorded traces through it). Layers are MoE layers (the engine's numbering)."""

    def forced(self, layer: int, tokens: int) -> torch.Tensor | None:
        """(tokens, k) expert ids that replace the router's top-k for this call, or None."""
        ...

    def guess(self, layer: int, tokens: int) -> torch.Tensor | None:
        """(tokens, k) prefetch guesses for `layer`'s next call, or None: the routers guess."""
        ...


class HostIds:
    """The one device->host transfer of a MoE layer: its routing ids and the guesses for the next
    layers, gathered on the device into one preallocated buffer and copied back in one go into a
    preallocated host buffer (pinned on CUDA). Steps larger than the buffers (prefill) copy once too."""

    def __init__(self, size: int, device: torch.device):
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.host = torch.empty(size, dtype=torch.long, pin_memory=on_cuda)               # (size,)
        self.staged = torch.empty(size, dtype=torch.long, device=self.device) if on_cuda else self.host

    def read(self, *parts: torch.Tensor) -> torch.Tensor:
        """The parts (long tensors on the device), flattened one after another, on the host."""
        sizes = [p.numel() for p in parts]
        total = sum(sizes)
        if total > self.host.numel():
            return torch.cat([p.flatten() for p in parts]).cpu()
        at = 0
        for p, n in zip(parts, sizes):
            self.staged[at:at + n].copy_(p.flatten())
            at += n
        if self.staged is self.host:
            return self.host[:total]
        return self.host[:total].copy_(self.staged[:total])            # blocking: the layer's one sync


class MoEBlock(nn.Module):
    """Router (the family's rule) and the weighted sum of the chosen experts, plus the shared
    expert (sigmoid-gated in Qwen2-MoE) where the family has one."""

    def __init__(self, cfg: ModelConfig, layer: int, experts: ExpertProvider):
        super().__init__()
        fam = cfg.family
        self.cfg, self.layer, self.top_k, self.num_experts = cfg, layer, cfg.top_k, cfg.num_experts
        self.rule, self.router_fp32 = ROUTER_RULES[fam.router_rule], fam.router_fp32
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=fam.router_bias)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_size) if cfg.shared_expert_size else None
        self.shared_expert_gate = (nn.Linear(cfg.hidden_size, 1, bias=False)
                                   if cfg.shared_expert_size and fam.shared_expert_gate else None)
        self.experts = experts  # the provider (`experts.interface`): not a submodule, owns no parameters here

    def route(self, x: torch.Tensor, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> weights (N, k) in x's dtype, expert ids (N, k); `forced` ids replace top-k."""
        logits = F.linear(x.float(), self.gate.weight.float()) if self.router_fp32 else self.gate(x)  # (N, E)
        weights, ids = self.rule(logits, self.cfg, forced)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor, ids_to_host: HostIds, forced: torch.Tensor | None = None,
                guesses: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H). `guesses` (D, N, k): the next D layers' likely experts, handed
        to the provider for prefetch; they come to the host in the same copy as the routing ids."""
        B, T, H = x.shape
        N, k = B * T, self.top_k
        h = x.reshape(-1, H)                                          # (N, H)
        weights, ids = self.route(h, forced)                          # (N, k), (N, k)
        flat = ids.flatten()                                          # (N*k,)
        order = torch.argsort(flat, stable=True)                      # rows grouped by expert, on the device
        token_of = order // k                                         # (N*k,) the token of each grouped row
        parts = (flat,) if guesses is None else (flat, guesses)
        host = ids_to_host.read(*parts)                               # the one host sync of the layer
        counts = torch.bincount(host[:N * k], minlength=self.num_experts).tolist()
        ends = list(accumulate(counts))                               # expert e's rows end here
        used = [e for e, c in enumerate(counts) if c]
        ahead = ([sorted(set(g)) for g in host[N * k:].view(guesses.shape[0], -1).tolist()]
                 if guesses is not None else ())
        row_weights = weights.flatten()                               # (N*k,)
        # Each (token, choice) gets its own row, summed over choices in a fixed order afterwards,
        # so the result does not depend on the order the provider hands experts out.
        out = h.new_zeros(N * k, H)                                   # (N*k, H)
        for e, expert in self.experts.fetch(self.layer, used, N, ahead):
            start, end = ends[e] - counts[e], ends[e]
            rows = order[start:end]                                   # flat (token, choice) indices
            out[rows] = expert(h, token_of[start:end]) * row_weights[rows, None]  # (n_e, H)
        y = out.view(N, k, H).sum(dim=1)                              # (N, H)
        if self.shared_expert is not None:
            shared = self.shared_expert(h)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            y = y + shared
        return y.view(B, T, H)


class DecoderLayer(nn.Module):
    """Attention and an MLP: the MoE block (`block_sparse_moe`), or in a dense layer a dense `mlp`."""

    def __init__(self, cfg: ModelConfig, layer: int, experts):
        super().__init__()
        fp32 = cfg.family.norm_scale_fp32
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fp32)
        self.self_attn = LatentAttention(cfg) if cfg.mla else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fp32)
        self.dense = layer in cfg.dense_layers
        if self.dense:
            self.mlp = MLP(cfg.hidden_size, cfg.dense_intermediate_size)
        else:  # the expert engine numbers MoE layers without the dense ones
            self.block_sparse_moe = MoEBlock(cfg, cfg.moe_layers.index(layer), experts)

    def forward(self, x, cos, sin, mask, cache, start, moe: Callable | None = None) -> torch.Tensor:
        """`moe(block, x, residual)` runs the MoE block (the transformer adds routing and guesses)."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        if self.dense:
            return h + self.mlp(self.post_attention_layernorm(h))
        return h + moe(self.block_sparse_moe, self.post_attention_layernorm(h), h)


class Transformer(nn.Module):
    """Embeddings, decoder layers, final norm, lm_head. Parameter names follow the checkpoint's
    (minus the leading `model.`), so a state dict loads without renaming."""

    def __init__(self, cfg: ModelConfig, experts: ExpertProvider):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, experts) for i in range(cfg.num_layers))
        self.windows = [cfg.window(i) for i in range(cfg.num_layers)]  # each layer's sliding window
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.family.norm_scale_fp32)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.kv_caches: list[KVCache] = []
        self.max_seq_len = 0
        self.experts = experts                  # the provider, shared by every MoE block
        self.routing: Routing | None = None     # None: the routers decide (see `set_routing`)

    def setup(self, max_seq_len: int, device, dtype, max_batch: int = 1):
        """Allocate the KV cache and rotary tables once, on the compute device."""
        cfg = self.config
        self.device, self.max_seq_len = torch.device(device), max_seq_len
        # DeepSeek rotates in fp32 from fp32 tables; the others cast the tables to the compute dtype
        self.cos, self.sin = rope_tables(cfg, max_seq_len, device, torch.float32 if cfg.mla else dtype)
        if cfg.mla:  # the latent and the rotated key part, shared by all heads
            shape = (1, max_seq_len, cfg.mla.kv_lora_rank, device, dtype, cfg.mla.qk_rope_head_dim)
        else:
            shape = (cfg.num_kv_heads, max_seq_len, cfg.head_dim, device, dtype)
        self.kv_caches = [KVCache(max_batch, *shape) for _ in range(cfg.num_layers)]
        # decode's routing ids and the next layers' guesses come back in one copy per MoE layer
        depth = min(self.experts.prefetch_depth, cfg.num_moe_layers - 1)
        self.ids_to_host = HostIds(max_batch * cfg.top_k * (1 + max(depth, 0)), device)

    def set_routing(self, routing: Routing | None) -> None:
        """Route by `routing` (e.g. a recorded trace) instead of the routers; None: the routers again."""
        self.routing = routing

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        """The MoE block of each MoE layer, in the expert engine's numbering (dense layers have none)."""
        return [self.layers[i].block_sparse_moe for i in self.config.moe_layers]

    def attention_mask(self, start: int, T: int, S: int, window: int | None = None) -> torch.Tensor | None:
        """(T, S) boolean: query at position start+t sees keys at positions <= it, within the window."""
        if T == 1 and (window is None or S <= window):
            return None  # a single new token sees everything cached
        q_pos = torch.arange(start, start + T, device=self.device)[:, None]
        k_pos = torch.arange(S, device=self.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask = mask & (k_pos > q_pos - window)
        return mask

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start: int = 0, use_cache: bool = True,
                last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) at positions start..start+T-1 -> logits (B, T or 1, V) in fp32.

        With use_cache the KV cache is read and written (generation); without it the call is
        stateless and must start at 0 (scoring whole sequences)."""
        B, T = tokens.shape
        end = start + T
        if end > self.max_seq_len:
            raise ValueError(f"sequence of {end} positions exceeds the context of {self.max_seq_len}")
        cos, sin = self.cos[start:end], self.sin[start:end]
        masks = {w: self.attention_mask(start, T, end if use_cache else T, w) for w in set(self.windows)}
        x = self.embed_tokens(tokens)                                  # (B, T, H)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, masks[self.windows[i]], self.kv_caches[i] if use_cache else None, start,
                      self.moe_step)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()                      # (B, T, V)

    def moe_step(self, block: MoEBlock, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """One MoE layer: its routing (the routers, or the strategy given) and, in decode, the next
        layers' guesses the provider asked for, handed over with the request."""
        N = x.shape[0] * x.shape[1]
        forced = self.routing.forced(block.layer, N) if self.routing is not None else None
        ahead = range(block.layer + 1, min(block.layer + 1 + self.experts.prefetch_depth, self.config.num_moe_layers))
        guesses = None
        if N == 1 and len(ahead):
            guesses = torch.stack([self.guess_experts(layer, residual) for layer in ahead])  # (D, N, k)
        return block(x, self.ids_to_host, forced, guesses)

    def guess_experts(self, layer: int, residual: torch.Tensor) -> torch.Tensor:
        """Which experts `layer` would pick for this residual stream: (N, k) ids, for the provider to
        prefetch; only a guess, since the true input differs. A routing strategy may guess instead.
        `layer` is the engine's (MoE layers only)."""
        N = residual.numel() // residual.shape[-1]
        guess = self.routing.guess(layer, N) if self.routing is not None else None
        if guess is not None:
            return guess.to(residual.device)
        block = self.layers[self.config.moe_layers[layer]]
        x = block.post_attention_layernorm(residual).reshape(-1, self.config.hidden_size)
        return block.block_sparse_moe.route(x)[1]


def build_transformer(cfg: ModelConfig, dense: dict, experts, *, device, dtype,
                      max_seq_len: int, max_batch: int = 1) -> Transformer:
    """Construct on the meta device, swap in quantized modules for packed weights, then adopt the
    dense tensors (already on device/dtype)."""
    with torch.device("meta"):
        model = Transformer(cfg, experts)
    if cfg.tie_word_embeddings:
        dense = {**dense, "lm_head.weight": dense["embed_tokens.weight"]}
    plain = {}
    for name, w in dense.items():
        if isinstance(w, torch.Tensor):
            plain[name] = w
            continue
        parent, _, attr = name.removesuffix(".weight").rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, QEmbedding(w, dtype) if attr == "embed_tokens" else QLinear(w))
    model.load_state_dict(plain, strict=True, assign=True)
    pack_linears(model, skip=("gate", "shared_expert_gate"))  # bf16 on the CPU: prepacked once (routers read .weight)
    model.setup(max_seq_len, device, dtype, max_batch)
    return model.eval()

