"""The Mixtral decoder in plain PyTorch, following transformers' `MixtralForCausalLM` math.

Read top to bottom: RMSNorm, rotary embeddings, a preallocated KV cache, grouped-query attention,
the sparse MoE block, one decoder layer, the whole stack. Experts are not part of this module:
the MoE block asks an injected provider (`experts.fetch(layer, ids, residual)`) for the weights of
the experts its tokens chose, so offloading, caching and prefetch live elsewhere and never touch
this file.

Shape letters: B batch, T new tokens, S cached positions, H hidden size, nh / nkv query / key-value
heads, hd head dim, E experts, k experts per token, N = B*T tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .experts.weights import expert_forward
from .quant.modules import QEmbedding, QLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # normalise in fp32 as the reference does, whatever the weight dtype
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(cfg: ModelConfig, max_seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (max_seq_len, hd), computed in fp32 then cast (as transformers does)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=device)
                                         .float() / cfg.head_dim))
    freqs = torch.arange(max_seq_len, device=device).float()[:, None] * inv_freq[None, :]  # (S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, hd); cos, sin: (T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Keys and values of every position so far, preallocated once: (B, nkv, S, hd)."""

    def __init__(self, batch: int, kv_heads: int, max_seq_len: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (batch, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hd) at positions start.. and return the filled prefix (B, nkv, start+T, hd)."""
        B, end = k.shape[0], start + k.shape[2]
        self.k[:B, :, start:end] = k
        self.v[:B, :, start:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)                               # (B, nkv, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nh != self.nkv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MoEBlock(nn.Module):
    """Router (softmax over experts → top-k → renormalise) and the weighted sum of chosen experts."""

    def __init__(self, cfg: ModelConfig, layer: int, experts):
        super().__init__()
        self.layer, self.top_k, self.num_experts = layer, cfg.top_k, cfg.num_experts
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = experts  # provider: not a submodule, owns no parameters of this model
        self.forced_routes: Callable[[int, int], torch.Tensor] | None = None  # benchmarks replay traces

    def route(self, x: torch.Tensor, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> weights (N, k) in x's dtype, expert ids (N, k); `forced` ids replace top-k."""
        probs = F.softmax(self.gate(x).float(), dim=-1)              # (N, E)
        if forced is None:
            weights, ids = torch.topk(probs, self.top_k, dim=-1)     # (N, k)
        else:
            ids = forced.to(probs.device)
            weights = probs.gather(-1, ids)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        h = x.reshape(-1, H)                                          # (N, H)
        forced = self.forced_routes(self.layer, h.shape[0]) if self.forced_routes else None
        weights, ids = self.route(h, forced)
        # The one host sync of the layer: which experts were chosen, grouped by expert.
        flat = ids.flatten().cpu()                                    # (N*k,)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        ends = torch.tensor(counts).cumsum(0).tolist()                # expert e's rows end here
        used = [e for e, c in enumerate(counts) if c]
        order = order.to(h.device)
        # Each (token, choice) gets its own row, summed over choices in a fixed order afterwards,
        # so the result does not depend on the order the provider hands experts out.
        out = h.new_zeros(B * T * self.top_k, H)                      # (N*k, H)
        for e, w in self.experts.fetch(self.layer, used, residual):
            rows = order[ends[e] - counts[e]:ends[e]]             # flat (token, choice) indices
            tokens = rows // self.top_k
            y = expert_forward(h[tokens].to(w.device), w).to(h.device)  # (n_e, H)
            out[rows] = y * weights.flatten()[rows, None]
        return out.view(B * T, self.top_k, H).sum(dim=1).view(B, T, H)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, experts):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.block_sparse_moe = MoEBlock(cfg, layer, experts)

    def forward(self, x, cos, sin, mask, cache, start) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h), residual=h)


class Transformer(nn.Module):
    """Embeddings, decoder layers, final norm, lm_head. Parameter names follow the checkpoint's
    (minus the leading `model.`), so a state dict loads without renaming."""

    def __init__(self, cfg: ModelConfig, experts):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, experts) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.kv_caches: list[KVCache] = []
        self.max_seq_len = 0
        experts.attach_router(self.guess_experts)

    def setup(self, max_seq_len: int, device, dtype, max_batch: int = 1):
        """Allocate the KV cache and rotary tables once, on the compute device."""
        cfg = self.config
        self.device, self.max_seq_len = torch.device(device), max_seq_len
        self.cos, self.sin = rope_tables(cfg, max_seq_len, device, dtype)
        self.kv_caches = [KVCache(max_batch, cfg.num_kv_heads, max_seq_len, cfg.head_dim, device, dtype)
                          for _ in range(cfg.num_layers)]

    def attention_mask(self, start: int, T: int, S: int) -> torch.Tensor | None:
        """(T, S) boolean: query at position start+t sees keys at positions <= it, within the window."""
        window = self.config.sliding_window
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
        mask = self.attention_mask(start, T, end if use_cache else T)
        x = self.embed_tokens(tokens)                                  # (B, T, H)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, self.kv_caches[i] if use_cache else None, start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()                      # (B, T, V)

    def guess_experts(self, layer: int, residual: torch.Tensor) -> torch.Tensor:
        """Which experts `layer` would pick for this residual stream: (N, k) ids. Used by the
        expert engine to prefetch ahead; only a guess, since the true input differs."""
        block = self.layers[layer]
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
    model.setup(max_seq_len, device, dtype, max_batch)
    return model.eval()


ExpertGuess = Callable[[int, torch.Tensor], torch.Tensor]
