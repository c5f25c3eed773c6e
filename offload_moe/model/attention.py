"""The attention side of the decoder: RMSNorm, rotary embeddings (with YaRN or llama3 scaling), a
preallocated KV cache, grouped-query attention (optional biases, q/k norms, clamp, sinks, sliding
window; Llama 4's NoPE layers, L2 q/k norms and query temperature) and multi-head latent attention
(DeepSeek-V2), following transformers' math. `model.py` builds the
decoder layers from these and the MoE block.

Shape letters: B batch, T new tokens, S cached positions, H hidden size, nh / nkv query / key-value
heads, hd head dim, r latent rank (MLA), d rotated dims per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints.config import ModelConfig
from ..kernels.decode_step import AttentionStep, rms_norm_row
from ..kernels.cpu_bf16 import fuse_bf16
from ..kernels.modules import fused_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, scale_fp32: bool = False):
        super().__init__()
        self.eps, self.scale_fp32 = eps, scale_fp32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step's layer norm (B, 1, H): one C call; a prompt's tokens keep torch's arithmetic, as
        # transformers computes it (the C sum's order differs in the last bits, which random models amplify)
        if x.device.type == "cpu" and x.dim() == 3 and x.shape[1] == 1:
            y = rms_norm_row(x, self.weight, self.eps, self.scale_fp32)
            if y is not None:
                return y
        # normalise in fp32 as the reference does (x * rsqrt(mean(x^2) + eps)), whatever the weight
        # dtype; torch's fused op computes it in one pass (bitwise the three-op form on the CPU)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not self.scale_fp32:
            # torch's CPU op normalises bf16 in fp32 and rounds once: bitwise the two conversions'
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
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


def _llama3(cfg: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama 3.1 / 4's scaling of the inverse frequencies (d/2,): wavelengths beyond the original
    context over low_freq_factor are divided by `factor`, those under it over high_freq_factor kept,
    a smooth ramp between (transformers' `_compute_llama3_parameters`)."""
    y = cfg.rope_scaling
    factor, old = y["factor"], y["original_max_position_embeddings"]
    low, high = y["low_freq_factor"], y["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, max_seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (max_seq_len, d), computed in fp32 then cast (as transformers does)."""
    d = cfg.rope_dim
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") not in ("llama3", "freq_factors"):
        inv_freq, scale = _yarn(cfg, d, device)
    else:
        inv_freq, scale = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device)
                                                    .float() / d)), 1.0
        if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "freq_factors":  # a GGUF's rope_freqs
            inv_freq = inv_freq / torch.tensor(cfg.rope_scaling["factors"], device=device)
        elif cfg.rope_scaling:
            inv_freq = _llama3(cfg, inv_freq)
    freqs = torch.arange(max_seq_len, device=device).float()[:, None] * inv_freq[None, :]  # (S, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, d)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, d); cos, sin: (T, d). Rotates the pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rope_adjacent(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, d); cos, sin: (T, d). Rotates the pairs (2i, 2i + 1) by pair i's angle in x's
    dtype: `apply_rope`'s rotation on q/k rows in llama.cpp's order (`ModelConfig.rope_pairs`), the same
    products and sums element for element, so q and k come out as a permutation of its result, bit for bit."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]                            # (T, d/2)
    even, odd = x[..., 0::2], x[..., 1::2]                             # (B, heads, T, d/2)
    return torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)


ROPE = {"half": apply_rope, "adjacent": apply_rope_adjacent}   # by `ModelConfig.rope_pairs`


def apply_rope_partial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: str = "half") -> torch.Tensor:
    """The rotation `ROPE[pairs]` on the first d = cos.shape[-1] dims of each head, the rest passed
    through (GLM-4.5's, MiniMax-M2's and Qwen3-Next's partial rotary); x: (B, heads, T, hd) with hd >= d."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return ROPE[pairs](x, cos, sin)
    return torch.cat((ROPE[pairs](x[..., :d], cos, sin), x[..., d:]), dim=-1)


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
        self.slot_rows = self.rows()   # each slot's views, made once

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hd) at positions start.. and return the filled prefix (B, nkv, start+T, hd)."""
        B, end = k.shape[0], start + k.shape[2]
        self.k[:B, :, start:end] = k
        self.v[:B, :, start:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]

    def rows(self) -> list[KVRow]:
        """One `KVRow` per batch row ("slot"): the cache of one sequence, made once at setup."""
        return [KVRow(self.k[b:b + 1], self.v[b:b + 1]) for b in range(self.k.shape[0])]


