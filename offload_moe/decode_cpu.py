"""A decode step's small operations on the CPU in one C call each (`decode.c`): one token's
attention after its projections, RMSNorm of one row, a router's top-k for one token.

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

import torch

from .quant import native

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _code(t: torch.Tensor | None) -> int:
    return 0 if t is None else _DTYPES[t.dtype]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def supported(*tensors: torch.Tensor | None) -> bool:
    """Whether the library is here and takes these tensors (CPU, fp32 or bf16, contiguous)."""
    return native.load_decode() is not None and all(
        t is None or (t.device.type == "cpu" and t.dtype in _DTYPES and t.is_contiguous()) for t in tensors)


def rms_norm_row(x: torch.Tensor, weight: torch.Tensor, eps: float, scale_fp32: bool) -> torch.Tensor | None:
    """One row (x.numel() == its last dimension) normalised as `RMSNorm.forward`, or None."""
    if x.numel() != x.shape[-1] or weight.dtype != x.dtype or not supported(x, weight):
        return None
    out = torch.empty_like(x)
    native.load_decode().rms_norm_row(x.data_ptr(), _code(x), weight.data_ptr(), _code(weight), x.numel(), eps,
                                      int(not scale_fp32), out.data_ptr(), _code(out))
    return out


class AttentionStep:
    """One new token's attention for an `Attention` module: q/k norms, clamp, rotation, the cache
    write and grouped-query attention, from its projections to the input of o_proj."""

    def __init__(self, attn, window: int | None):
        self.attn, self.window = attn, window or 0
        self.norm_mode = {None: 0, "head": 1, "full": 2}[attn.qk_norm]
        self.clip = float(attn.clip) if attn.clip is not None else 0.0
        self.scale = attn.hd ** -0.5
        self._lib = native.load_decode()
        self._static = None   # the module's own tensors' arguments, checked on the first call

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

    def __call__(self, q, k, v, cos, sin, cache, start: int, windowed: bool) -> torch.Tensor | None:
        """q (1, 1, nh*hd), k, v (1, 1, nkv*hd) in the model's dtype; cos, sin (1, hd) the rotary rows
        of position `start`; `windowed`: the step's mask limits the keys to the layer's window.
        -> (1, 1, nh*hd), or None where the torch path must run."""
        a = self.attn
        if self._static is None or self._moved():
            self._static = self._static_args() or ()
        if (not self._static or cache is None or q.shape[0] != 1 or q.shape[1] != 1 or cos.shape[-1] != a.hd
                or not q.dtype == k.dtype == v.dtype or not supported(q, k, v, cos, sin, cache.k)):
            return None
        out = torch.empty_like(q)
        rc = self._lib.attn_decode(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), _code(q), cos.data_ptr(), sin.data_ptr(), _code(cos),
            *self._static, cache.k.data_ptr(), cache.v.data_ptr(), _code(cache.k),
            cache.k.shape[2], start, self.window if windowed else 0, a.nh, a.nkv, a.hd, self.scale,
            out.data_ptr(), _code(out), torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"attention of position {start}: no memory for its scores")
        return out


class RouteStep:
    """A `MoEBlock`'s router on one token: (weights (1, k) in x's dtype, ids (1, k)), as
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

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._static is None or self._static and self._kept[0].data_ptr() != self.block.gate.weight.data_ptr():
            self._static = self._static_args() or ()
        if not self._static or x.shape[0] != 1 or not supported(x):
            return None
        ids = torch.empty(1, self.k, dtype=torch.long)
        weights = torch.empty(1, self.k, dtype=x.dtype)
        round_logits = not self.block.router_fp32 and x.dtype != torch.float32
        rc = self._lib.route_one(x.data_ptr(), _code(x), *self._static, int(round_logits),
                                 ids.data_ptr(), weights.data_ptr(), _code(weights))
        if rc != 0:
            raise ValueError(f"router of MoE layer {self.block.layer}: "
                             f"top-{self.k} of {self.block.cfg.num_experts} experts")
        return weights, ids


__all__ = ["AttentionStep", "RouteStep", "rms_norm_row", "supported"]
