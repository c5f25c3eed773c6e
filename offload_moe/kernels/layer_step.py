"""A decoder layer's attention half and router in one C call per decode step (`decode_layer.c`).

A decode step of a layer on the CPU was already a handful of C calls (the norms, q/k/v in one
projection, the attention, o_proj, the router: `decode_step.py` and the weights' kernels), but the
Python between them (module calls, views, checks, new tensors) cost ~0.5 ms a layer: about a fifth
of a step of a 30 B-parameter MoE on two cores. `LayerFront` makes the same calls with the same
arguments from C, so the results are the same bits as the call-by-call path; only the experts
(whose provider decides where they come from) stay in Python.

Built once per layer (`DecoderLayer.prepare_cpu_decode`); answers None where it does not apply
(another device or dtype, a prefill step, a projection without a kernel entry point, a batch of
as many rows as a kernel's dense crossover), and the caller keeps its call-by-call path.
`OFFLOAD_MOE_NATIVE=0` or no kernel library: always None.
"""

from __future__ import annotations

import ctypes

import torch

from . import native
from .decode_step import DecodeRows, MAX_ROWS, supported

DTYPES = native.DTYPE_CODES   # the activation dtypes the call takes, by code


class LayerFront:
    """`front(x, cos, sin, cache, start)` for one decoder layer: x (B, 1, H) the residual stream ->
    (h (B, 1, H) the stream after attention, xn (B, H) its post-attention norm, (weights (B, k),
    ids (B, k)) the router's choices, or None for a dense layer), or None. `start` as
    `Attention.forward` takes it: one sequence's position (cache its `KVCache` or `KVRow`, cos/sin
    the position's rotary rows) or a batched step's `DecodeRows` (cache the layer's `KVCache`,
    cos/sin the whole tables). The outputs are this layer's buffers, reused by its next step."""

    def __init__(self, layer):
        self.layer = layer
        self._lib = native.load_decode()
        self._args: native.LayerFrontArgs | None = None
        self._built_for: tuple | None = None    # (dtype, the tensors' addresses) the arguments were taken for
        self._one = (ctypes.c_int64 * 2)()       # a one-sequence step's slot and position
        self._buffers: dict[tuple, tuple] = {}

    def _build(self, dtype: torch.dtype) -> native.LayerFrontArgs | None:
        layer = self.layer
        attn = getattr(layer, "self_attn", None)
        step = getattr(attn, "decode_step", None)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        qkv, o = getattr(getattr(attn, "qkv", None), "c_call", None), getattr(getattr(attn, "o_proj", None), "c_call", None)
        fixed = step.fixed_args() if step is not None else None
        if (self._lib is None or fixed is None or qkv is None or o is None
                or getattr(attn.o_proj, "bias", None) is not None or dtype not in DTYPES
                or any(n.weight.dtype != dtype or n.scale_fp32 != norms[0].scale_fp32 or n.eps != norms[0].eps
                       for n in norms) or not supported(*(n.weight for n in norms))):
            return None
        route = None
        if not layer.dense:
            block = layer.block_sparse_moe
            router = block.decode_route
            route = router.fixed_args() if router is not None else None
            if route is None:
                return None
            round_logits = int(not block.router_fp32 and dtype != torch.float32)
        q_norm, k_norm, norm_code, norm_mode, norm_eps, clip, sinks, sinks_code = fixed
        a = native.LayerFrontArgs(
            hidden=norms[0].weight.shape[0], norm1=norms[0].weight.data_ptr(), norm2=norms[1].weight.data_ptr(),
            norm_dtype=DTYPES[dtype], half_scale=int(not norms[0].scale_fp32), eps=norms[0].eps,
            qkv_call=qkv[0], qkv_args=qkv[1], q_width=attn.q_width, kv_width=attn.nkv * attn.hd,
            o_call=o[0], o_args=o[1], q_norm=q_norm, k_norm=k_norm, qk_norm_dtype=norm_code, qk_norm_mode=norm_mode,
            qk_norm_eps=norm_eps, clip=clip, sinks=sinks, sinks_dtype=sinks_code, rope_pairs=step.rope_pairs,
            window=step.window, nh=attn.nh, nkv=attn.nkv, hd=attn.hd, scale=step.scale)
        if route is not None:
            (a.gate, a.gate_dtype, a.gate_bias, a.gate_bias_dtype, a.experts, _, a.k, a.rule, a.norm_topk,
             a.scaling) = route
            a.round_logits = round_logits
        self.k = int(a.k)
        self.limit = min(qkv[2], o[2], MAX_ROWS + 1)
        # the objects whose fixed-argument structs the call points into, kept alive with it
        self._owners = (attn.qkv, attn.o_proj, step, getattr(layer, "block_sparse_moe", None))
        return a

    def _current(self, dtype: torch.dtype) -> native.LayerFrontArgs | None:
        """The arguments, taken again when the dtype, the layer's tensors (`.to()`) or its projections
        (`Attention.qkv` given up) changed."""
        layer, attn = self.layer, self.layer.self_attn
        key = (dtype, layer.input_layernorm.weight.data_ptr(), attn.qkv, attn.o_proj, attn.decode_step)
        if key != self._built_for:
            self._args, self._built_for = self._build(dtype), key
        return self._args

    def _outputs(self, B: int, H: int, dtype: torch.dtype) -> tuple:
        out = self._buffers.get((B, dtype))
        if out is None:
            k = getattr(self, "k", 0)
            out = self._buffers[(B, dtype)] = (torch.empty(B, 1, H, dtype=dtype), torch.empty(B, H, dtype=dtype),
                                               torch.empty(B, max(k, 1), dtype=dtype),
                                               torch.empty(B, max(k, 1), dtype=torch.int64))
        return out

    def _rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, start) -> tuple | None:
        """The call's arguments after the fixed ones, from `Attention.forward`'s, or None."""
        B, T, H = x.shape
        a = self._current(x.dtype) if T == 1 and x.device.type == "cpu" else None
        if a is None or B >= self.limit or not x.is_contiguous() or cache is None:
            return None
        kc, vc = cache.k, cache.v
        if isinstance(start, int):
            if B != 1:
                return None
            self._one[0], self._one[1] = 0, start
            slots = positions = ctypes.addressof(self._one)
            positions += 8
            slot_stride, rope_first = 0, start
        elif isinstance(start, DecodeRows):
            slots, positions = ctypes.addressof(start.c_slots), ctypes.addressof(start.c_positions)
            slot_stride, rope_first = kc[0].numel(), 0
        else:
            return None
        if cos.shape[-1] != a.hd or not supported(cos, sin, kc, vc) or kc.dtype != vc.dtype:
            return None
        return (x.data_ptr(), DTYPES[x.dtype], B, cos.data_ptr(), sin.data_ptr(), DTYPES[cos.dtype], rope_first,
                kc.data_ptr(), vc.data_ptr(), DTYPES[kc.dtype], slot_stride, kc.shape[-2], slots, positions)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, start):
        rows = self._rows(x, cos, sin, cache, start)
        if rows is None:
            return None
        B, _, H = x.shape
        h, xn, weights, ids = self._outputs(B, H, x.dtype)
        routed = not self.layer.dense
        rc = self._lib.layer_front(ctypes.byref(self._args), *rows, h.data_ptr(), xn.data_ptr(),
                                   ids.data_ptr() if routed else None, weights.data_ptr() if routed else None,
                                   torch.get_num_threads())
        self._check(rc)
        return h, xn, ((weights, ids) if routed else None)

    def whole(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, start) -> torch.Tensor | None:
        """The whole MoE layer in one call (`layer_step`): x -> the residual stream after the layer,
        (B, 1, H), where the layer's experts provider hands out a C table of its experts
        (`expert_table`: resident experts where they lie) and the block has nothing else to add (no
        shared expert, routing weights applied to the outputs); else None. The same calls as the
        front, the provider's experts and `ExpertRows`, so the same bits."""
        table = self._table()
        rows = self._rows(x, cos, sin, cache, start) if table is not None else None
        if rows is None:
            return None
        B, _, H = x.shape
        out = torch.empty_like(x)
        ids = self._outputs(B, H, x.dtype)[3]
        self._check(self._lib.layer_step(ctypes.byref(self._args), ctypes.byref(table), *rows, out.data_ptr(),
                                         ids.data_ptr(), torch.get_num_threads()))
        return out

    def _table(self):
        block = getattr(self.layer, "block_sparse_moe", None)
        if block is None or block.shared_expert is not None or block.scales_input or self._lib is None:
            return None
        provider = block.experts
        get = getattr(provider, "expert_table", None)
        if get is None or getattr(provider, "prefetch_depth", 0):
            return None
        return get(block.layer)

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise (MemoryError if rc == -1 else ValueError)(
                f"decode step of layer {getattr(self.layer.self_attn, 'layer', '?')}: the C layer call failed ({rc})")





