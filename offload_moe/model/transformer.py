"""The MoE decoder in plain PyTorch, following transformers' `MixtralForCausalLM` math; the other
families (Qwen3-MoE, OLMoE, Qwen2-MoE, DeepSeek-V2, gpt-oss, Llama 4) are small branches switched by
`ModelConfig` fields and the family's adapter (`cfg.family`, see `arch`).

Read top to bottom: one decoder layer, then the whole stack (its KV cache slots, rotary tables, prompt
and batched decode steps). The parts sit beside it: norms, rotary embeddings, the KV cache and both
attentions in `attention.py`, the Gated DeltaNet in `linear_attention.py`, the router rules and the
`Routing` strategy in `routing.py`, the sparse MoE block and the dense MLP in `moe.py`. Routed
experts are not part of the model package: the MoE block asks an injected provider
(`model.expert_interface.ExpertProvider`: `fetch(layer, ids, tokens, guesses)`) for the experts its
tokens chose. Routing ids and guesses reach the host in one copy per MoE layer (`moe.HostIds`), the
only time a decode step's layer waits for the device (`tests/test_host_syncs.py` counts, for every
family). A benchmark replays a trace by giving the model a `Routing` strategy.

Shape letters: B batch, T new tokens, S cached positions, H hidden size, nh / nkv query / key-value
heads, hd head dim, E experts, k experts per token, N = B*T tokens, V vocab, r latent rank (MLA),
d rotated dims per head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .attention import RMSNorm, rope_tables, apply_rope_partial, KVCache, KVRow, Attention, LatentAttention
from ..checkpoints.config import ModelConfig
from ..kernels.decode_step import DecodeRows, ExpertRows, RouteStep
from ..kernels.layer_step import LayerFront, LayerStack
from ..base.errors import OffloadMoeError
from .moe import MLP, HostIds, MoEBlock
from .routing import Routing
from .expert_interface import ExpertProvider
from .kv_slots import DEFAULT_KEEP_BYTES, KVSlots
from .linear_attention import GatedDeltaNet, RecurrentState
from ..kernels import native
from ..kernels.cpu_bf16 import pack_linears
from ..kernels.modules import QEmbedding, QLinear


class DecoderLayer(nn.Module):
    """Attention and an MLP: the MoE block (`block_sparse_moe`), or in a dense layer a dense `mlp`."""

    def __init__(self, cfg: ModelConfig, layer: int, experts):
        super().__init__()
        fp32 = cfg.family.norm_scale_fp32
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fp32)
        self.linear = cfg.is_linear(layer)
        if self.linear:  # Gated DeltaNet: a recurrent state instead of a KV cache
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = LatentAttention(cfg) if cfg.mla else Attention(cfg, cfg.window(layer), layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fp32)
        self.dense = layer in cfg.dense_layers
        if self.dense:
            self.mlp = MLP(cfg.hidden_size, cfg.dense_intermediate_size)
        else:  # the expert engine numbers MoE layers without the dense ones
            self.block_sparse_moe = MoEBlock(cfg, cfg.moe_layers.index(layer), experts)
        self.front: LayerFront | None = None  # a decode step's attention half and router in one C call (CPU)

    def forward(self, x, cos, sin, mask, cache, start, moe: Callable | None = None, whole: bool = False
                ) -> torch.Tensor:
        """`moe(block, x, residual, routed)` runs the MoE block (the transformer adds routing and guesses).
        whole: the layer's own router decides (no routing strategy), so a decode step on the CPU may
        compute the whole layer in one C call where its experts allow."""
        if self.front is not None:
            out = self.front.whole(x, cos, sin, cache, start) if whole and not self.dense else None
            if out is not None:
                return out
            done = self.front(x, cos, sin, cache, start)         # same bits as the path below, in one call
            if done is not None:
                h, xn, routed = done                               # (B, 1, H), (B, H), (weights, ids) or None
                if self.dense:
                    return h + self.mlp(xn.view_as(h))
                return h + moe(self.block_sparse_moe, xn.view_as(h), h, routed)
        mixer = self.linear_attn if self.linear else self.self_attn
        h = x + mixer(self.input_layernorm(x), cos, sin, mask, cache, start)
        if self.dense:
            return h + self.mlp(self.post_attention_layernorm(h))
        return h + moe(self.block_sparse_moe, self.post_attention_layernorm(h), h)


class Transformer(nn.Module):
    """Embeddings, decoder layers, final norm, lm_head. Parameter names follow the checkpoint's
    (minus the leading `model.`), so a state dict loads without renaming."""

    def __init__(self, cfg: ModelConfig, experts: ExpertProvider):
        super().__init__()
        self.config = cfg
        # given its (meta) weight, nn.Embedding skips its random init, whose normal_ on the meta device
        # imports torch._dynamo: 6-7 s of a fresh process's load on a 2-core machine
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, experts) for i in range(cfg.num_layers))
        self.spans = [(cfg.window(i), cfg.chunk(i)) for i in range(cfg.num_layers)]  # sliding window, chunk
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.family.norm_scale_fp32)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.kv_caches: list[KVCache] = []
        self.kv_rows: list[list[KVRow]] = []   # [slot][layer]: one sequence's cache in each layer
        self.kv_slots = KVSlots([])            # which tokens each slot holds; kept sequences (prefix reuse)
        self.max_seq_len = 0
        self.experts = experts                  # the provider, shared by every MoE block
        self.routing: Routing | None = None     # None: the routers decide (see `set_routing`)
        self.stack: LayerStack | None = None    # a CPU decode step through every layer in one C call

    def setup(self, max_seq_len: int, device, dtype, max_batch: int = 1):
        """Allocate the KV cache and rotary tables once, on the compute device."""
        cfg = self.config
        self.device, self.dtype, self.max_seq_len = torch.device(device), dtype, max_seq_len
        try:
            # DeepSeek rotates in fp32 from fp32 tables; the others cast the tables to the compute dtype
            fp32 = cfg.mla or cfg.family.rope_interleaved  # so is Llama 4's complex product
            self.cos, self.sin = rope_tables(cfg, max_seq_len, device, torch.float32 if fp32 else dtype)
            if cfg.mla:  # the latent and the rotated key part, shared by all heads
                shape = (1, max_seq_len, cfg.mla.kv_lora_rank, device, dtype, cfg.mla.qk_rope_head_dim)
            else:
                shape = (cfg.num_kv_heads, max_seq_len, cfg.head_dim, device, dtype)
            self.kv_caches = [RecurrentState(max_batch, cfg, device, dtype) if cfg.is_linear(i) else
                              KVCache(max_batch, *shape) for i in range(cfg.num_layers)]
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            self.kv_caches, self.cos, self.sin = [], None, None
            if not allocation_failed(e):
                raise
            size = torch.finfo(dtype).bits // 8
            need = max_batch * (max_seq_len * cfg.kv_cache_bytes_per_token(size) + cfg.recurrent_state_bytes(size))
            raise OffloadMoeError(f"context_length = {max_seq_len}: the KV cache ({need / 1e9:.2f} GB) and rotary "
                                  f"tables cannot be allocated on {device} (out of memory: a memory limit such "
                                  "as ulimit -v or a cgroup?); lower --context-length") from None
        self.kv_rows = [list(rows) for rows in zip(*(c.rows() for c in self.kv_caches))]
        self.decode_rows_of = DecodeRows(max_batch)   # a batched step's slots and positions, refilled each step
        for layer in self.layers:
            if not layer.linear and isinstance(layer.self_attn, Attention):
                layer.self_attn.setup(max_seq_len, device)
        # context shift for grouped-query attention (MLA's rotated key part is untested, Llama 4's NoPE and
        # chunked layers would need their own: no shift there)
        # a recurrent state holds a whole sequence: no context shift, no partial reuse (`KVSlots`)
        recurrent = cfg.linear_attention is not None
        shift = None if cfg.mla or recurrent or cfg.family.rope_interleaved else self.shift_kv
        self.kv_slots = KVSlots([c for c in self.kv_caches if isinstance(c, KVCache)],
                                getattr(self.kv_slots, "keep_bytes", DEFAULT_KEEP_BYTES), shift=shift, recurrent=recurrent)
        # decode's routing ids and the next layers' guesses come back in one copy per MoE layer
        depth = min(self.experts.prefetch_depth, cfg.num_moe_layers - 1)
        self.ids_to_host = HostIds(max_batch * cfg.top_k * (1 + max(depth, 0)), device)

    @torch.no_grad()
    def shift_kv(self, slot: int, src: int, dst: int, n: int) -> None:
        """Context shift: move the cached positions src..src+n-1 of `slot` down to dst.. (dst < src),
        dropping what lay between (grouped-query attention only). Values move as they are; keys are rotated
        back by src - dst positions, since a rotary position is a rotation: R(p - d) = R(-d) R(p).
        The moved keys and values still carry what attention saw of the dropped positions when they
        were computed (as llama.cpp's context shift): close to, not equal to, a fresh prefill."""
        d = src - dst
        cos, sin = rope_tables(self.config, d + 1, self.device, torch.float32)      # (d+1, r)
        c, s = cos[d] / cos[0], sin[d] / cos[0]     # the pure rotation by d (YaRN scales the tables)
        for cache in self.kv_slots.caches:
            k, v = cache.k[slot, :, src:src + n], cache.v[slot, :, src:src + n]     # (nkv, n, hd), (nkv, n, hd)
            k = apply_rope_partial(k.float(), c, -s, self.config.rope_pairs).to(k.dtype)   # the rotated dims only
            v = v.clone()
            cache.k[slot, :, dst:dst + n] = k
            cache.v[slot, :, dst:dst + n] = v

    def set_slots(self, slots: int) -> None:
        """Reallocate the KV cache for `slots` sequences at once (continuous batching); what the
        cache held is forgotten."""
        kv = self.kv_slots.caches[0]
        if slots != kv.k.shape[0]:
            self.setup(self.max_seq_len, self.device, kv.k.dtype, slots)

    def prepare_cpu_decode(self) -> None:
        """On the CPU, a decode step's attention (between its projections), norms and routers run
        as one C call each (`decode_cpu.py`) where the library is available."""
        for layer in self.layers:
            if not layer.linear and isinstance(layer.self_attn, Attention):
                layer.self_attn.prepare_cpu_decode()
                layer.front = LayerFront(layer)
            if not layer.dense:
                block = layer.block_sparse_moe
                block.decode_route = RouteStep(block)
                block.decode_experts = ExpertRows(block.top_k, self.config.hidden_size, block.num_experts)
        if all(layer.front is not None and not layer.dense for layer in self.layers):
            self.stack = LayerStack([layer.front for layer in self.layers])

    def set_routing(self, routing: Routing | None) -> None:
        """Route by `routing` (e.g. a recorded trace) instead of the routers; None: the routers again."""
        self.routing = routing

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        """The MoE block of each MoE layer, in the expert engine's numbering (dense layers have none)."""
        return [self.layers[i].block_sparse_moe for i in self.config.moe_layers]

    def attention_mask(self, start: int, T: int, S: int, span: tuple[int | None, int | None] = (None, None)
                       ) -> torch.Tensor | None:
        """(T, S) boolean: query at position start+t sees keys at positions <= it, within the sliding
        window and the chunk of `span` = (window, chunk)."""
        window, chunk = span
        if T == 1 and (window is None or S <= window) and (chunk is None or start < chunk):
            return None  # a single new token sees everything cached
        q_pos = torch.arange(start, start + T, device=self.device)[:, None]
        k_pos = torch.arange(S, device=self.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask = mask & (k_pos > q_pos - window)
        if chunk is not None:
            mask = mask & (k_pos // chunk == q_pos // chunk)
        return mask

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start: int = 0, use_cache: bool = True,
                last_only: bool = False, slot: int | None = None) -> torch.Tensor:
        """tokens (B, T) at positions start..start+T-1 -> logits (B, T or 1, V) in fp32.

        With use_cache the KV cache is read and written (generation): rows 0..B-1, or with `slot`
        (B = 1) that one row; without it the call is stateless and must start at 0 (scoring whole sequences)."""
        B, T = tokens.shape
        end = start + T
        if end > self.max_seq_len:
            raise ValueError(f"sequence of {end} positions exceeds the context of {self.max_seq_len}")
        cos, sin = self.cos[start:end], self.sin[start:end]
        masks = {w: self.attention_mask(start, T, end if use_cache else T, w) for w in set(self.spans)}
        caches = (self.kv_caches if slot is None else self.kv_rows[slot]) if use_cache else [None] * len(self.layers)
        written = (range(B) if slot is None else (slot,)) if use_cache else ()
        self.kv_slots.stale.update(written)  # recurrent states change in place: not reusable should this raise
        x = self.embed_tokens(tokens)                                  # (B, T, H)
        out = self.stack(x, cos, sin, caches, start) if self.stack is not None and self.routing is None else None
        for i, layer in enumerate(self.layers if out is None else ()):
            x = layer(x, cos, sin, masks[self.spans[i]], caches[i], start, self.moe_step, self.routing is None)
        x = x if out is None else out
        self.kv_slots.stale.difference_update(written)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()                      # (B, T, V)

    @torch.no_grad()
    def decode_rows(self, tokens: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """A batched decode step: row b is the next token (tokens (B,)) of the sequence in KV slot
        slots[b], at position positions[b] -> logits (B, V) in fp32. Projections, routers and experts
        run on all rows at once (each expert's weights read once for every row routed to it);
        attention runs each row over its own sequence (on the CPU all rows in one C call)."""
        B = tokens.shape[0]
        if max(positions) >= self.max_seq_len:
            raise ValueError(f"position {max(positions)} exceeds the context of {self.max_seq_len}")
        # recurrent states and chunked attention take each row's own cache row and mask (lists); the others
        # one `DecodeRows` (slots and positions) that the CPU's C attention call reads for all rows at once
        per_row = self.config.linear_attention is not None or self.config.attention_chunk is not None
        if per_row:
            cos = [self.cos[p:p + 1] for p in positions]               # B x (1, d)
            sin = [self.sin[p:p + 1] for p in positions]
            masks = {w: [self.attention_mask(p, 1, p + 1, w) for p in positions] for w in set(self.spans)}
        else:
            rows = self.decode_rows_of.set(slots, positions)
        x = self.embed_tokens(tokens.view(B, 1))                       # (B, 1, H)
        self.kv_slots.stale.update(slots)
        out = None
        if not per_row and self.stack is not None and self.routing is None:
            out = self.stack(x, self.cos, self.sin, self.kv_caches, rows)
        for i, layer in enumerate(self.layers if out is None else ()):
            if per_row:
                x = layer(x, cos, sin, masks[self.spans[i]], [self.kv_rows[s][i] for s in slots], positions,
                          self.moe_step)
            else:
                x = layer(x, self.cos, self.sin, None, self.kv_caches[i], rows, self.moe_step, self.routing is None)
        self.kv_slots.stale.difference_update(slots)
        x = x if out is None else out
        return self.lm_head(self.norm(x)).float()[:, 0]               # (B, V)

    def moe_step(self, block: MoEBlock, x: torch.Tensor, residual: torch.Tensor,
                 routed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One MoE layer: its routing (the routers, or the strategy given; `routed` the router's
        (weights, ids) already computed) and, in decode, the next layers' guesses the provider asked
        for, handed over with the request."""
        N = x.shape[0] * x.shape[1]
        forced = self.routing.forced(block.layer, N) if self.routing is not None else None
        ahead = range(block.layer + 1, min(block.layer + 1 + self.experts.prefetch_depth, self.config.num_moe_layers))
        guesses = None
        if N == 1 and len(ahead):
            guesses = torch.stack([self.guess_experts(layer, residual) for layer in ahead])  # (D, N, k)
        return block(x, self.ids_to_host, forced, guesses, routed if forced is None else None)

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


def allocation_failed(e: BaseException) -> bool:
    """torch's ways of saying an allocation failed: CUDA's OutOfMemoryError, the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory"), Python's MemoryError."""
    return isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or \
        "can't allocate memory" in str(e) or "out of memory" in str(e).lower()


def build_transformer(cfg: ModelConfig, dense: dict, experts, *, device, dtype,
                      max_seq_len: int, max_batch: int = 1) -> Transformer:
    """Construct on the meta device, swap in quantized modules for packed weights, then adopt the
    dense tensors (already on device/dtype)."""
    with torch.device("meta"):
        model = Transformer(cfg, experts)
    if cfg.tie_word_embeddings:
        dense = {**dense, "lm_head.weight": dense["embed_tokens.weight"]}
    if cfg.zero_centred_norms:  # stored as weight - 1: the scale is 1 + weight, kept in fp32 (as transformers computes it)
        dense |= {n: w.float() + 1 for n, w in dense.items()
                  if n.endswith("norm.weight") and not n.endswith("linear_attn.norm.weight")}
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
    for module in model.modules():
        if isinstance(module, Attention):
            module.fuse_projections()
    if torch.device(device).type == "cpu" and native.load_decode() is not None:
        model.prepare_cpu_decode()
    model.setup(max_seq_len, device, dtype, max_batch)
    return model.eval()

