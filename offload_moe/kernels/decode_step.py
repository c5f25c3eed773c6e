"""A decode step's small operations on the CPU in one C call each (`decode.c`): the attention of
each new token after its projections, RMSNorm of a few rows, a router's top-k, and a MoE layer's
experts on a few tokens (each expert's rows gathered and computed in one call, the choices weighted
and summed in one more). One sequence's step and a batched step of several sequences (`DecodeRows`:
row b is the next token of the sequence in KV slot slots[b]) take the same calls, so a sequence
computes the same numbers alone and in a batch.

Why: at batch 1 these are dozens of tiny torch ops per layer whose dispatch costs more than their
arithmetic (BENCHMARKS.md, "CPU decode step"). Each helper here is built once per module, holds the
arguments that never change, and answers None where it does not apply (another device, dtype or
shape, a prefill step), so the caller keeps its torch path: the same math, which the tests compare
against (`tests/test_decode_cpu.py`). `OFFLOAD_MOE_NATIVE=0` or no kernel library (native.status says why): always None.

The C side computes in fp32 and rounds once, where the torch path rounds after every op in bf16:
results differ from it by bf16 rounding, never more (the tests bound it); offloaded and resident
experts see the same inputs either way, so their bitwise equality is untouched.
"""

from __future__ import annotations

import ctypes

import torch

from . import native

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_ROWS = 64   # tokens per step the few-row calls take (a batched decode step); longer inputs: torch


def _code(t: torch.Tensor | None) -> int:
    return 0 if t is None else _DTYPES[t.dtype]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def supported(*tensors: torch.Tensor | None) -> bool:
    """Whether the library is here and takes these tensors (CPU, fp32 or bf16, contiguous)."""
    return native.load_decode() is not None and all(
        t is None or (t.device.type == "cpu" and t.dtype in _DTYPES and t.is_contiguous()) for t in tensors)