class LayerStack:
    """A decode step through every layer in one C call (`layers_step`), where every layer is a MoE
    layer that `LayerFront.whole` computes: `stack(x, cos, sin, caches, start)` -> the stream after
    the last layer (B, 1, H), or None (then the layers run one call each). `caches` the per-layer
    caches `Transformer.forward` passes (one sequence: its `KVRow`s or the `KVCache`s, `start` its
    position) or the layer's `KVCache`s with a `DecodeRows` start (a batched step). Why: the Python
    between the layers' calls (module calls, checks) was ~1 ms a token. The same calls in the same
    order: the same bits as one `whole` call per layer."""

    def __init__(self, fronts: list[LayerFront]):
        self.fronts = fronts
        self._lib = native.load_decode()
        self._built: dict[tuple, tuple] = {}     # (mode, dtype, the caches' addresses) -> (layer array, front args)
        self._one = (ctypes.c_int64 * 2)()

    def _layers(self, caches: list, batched: bool, dtype: torch.dtype):
        """The C array of the layers' arguments for these caches, built once (None where a layer cannot)."""
        if any(c is None for c in caches):
            return None
        key = (batched, dtype, tuple(c.k.data_ptr() for c in caches), tuple(c.v.data_ptr() for c in caches))
        built = self._built.get(key)
        if built is not None and all(f._args is a for f, a in zip(self.fronts, built[1])):
            return built[0]
        arr, fronts_args = None, []
        if self._lib is not None and len(caches) == len(self.fronts):
            items = []
            for front, cache in zip(self.fronts, caches):
                a = front._current(dtype)
                table = front._table() if a is not None else None
                if table is None or cache is None or not supported(cache.k, cache.v) or cache.k.dtype != cache.v.dtype:
                    items = None
                    break
                kc, vc = cache.k, cache.v
                items.append(native.LayerStackArgs(ctypes.pointer(a), ctypes.pointer(table), kc.data_ptr(), vc.data_ptr(),
                                                   DTYPES[kc.dtype], kc[0].numel() if batched else 0, kc.shape[-2]))
                fronts_args.append(a)
            if items:
                arr = (native.LayerStackArgs * len(items))(*items)
        self._built[key] = (arr, tuple(fronts_args) if arr is not None else tuple(f._args for f in self.fronts))
        return arr

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list, start):
        B, T, H = x.shape
        if T != 1 or x.device.type != "cpu" or x.dtype not in DTYPES or not x.is_contiguous():
            return None
        batched = isinstance(start, DecodeRows)
        if not batched and (not isinstance(start, int) or B != 1):
            return None
        arr = self._layers(caches, batched, x.dtype)
        if arr is None or B >= self.fronts[0].limit or not supported(cos, sin) or cos.shape[-1] != arr[0].front.contents.hd:
            return None
        if batched:
            slots, positions, rope_first = ctypes.addressof(start.c_slots), ctypes.addressof(start.c_positions), 0
        else:
            self._one[0], self._one[1] = 0, start
            slots, rope_first = ctypes.addressof(self._one), start
            positions = slots + 8
        out = torch.empty_like(x)
        self.fronts[0]._check(self._lib.layers_step(ctypes.addressof(arr), len(arr), x.data_ptr(), DTYPES[x.dtype], B,
                                                    cos.data_ptr(), sin.data_ptr(), DTYPES[cos.dtype], rope_first,
                                                    slots, positions, out.data_ptr(), torch.get_num_threads()))
        return out
__all__ = ["LayerFront", "LayerStack"]