class KVRow:
    """One sequence's row of a `KVCache`: views (1, nkv, S, hd) with the cache's `update`, so
    each row of a batched decode step writes and reads its own sequence."""

    __slots__ = ("k", "v")

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (1, nkv, T, hd) at positions start.. and return the filled prefix (1, nkv, start+T, hd)."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, **kw) -> torch.Tensor:
    """F.scaled_dot_product_attention, except that a CPU decode step (one query) in bf16/fp16 runs
    in fp32: torch's CPU kernel for a single half-precision query is 2.5-5x slower than upcasting
    q, k and v first (88 to 4000 cached tokens; BENCHMARKS.md, "CPU decode overhead")."""
    if q.device.type == "cpu" and q.shape[-2] == 1 and q.dtype in (torch.bfloat16, torch.float16):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, **kw).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)


class Attention(nn.Module):
    """Grouped-query attention; per family optional q/k/v (and o) biases, q/k RMSNorm per head
    ("head") or over the whole projection ("full"), a clamp of q, k, v, and attention sinks."""

    def __init__(self, cfg: ModelConfig, window: int | None = None, layer: int = 0):
        super().__init__()
        fam = cfg.family
        # Llama 4: some layers skip RoPE (NoPE) and scale their queries by a temperature instead;
        # the others rotate interleaved pairs, then take the L2 (weightless RMS) norm of q and k
        self.rope = layer not in cfg.nope_layers
        self.rotate = apply_rope_interleaved if fam.rope_interleaved else apply_rope_partial
        self.l2_eps = cfg.rms_norm_eps if cfg.qk_l2_norm and self.rope else None
        self.temperature = None if self.rope else cfg.attn_temperature  # (floor_scale, attn_scale)
        self.query_scales: torch.Tensor | None = None  # (S, 1) the temperature by position (`setup`)
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = window  # the layer's sliding window (None: all earlier positions)
        self.rope_pairs = cfg.rope_pairs
        self.gated = fam.attention_output_gate  # q_proj gives each head's query and then its output gate
        self.rot = cfg.rope_dim                 # RoPE rotates the first `rot` dims of each head
        self.q_width = self.nh * self.hd * (2 if self.gated else 1)
        self.q_proj = nn.Linear(cfg.hidden_size, self.q_width, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm, self.clip = cfg.qk_norm, cfg.clip_qkv
        if self.qk_norm:
            head = self.qk_norm == "head"
            fp32 = fam.norm_scale_fp32
            self.q_norm = RMSNorm(self.hd if head else self.nh * self.hd, cfg.rms_norm_eps, fp32)
            self.k_norm = RMSNorm(self.hd if head else self.nkv * self.hd, cfg.rms_norm_eps, fp32)
        self.sinks = nn.Parameter(torch.zeros(self.nh)) if fam.attention_sinks else None
        self.qkv = None  # q, k, v in one kernel call, where `fuse_projections` finds they can be
        self.decode_step: AttentionStep | None = None  # one token on the CPU in one C call (`prepare_cpu_decode`)

    def fuse_projections(self) -> None:
        """After the weights are in place: q, k and v on one of our CPU kernels (no biases) are
        computed in one call (one activation quantization, one parallel loop; bf16: one weight)."""
        if any(getattr(m, "bias", None) is not None for m in (self.q_proj, self.k_proj, self.v_proj)):
            return
        projections = [self.q_proj, self.k_proj, self.v_proj]
        self.qkv = fused_linear(projections) or fuse_bf16(projections)

    def prepare_cpu_decode(self) -> None:
        """Decode steps on the CPU compute everything between the projections in one call (not yet
        with an output gate or partial rotary: those take the torch path; the C step knows neither
        Llama 4's rotation, its L2 norms, its temperature nor its chunks)."""
        if (not self.gated and self.rot == self.hd and self.rotate is apply_rope_partial and self.rope
                and self.l2_eps is None and self.temperature is None):
            self.decode_step = AttentionStep(self, self.window)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> q (B, T, nh*hd, or with the output gate nh*2hd), k, v (B, T, nkv*hd)."""
        y = self.qkv.linear(x) if self.qkv is not None else None
        if y is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return y.split((self.q_width, self.nkv * self.hd, self.nkv * self.hd), dim=-1)

    def forward(self, x, cos, sin, mask, cache, start) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H). One sequence: `cache` a `KVCache` (or row), `start` its first
        position. A batched decode step (T = 1, each row its own sequence): `start` a `DecodeRows`,
        `cache` the layer's `KVCache` of every slot, `cos` and `sin` the whole rotary tables (`mask`
        unused); projections run batched, attention in one C call or row by row."""
        B, T, _ = x.shape
        q, k, v = self.project(x)                                      # (B, T, nh*hd), (B, T, nkv*hd) x2
        gate = None
        if self.gated:  # per head: hd query dims, then hd gate dims
            q, gate = q.view(B, T, self.nh, 2 * self.hd).chunk(2, dim=-1)
            q, gate = q.reshape(B, T, -1), gate.reshape(B, T, -1)      # (B, T, nh*hd) each
        if isinstance(start, int):
            y = self.attend(q, k, v, cos, sin, mask, cache, start)     # (B, T, nh*hd)
        elif isinstance(start, list):  # a batched step of per-row caches and masks (`Transformer.decode_rows`)
            y = torch.cat([self.attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], cos[b], sin[b], mask[b], cache[b],
                                       start[b]) for b in range(B)])
        else:
            y = self.decode_step.rows(q, k, v, cos, sin, cache, start) if self.decode_step is not None else None
            if y is None:
                y = torch.cat([self.attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], *start.row(b, cos, sin, cache, self.window))
                               for b in range(B)])
        if gate is not None:
            y = y * torch.sigmoid(gate)
        return self.o_proj(y)

    def attend(self, q, k, v, cos, sin, mask, cache, start: int) -> torch.Tensor:
        """Projections q (B, T, nh*hd), k, v (B, T, nkv*hd) -> attention output (B, T, nh*hd), before o_proj."""
        B, T, _ = q.shape
        if self.decode_step is not None and T == 1:
            y = self.decode_step(q, k, v, cos, sin, cache, start)
            if y is not None:
                return y
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
        v = v.reshape(B, T, self.nkv, self.hd).transpose(1, 2)         # (B, nkv, T, hd)
        if self.rope:  # partial rotary (`apply_rope_partial`): the first `rot` dims turn, the rest pass
            if self.rotate is apply_rope_partial:  # pairs (i, i + d/2), or neighbours in llama.cpp's row order
                q, k = apply_rope_partial(q, cos, sin, self.rope_pairs), apply_rope_partial(k, cos, sin, self.rope_pairs)
            else:
                q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if self.l2_eps is not None:
            q, k = (F.rms_norm(t.float(), (self.hd,), eps=self.l2_eps).to(t.dtype) for t in (q, k))
        if self.temperature is not None:
            q = (q * self.query_scales[start:start + T]).to(q.dtype)           # scales (T, 1)
        if cache is not None:
            k, v = cache.update(start, k, v)                           # (B, nkv, S, hd)
        if self.sinks is None:
            y = attend(q, k, v, mask, enable_gqa=self.nh != self.nkv)
        else:
            y = self._attend_with_sinks(q, k, v, mask)
        return y.transpose(1, 2).reshape(B, T, self.nh * self.hd)

    def setup(self, max_seq_len: int, device) -> None:
        """Llama 4's NoPE layers: their query temperature at every position, once (`query_scales`)."""
        if self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            positions = torch.arange(max_seq_len, device=device).float()
            # 1 + attn_scale * log(1 + floor((position + 1) / floor_scale)): far positions stay sharp
            self.query_scales = (torch.log1p(torch.floor((positions + 1.0) / floor_scale)) * attn_scale + 1.0)[:, None]

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
    """Multi-head latent attention (DeepSeek-V2, V3, Kimi-K2, GLM-4.7-Flash). Keys and values come from a rank-r latent shared by
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
        # DeepSeek's checkpoints lay the rope dims out in (even, odd) pairs; `rope_interleave: false` halves
        self.rotate = apply_rope_interleaved if cfg.rope_interleave else apply_rope
        y = cfg.rope_scaling
        if y and y.get("mscale_all_dim"):  # YaRN's attention temperature, squared (transformers' yarn_apply_mscale)
            self.scale *= yarn_mscale(y["factor"], y["mscale_all_dim"]) ** 2

    def forward(self, x, cos, sin, mask, cache, start) -> torch.Tensor:
        """As `Attention.forward`; a batched decode step (`DecodeRows`) runs row by row."""
        if not isinstance(start, int):
            return torch.cat([self.forward(x[b:b + 1], *start.row(b, cos, sin, cache, None)) for b in range(x.shape[0])])
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
        q_rot, k_rot = self.rotate(q_rot, cos, sin), self.rotate(k_rot, cos, sin)
        if cache is not None:
            latent, k_rot = cache.update(start, latent, k_rot)                 # (B, 1, S, r), (B, 1, S, d)
        S = latent.shape[2]
        kv = self.kv_b_proj(latent).view(B, S, self.nh, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)                  # (B, nh, S, nope), (B, nh, S, v)
        k = torch.cat((k_nope, k_rot.expand(B, self.nh, S, self.rope)), dim=-1)  # (B, nh, S, nope+d)
        q = torch.cat((q_nope, q_rot), dim=-1)
        y = attend(q, k, v, mask, scale=self.scale)                                 # (B, nh, T, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.v_dim))