def rms_norm_row(x: torch.Tensor, weight: torch.Tensor, eps: float, scale_fp32: bool) -> torch.Tensor | None:
    """x [..., n] of up to MAX_ROWS rows normalised as `RMSNorm.forward` -> contiguous, or None."""
    n = x.shape[-1]
    if x.numel() > MAX_ROWS * n or weight.dtype != x.dtype or not supported(x, weight):
        return None
    out = torch.empty_like(x)
    native.load_decode().rms_norm_rows(x.data_ptr(), _code(x), n, weight.data_ptr(), _code(weight), n,
                                       x.numel() // n, eps, int(not scale_fp32), out.data_ptr(), _code(out))
    return out


class DecodeRows:
    """A batched decode step's rows: row b is the next token of the sequence in KV slot slots[b], at
    position positions[b]. Made once for the largest batch (`Transformer.setup`) and refilled each
    step (`set`), so the C calls get the same two arrays every step."""

    def __init__(self, capacity: int):
        self.c_slots = (ctypes.c_int64 * max(capacity, 1))()
        self.c_positions = (ctypes.c_int64 * max(capacity, 1))()
        self.slots: list[int] = []
        self.positions: list[int] = []

    def set(self, slots: list[int], positions: list[int]) -> "DecodeRows":
        if len(slots) > len(self.c_slots):
            raise ValueError(f"{len(slots)} rows in a step of at most {len(self.c_slots)}")
        self.slots, self.positions = slots, positions
        for b, (s, p) in enumerate(zip(slots, positions)):
            self.c_slots[b], self.c_positions[b] = s, p
        return self

    def __len__(self) -> int:
        return len(self.slots)

    def row(self, b: int, cos: torch.Tensor, sin: torch.Tensor, cache, window: int | None):
        """Row b as a one-sequence step takes it: (cos (1, d), sin, mask (1, S) or None, its slot's
        `KVRow`, its position); the torch path of a batched step."""
        p = self.positions[b]
        mask = None if window is None or p + 1 <= window else (torch.arange(p + 1, device=cos.device) > p - window)[None]
        return cos[p:p + 1], sin[p:p + 1], mask, cache.slot_rows[self.slots[b]], p


class AttentionStep:
    """One new token's attention for an `Attention` module: q/k norms, clamp, rotation, the cache
    write and grouped-query attention, from its projections to the input of o_proj."""

    def __init__(self, attn, window: int | None):
        self.attn, self.window = attn, window or 0
        self.norm_mode = {None: 0, "head": 1, "full": 2}[attn.qk_norm]
        self.clip = float(attn.clip) if attn.clip is not None else 0.0
        self.scale = attn.hd ** -0.5
        self.rope_pairs = {"half": 0, "adjacent": 1}[attn.rope_pairs]
        self._lib = native.load_decode()
        self._static = None   # the module's own tensors' arguments, checked on the first call
        self._one = (ctypes.c_int64 * 2)()   # a one-sequence call's slot and position

    def _moved(self) -> bool:
        """Whether the module's tensors were replaced since their arguments were taken (`.to()`)."""
        norms, sinks = self._kept if self._static else ((None, None), None)
        return (norms[0] is not None and norms[0].data_ptr() != self.attn.q_norm.weight.data_ptr()) or \
            (sinks is not None and sinks.data_ptr() != self.attn.sinks.data_ptr())

    def _static_args(self) -> tuple | None:
        """Norm weights and sinks as the call takes them (fixed once the weights are in place)."""
        a = self.attn
        norms = (a.q_norm.weight.detach(), a.k_norm.weight.detach()) if self.norm_mode else (None, None)
        sinks = a.sinks.detach() if a.sinks is not None else None
        if not supported(*norms, sinks) or norms[0] is not None and norms[0].dtype != norms[1].dtype:
            return None
        self._kept = (norms, sinks)
        return (_ptr(norms[0]), _ptr(norms[1]), _code(norms[0]), self.norm_mode,
                a.q_norm.eps if self.norm_mode else 0.0, self.clip, _ptr(sinks), _code(sinks))

    def _ready(self) -> bool:
        if self._static is None or self._moved():
            self._static = self._static_args() or ()
        return bool(self._static)

    def fixed_args(self) -> tuple | None:
        """The call's fixed arguments after the projections' (q norm, k norm, their dtype code, norm
        mode, eps, clip, sinks, sinks' dtype code), or None where the call does not apply."""
        return self._static if self._ready() else None

    def __call__(self, q, k, v, cos, sin, cache, start: int) -> torch.Tensor | None:
        """One sequence: q (1, 1, nh*hd), k, v (1, 1, nkv*hd) in the model's dtype; cos, sin (1, hd) the
        rotary rows of position `start`; `cache` its `KVCache` or `KVRow` (the window follows from the
        position). -> (1, 1, nh*hd), or None where the torch path must run."""
        a = self.attn
        if (not self._ready() or cache is None or q.shape[0] != 1 or q.shape[1] != 1 or cos.shape[-1] != a.hd
                or not q.dtype == k.dtype == v.dtype or not supported(q, k, v, cos, sin, cache.k)):
            return None
        self._one[0], self._one[1] = 0, start     # slot 0 of the cache given, position start
        return self._call(q, k, v, q.shape[-1], k.shape[-1], cos, sin, start, cache.k, cache.v, 0,
                          ctypes.addressof(self._one), ctypes.addressof(self._one) + 8, 1)

    def rows(self, q, k, v, cos, sin, cache, rows) -> torch.Tensor | None:
        """A batched step (`DecodeRows`): q (B, 1, nh*hd), k, v (B, 1, nkv*hd), each row's contiguous
        (views of one projection's output are fine); cos, sin the whole rotary tables (S, hd);
        `cache` the layer's `KVCache` of every slot. -> (B, 1, nh*hd), or None."""
        a = self.attn
        B = q.shape[0]
        if (not self._ready() or q.shape[1] != 1 or B > MAX_ROWS or cos.shape[-1] != a.hd
                or not q.dtype == k.dtype == v.dtype or q.dtype not in _DTYPES or q.device.type != "cpu"
                or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride(0) != v.stride(0)
                or not supported(cos, sin, cache.k, cache.v)):
            return None
        return self._call(q, k, v, q.stride(0), k.stride(0), cos, sin, 0, cache.k, cache.v, cache.k[0].numel(),
                          ctypes.addressof(rows.c_slots), ctypes.addressof(rows.c_positions), B)

    def _call(self, q, k, v, q_stride, kv_stride, cos, sin, rope_first, kc, vc, slot_stride, slots, positions, B):
        a = self.attn
        out = q.new_empty(B, 1, a.nh * a.hd)
        rc = self._lib.attn_decode_rows(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), _code(q), q_stride, kv_stride, cos.data_ptr(), sin.data_ptr(),
            _code(cos), rope_first, self.rope_pairs, *self._static, kc.data_ptr(), vc.data_ptr(), _code(kc), slot_stride, kc.shape[-2],
            slots, positions, B, self.window, a.nh, a.nkv, a.hd, self.scale, out.data_ptr(), _code(out),
            torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"attention of {B} new token(s): no memory for their scores")
        return out


