"""Gated DeltaNet, the linear attention of Qwen3-Next and Qwen3.5 (`ModelConfig.linear_attention`),
following transformers' torch fallbacks (`torch_chunk_gated_delta_rule`, `torch_recurrent_gated_delta_rule`).

A layer projects each token to q, k, v (through a causal depthwise convolution of width K), a
gate z, a write strength beta = sigmoid(b) and a decay g = -exp(A_log) * softplus(a + dt_bias).
Each value head keeps one (dk, dv) matrix S, updated per token by the delta rule
    S <- exp(g) S;  S <- S + k (beta (v - k^T S))^T;  out = q^T S
and the output is RMSNorm(out) * silu(z), projected back. The state is a fixed size per sequence
(`RecurrentState`: S in fp32 and the convolution's last K - 1 inputs), kept beside the KV cache of
the full-attention layers. Decode runs the step above; a prompt (or a chunk of one) runs the chunked
form, which computes the same recurrence 64 tokens at a time with matrix products, from the state
the previous chunk left.

Shape letters: B batch, T new tokens, C convolution channels (2 nk dk + nv dv), K conv width,
nk / nv key / value heads, dk / dv their dims, n chunks, c chunk size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints.config import ModelConfig

CHUNK = 64   # tokens per chunk of the chunked form (transformers' default)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The delta rule runs in fp32 (as transformers'), or in float64 for a float64 layer (tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RecurrentState(nn.Module):
    """One Gated DeltaNet layer's state for `batch` sequences ("slots"), preallocated once:
    conv (B, C, K-1) in the compute dtype, state (B, nv, dk, dv) in fp32."""

    def __init__(self, batch: int, cfg: ModelConfig, device, dtype):
        super().__init__()
        la = cfg.linear_attention
        self.register_buffer("conv", torch.zeros(batch, la.conv_dim, la.conv_kernel - 1, device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("state", torch.zeros(batch, la.num_value_heads, la.key_head_dim, la.value_head_dim,
                                                  device=device, dtype=state_dtype(dtype)), persistent=False)

    def rows(self) -> list[RecurrentRow]:
        """One `RecurrentRow` per slot, made once at setup (as `KVCache.rows`)."""
        return [RecurrentRow(self.conv[b:b + 1], self.state[b:b + 1]) for b in range(self.conv.shape[0])]


class RecurrentRow:
    """One sequence's row of a `RecurrentState`: views (1, C, K-1) and (1, nv, dk, dv)."""

    __slots__ = ("conv", "state")

    def __init__(self, conv: torch.Tensor, state: torch.Tensor):
        self.conv, self.state = conv, state


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def recurrent_delta_rule(q, k, v, g, beta, state):
    """Token by token. q, k (B, nv, T, dk), v (B, nv, T, dv), g, beta (B, nv, T), state (B, nv, dk, dv),
    all fp32, q already scaled -> out (B, nv, T, dv), final state."""
    out = torch.empty_like(v)
    for t in range(q.shape[2]):
        state = state * g[:, :, t].exp()[..., None, None]
        kt = k[:, :, t, None]                                          # (B, nv, 1, dk)
        delta = (v[:, :, t, None] - kt @ state) * beta[:, :, t, None, None]   # (B, nv, 1, dv)
        state = state + kt.transpose(-1, -2) @ delta                   # (B, nv, dk, dv)
        out[:, :, t] = (q[:, :, t, None] @ state)[:, :, 0]
    return out, state