class RouteStep:
    """A `MoEBlock`'s router on up to MAX_ROWS tokens: (weights (N, k) in x's dtype, ids (N, k)), as
    `MoEBlock.route` computes them without forced ids, or None."""

    RULES = {"softmax_topk": 0, "topk_softmax": 1}

    def __init__(self, block):
        cfg = block.cfg
        self.block, self.k = block, cfg.top_k
        self.rule = self.RULES.get(block.cfg.family.router_rule) if cfg.n_group <= 1 else None
        self._lib = native.load_decode()
        self._static = None   # the router's own tensors' arguments, checked on the first call

    def _static_args(self) -> tuple | None:
        gate, cfg = self.block.gate, self.block.cfg
        weight, bias = gate.weight.detach(), gate.bias.detach() if gate.bias is not None else None
        if self._lib is None or self.rule is None or not supported(weight, bias):
            return None
        self._kept = (weight, bias)
        return (weight.data_ptr(), _code(weight), _ptr(bias), _code(bias), cfg.num_experts, cfg.hidden_size, self.k,
                self.rule, int(bool(cfg.norm_topk_prob)), float(cfg.routed_scaling_factor))

    def fixed_args(self) -> tuple | None:
        """route_rows' router arguments (weight, its dtype code, bias, its code, E, H, k, rule,
        norm_topk, scaling), or None where the call does not apply."""
        return self._static_args() if self._lib is not None else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x (N, H) -> (weights (N, k), ids (N, k)), or None."""
        if self._static is None or self._static and self._kept[0].data_ptr() != self.block.gate.weight.data_ptr():
            self._static = self._static_args() or ()
        N = x.shape[0]
        if not self._static or N > MAX_ROWS or not supported(x):
            return None
        ids = torch.empty(N, self.k, dtype=torch.long)
        weights = torch.empty(N, self.k, dtype=x.dtype)
        round_logits = not self.block.router_fp32 and x.dtype != torch.float32
        rc = self._lib.route_rows(x.data_ptr(), _code(x), x.shape[-1], *self._static, int(round_logits), N,
                                  ids.data_ptr(), weights.data_ptr(), _code(weights), torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"router of MoE layer {self.block.layer}: "
                             f"top-{self.k} of {self.block.cfg.num_experts} experts")
        return weights, ids


class ExpertRows:
    """A MoE layer's routed experts on up to MAX_ROWS tokens (a decode step, one sequence or a
    batch): each expert the provider hands out computes the rows that chose it in one C call
    (gathered, its whole-expert kernel, each result put in its (token, choice) place), then one call
    weights and sums every token's choices in choice order. Experts without a kernel entry point
    (`Expert.entry`) compute through torch into the same places. Why: the grouped torch path costs
    an index, a product, a multiply and a scatter per expert, and a sort and a count per layer."""

    def __init__(self, k: int, hidden: int, num_experts: int):
        self.k, self.H = k, hidden
        self._lib = native.load_decode()
        self._scratch = torch.empty(0)   # (N*k, H): each (token, choice)'s expert output, grown when needed
        # a layer's experts for one call that spreads them over the threads (`moe_experts_rows`)
        self._ids = (ctypes.c_int64 * num_experts)()
        self._calls = (ctypes.c_void_p * num_experts)()
        self._args = (ctypes.c_void_p * num_experts)()

    def takes(self, h: torch.Tensor) -> bool:
        """Whether h (N, H) goes this way."""
        return (self._lib is not None and h.shape[0] <= MAX_ROWS and h.device.type == "cpu"
                and h.dtype in _DTYPES and h.is_contiguous())

    def __call__(self, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fetched,
                 stable: bool = False) -> torch.Tensor:
        """h (N, H); weights (N, k) in h's dtype; ids (N*k,) int64, the routing ids as read to the host
        (`HostIds`; on the CPU the same memory); `fetched` the provider's
        (expert id, Expert) pairs for every distinct id -> (N, H). `stable`: what the provider hands
        out stays valid for the whole layer (resident experts; not a slot cache, which reuses a slot
        as soon as its expert is done), so the experts can be gathered and computed in one call."""
        N, k, H = h.shape[0], self.k, self.H
        if self._scratch.dtype != h.dtype or self._scratch.numel() < N * k * H:
            self._scratch = torch.empty(max(N * k * H, self._scratch.numel()), dtype=h.dtype)
        per_choice = self._scratch[:N * k * H].view(N * k, H)                          # (N*k, H)
        ids = ids.contiguous()                                                          # (N*k,)
        weights = weights.contiguous()
        code, threads = _DTYPES[h.dtype], torch.get_num_threads()
        args = (h.data_ptr(), code, H, N, H, k, ids.data_ptr())
        held = 0
        for e, expert in fetched:
            entry = expert.entry
            if entry is not None and N < entry[2] and expert.device.type == "cpu":
                if stable:
                    self._ids[held], self._calls[held], self._args[held] = e, entry[0], entry[1]
                    held += 1
                    continue
                self._check(e, self._lib.moe_expert_rows(*args, e, entry[0], entry[1], per_choice.data_ptr(), threads))
            else:
                places = (ids == e).nonzero().view(-1)                                   # (n,) flat (token, choice)
                per_choice[places] = expert(h, places // k)                             # (n, H)
        if held >= 2 * threads:   # enough experts to keep every thread busy: one parallel region for them all
            self._check(None, self._lib.moe_experts_rows(*args, held, ctypes.addressof(self._ids),
                                                         ctypes.addressof(self._calls), ctypes.addressof(self._args),
                                                         per_choice.data_ptr(), threads))
        else:                     # a few: each with every thread
            for j in range(held):
                self._check(self._ids[j], self._lib.moe_expert_rows(*args, self._ids[j], self._calls[j], self._args[j],
                                                                    per_choice.data_ptr(), threads))
        out = torch.empty_like(h)
        self._lib.moe_combine(per_choice.data_ptr(), code, weights.data_ptr(), _DTYPES[weights.dtype], N, k, H,
                              out.data_ptr())
        return out

    @staticmethod
    def _check(e: int | None, rc: int) -> None:
        if rc != 0:
            which = "an expert" if e is None else f"expert {e}"
            raise MemoryError(f"{which}: no scratch for its rows") if rc == -1 else \
                ValueError(f"{which}: the kernel refused its rows")


__all__ = ["AttentionStep", "DecodeRows", "ExpertRows", "MAX_ROWS", "RouteStep", "rms_norm_row", "supported"]