def chunked_delta_rule(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The same recurrence, `chunk` tokens at a time (shapes as `recurrent_delta_rule`). Within a chunk,
    the delta rule's sequential writes are one triangular solve (the UT transform); across chunks the
    state carries over."""
    B, nv, T, dk = k.shape
    pad = -T % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // chunk
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, v_beta, k_beta = (x.reshape(B, nv, n, chunk, x.shape[-1]) for x in (q, k, v_beta, k_beta))
    decay = g.reshape(B, nv, n, chunk).cumsum(dim=-1)                  # (B, nv, n, c): log decay from chunk start
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    pair = (decay[..., :, None] - decay[..., None, :]).masked_fill(future, float("-inf")).exp()  # (B, nv, n, c, c)
    system = (k_beta @ k.transpose(-1, -2)) * pair      # (B, nv, n, c, c): the solves read its strict lower triangle
    values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)     # (B, nv, n, c, dv)
    k_read = torch.linalg.solve_triangular(system, k_beta * decay.exp()[..., None], upper=False,
                                           unitriangular=True)                                 # (B, nv, n, c, dk)
    inner = (q @ k.transpose(-1, -2)) * pair                            # (B, nv, n, c, c) causal within the chunk
    q = q * decay.exp()[..., None]
    k = k * (decay[..., -1:] - decay).exp()[..., None]
    step = decay[..., -1].exp()[..., None, None]                       # (B, nv, n, 1, 1)
    out = torch.empty_like(values)
    for i in range(n):
        new = values[:, :, i] - k_read[:, :, i] @ state                 # (B, nv, c, dv)
        out[:, :, i] = q[:, :, i] @ state + inner[:, :, i] @ new
        state = state * step[:, :, i] + k[:, :, i].transpose(-1, -2) @ new
    return out.reshape(B, nv, -1, v.shape[-1])[:, :, :T], state


class GatedRMSNorm(nn.Module):
    """RMSNorm over each value head's output, then times silu(z) in fp32 (transformers' `RMSNormGated`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        acc = state_dtype(x.dtype)
        h = F.rms_norm(x.to(acc), (x.shape[-1],), eps=self.eps)
        return (self.weight * h.to(x.dtype) * F.silu(z.to(acc))).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """One linear-attention layer, called like `attention.Attention` (its `cos`, `sin`, `mask` unused):
    `cache` a `RecurrentState` (or row), or None (a stateless pass from position 0)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        la, H = cfg.linear_attention, cfg.hidden_size
        self.la, self.grouped = la, la.projections == "grouped"
        nv = la.num_value_heads
        if self.grouped:
            self.in_proj_qkvz = nn.Linear(H, 2 * la.key_dim + 2 * la.value_dim, bias=False)
            self.in_proj_ba = nn.Linear(H, 2 * nv, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(H, la.conv_dim, bias=False)
            self.in_proj_z = nn.Linear(H, la.value_dim, bias=False)
            self.in_proj_b = nn.Linear(H, nv, bias=False)
            self.in_proj_a = nn.Linear(H, nv, bias=False)
        self.conv1d = nn.Conv1d(la.conv_dim, la.conv_dim, la.conv_kernel, groups=la.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(nv))
        self.A_log = nn.Parameter(torch.zeros(nv))
        self.norm = GatedRMSNorm(la.value_head_dim, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(la.value_dim, H, bias=False)

    def project(self, x: torch.Tensor):
        """x (B, T, H) -> qkv (B, T, C) in the convolution's channel order, z (B, T, nv, dv), b, a (B, T, nv)."""
        la = self.la
        B, T, _ = x.shape
        if not self.grouped:
            z = self.in_proj_z(x).view(B, T, la.num_value_heads, la.value_head_dim)
            return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)
        nk, dk, r = la.num_key_heads, la.key_head_dim, la.num_value_heads // la.num_key_heads
        qkvz = self.in_proj_qkvz(x).view(B, T, nk, 2 * dk + 2 * r * la.value_head_dim)   # per key head: q, k, v, z
        q, k, v, z = qkvz.split((dk, dk, r * la.value_head_dim, r * la.value_head_dim), dim=-1)
        b, a = self.in_proj_ba(x).view(B, T, nk, 2 * r).split((r, r), dim=-1)
        qkv = torch.cat((q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)), dim=-1)
        return qkv, z.reshape(B, T, -1, la.value_head_dim), b.reshape(B, T, -1), a.reshape(B, T, -1)

    def forward(self, x, cos, sin, mask, cache, start) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H). A batched decode step (`start` a list, one entry per row) runs
        row by row, each with its own state."""
        if not isinstance(start, int):
            return torch.cat([self.forward(x[b:b + 1], None, None, None, cache[b], start[b])
                              for b in range(x.shape[0])])
        la = self.la
        B, T, _ = x.shape
        qkv, z, b, a = self.project(x)
        qkv = self.convolve(qkv.transpose(1, 2), cache, start).transpose(1, 2)    # (B, T, C)
        q, k, v = qkv.split((la.key_dim, la.key_dim, la.value_dim), dim=-1)
        r, acc = la.num_value_heads // la.num_key_heads, state_dtype(x.dtype)
        q, k = (l2norm(t.reshape(B, T, la.num_key_heads, la.key_head_dim).to(acc)).repeat_interleave(r, dim=2)
                .transpose(1, 2) for t in (q, k))                      # (B, nv, T, dk) fp32
        q = q * la.key_head_dim ** -0.5
        v = v.reshape(B, T, la.num_value_heads, la.value_head_dim).to(acc).transpose(1, 2)   # (B, nv, T, dv)
        beta = b.to(acc).sigmoid().transpose(1, 2)                      # (B, nv, T)
        g = (-self.A_log.to(acc).exp() * F.softplus(a.to(acc) + self.dt_bias)).transpose(1, 2)  # (B, nv, T)
        state = cache.state if cache is not None and start > 0 else \
            v.new_zeros(B, la.num_value_heads, la.key_head_dim, la.value_head_dim)
        rule = recurrent_delta_rule if T == 1 else chunked_delta_rule
        out, state = rule(q, k, v, g, beta, state)                     # (B, nv, T, dv)
        if cache is not None:
            cache.state.copy_(state)
        out = self.norm(out.transpose(1, 2).to(x.dtype), z)            # (B, T, nv, dv)
        return self.out_proj(out.reshape(B, T, la.value_dim))

    def convolve(self, qkv: torch.Tensor, cache, start: int) -> torch.Tensor:
        """Causal depthwise convolution and silu: qkv (B, C, T) -> (B, C, T), after the cached K-1 inputs
        (zeros at position 0); the cache keeps the last K-1."""
        K = self.la.conv_kernel
        if cache is not None and start > 0:
            before = cache.conv.to(qkv.dtype)
        else:
            before = qkv.new_zeros(qkv.shape[0], qkv.shape[1], K - 1)
        full = torch.cat((before, qkv), dim=-1)                        # (B, C, K-1+T)
        if cache is not None:
            cache.conv.copy_(full[:, :, -(K - 1):])
        w = self.conv1d.weight
        return F.silu(F.conv1d(full.to(w.dtype), w, groups=full.shape[1])).to(qkv.dtype)
