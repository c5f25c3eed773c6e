"""Fused dequantize + matrix product for packed groupwise weights (Triton, CUDA).

Why: at batch 1 a quantized expert is memory-bound; the only way to run at the memory bound is to
read each packed byte once, with wide loads, and keep everything else in registers. Letters:
B batch rows, N output rows, K inputs, G group size, CU codes per 32-bit unit, U units per tile.

The bandwidth kernel (`_qgemv_kernel`, B <= GEMV_MAX_BATCH; `_qgemm_kernel` with tl.dot above):
- codes are read as int32 words: a *unit* is the smallest whole number of words holding whole
  codes (1 word = 16 2-bit, 8 4-bit or 4 8-bit codes; 3 words = 32 3-bit codes), so code j of
  unit u is a compile-time shift of one word (two for the 3-bit codes that straddle words);
- instead of reordering codes into k order, the matching x values are loaded in the same
  order, so  y[b, n] = sum_u sum_j q[n, u, j] x[b, u, j]  needs no shuffle;
- scales and zeros are loaded once per [BN, BK/G] tile and applied per group through
  y = sum_g s_g (sum_{k in g} q_k x_k - z_g sum_{k in g} x_k), i.e. two multiplies per group;
- the accumulator is [BB, BN, BK/G] and is reduced over groups once, after the K loop;
- all batch rows of a program share each weight read (GEMV: broadcast; GEMM: tl.dot);
- BLOCK_N as small as 8 gives the 4096-row down projection 512 programs; autotuned per shape.
It needs G a power of two with G >= CU and 4-byte-aligned rows; anything else (e.g. G = 40, or
3-bit codes with G = 8) runs `_generic_kernel`, which finds each code with pack.py's byte rule.

Tolerance against float64 math (tests/test_triton_kernels.py), per output element:
|y - y64| <= c * sum_k |x_k| |w_nk| with c = 1e-5 for fp32 inputs, 2^-9 for fp16, 2^-7 for bf16
(fp32 accumulation, plus the final rounding to x's dtype; the tl.dot path also rounds the
dequantized weights to x's dtype). Launches run on the tensors' device (`torch.cuda.device`).

Importable without triton: `HAS_TRITON` says whether the kernels exist; `supports()` is the gate.
Under TRITON_INTERPRET=1 the kernels run on CPU tensors with a fixed config (no autotuning);
OFFLOAD_MOE_TRITON_AUTOTUNE=0 skips autotuning on a GPU too (each autotuned kernel compiles every
config once per process, which tests of many tiny shapes would pay over and over).
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch

try:  # triton is optional: CPU-only installs never import it
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install without a driver
    triton = None
    tl = None

HAS_TRITON = triton is not None
KERNEL_BITS = (2, 3, 4, 8)
MAX_BATCH = 16        # above this, qlinear dequantizes in row chunks and uses the dense matmul
GEMV_MAX_BATCH = 4    # up to this many rows: the broadcast GEMV; above: the tl.dot kernel
CODES_PER_UNIT = {2: 16, 3: 32, 4: 8, 8: 4}
WORDS_PER_UNIT = {2: 1, 3: 3, 4: 1, 8: 1}
MAX_GROUP = 1024      # the largest tile the configs below cover


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# read once: the decode loop calls dequant_matmul hundreds of times per token
_FIXED_CONFIG = interpreting() or os.environ.get("OFFLOAD_MOE_TRITON_AUTOTUNE") == "0"


def supports(x: torch.Tensor, bits: int) -> bool:
    """Whether a fused kernel can run this input: triton present, a kernel width, a float dtype."""
    return HAS_TRITON and bits in KERNEL_BITS and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def fast_path(packed: torch.Tensor, bits: int, group_size: int) -> bool:
    """Whether the word-load kernels apply (else the generic byte kernel runs)."""
    g = group_size
    return (g & (g - 1) == 0 and CODES_PER_UNIT[bits] <= g <= MAX_GROUP
            and packed.shape[1] % 4 == 0 and packed.data_ptr() % 4 == 0)


# Configurations tried by autotuning (per shape, bit width, group and batch block); the interpreter
# and `config=` in tests use them directly. BLOCK_K is a multiple of the group size (see _configs).
GEMV_CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
                for bn, bk, w, s in [(8, 256, 2, 3), (8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 4, 4),
                                     (32, 256, 4, 3)]]
GEMM_CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
                for bn, bk, w, s in [(32, 512, 4, 3), (64, 512, 4, 3), (64, 256, 4, 4)]]
DEFAULT_GEMV = dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=3)
DEFAULT_GEMM = dict(BLOCK_N=32, BLOCK_K=512, num_warps=4, num_stages=3)


def _configs(table: list[dict], bits: int, group: int, dot: bool) -> list[dict]:
    """The table's configs adapted to a group size: BLOCK_K raised to a multiple of the group and,
    for tl.dot, to at least 16 units; duplicates dropped."""
    cu, out = CODES_PER_UNIT[bits], []
    for c in table:
        bk = max(c["BLOCK_K"], group, 16 * cu if dot else 0)
        c = {**c, "BLOCK_K": bk}
        if c not in out:
            out.append(c)
    return out


if HAS_TRITON:

    @triton.jit
    def _code(w0, w1, w2, j: tl.constexpr, BITS: tl.constexpr):
        """Code j of each unit ([BN, U] uint32 words w0..w2; w1, w2 used only for 3 bits) as float32."""
        MASK: tl.constexpr = (1 << BITS) - 1
        if BITS == 3:
            BIT: tl.constexpr = 3 * j
            SH: tl.constexpr = BIT % 32
            if BIT // 32 == 0:
                lo = w0
                nxt = w1
            elif BIT // 32 == 1:
                lo = w1
                nxt = w2
            else:
                lo = w2
                nxt = w2
            if SH <= 29:
                q = (lo >> SH) & MASK
            else:  # the code straddles two words
                q = ((lo >> SH) | (nxt << (32 - SH))) & MASK
        else:
            q = (w0 >> (j * BITS)) & MASK
        return q.to(tl.float32)

    @triton.jit
    def _load_words(w_ptr, offs_n, n_mask, unit0, offs_u, u_mask, WPR, WU: tl.constexpr):
        """The tile's words: [BN, U] uint32 each (w1, w2 only for 3 bits; else w0 repeated)."""
        base = w_ptr + offs_n.to(tl.int64)[:, None] * WPR + (unit0 + offs_u)[None, :] * WU
        m = n_mask[:, None] & u_mask[None, :]
        w0 = tl.load(base, mask=m, other=0).to(tl.uint32, bitcast=True)
        if WU == 3:
            w1 = tl.load(base + 1, mask=m, other=0).to(tl.uint32, bitcast=True)
            w2 = tl.load(base + 2, mask=m, other=0).to(tl.uint32, bitcast=True)
        else:
            w1 = w0
            w2 = w0
        return w0, w1, w2

    @triton.jit
    def _qgemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        B, N, K, WPR, GPR,  # batch, out features, in features, int32 words per row, groups per row
        stride_xb, stride_yb,
        BITS: tl.constexpr, GROUP: tl.constexpr, CU: tl.constexpr, WU: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        GT: tl.constexpr = BLOCK_K // GROUP  # groups per tile
        U: tl.constexpr = BLOCK_K // CU      # units per tile
        UPG: tl.constexpr = GROUP // CU      # units per group
        pid_n = tl.program_id(0)
        offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
        b_mask = offs_b < B
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_mask = offs_n < N
        offs_u = tl.arange(0, U)  # [U]
        offs_g = tl.arange(0, GT)  # [GT]
        x_rows = x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb  # [BB, 1]
        acc = tl.zeros((BLOCK_B, BLOCK_N, GT), dtype=tl.float32)
        for u0 in range(0, K // CU, U):  # the tile's first unit; a multiple of U, so loads can be wide
            k0 = u0 * CU
            if EVEN_K:  # K a multiple of BLOCK_K: no mask along K (masked loads do not vectorize)
                u_mask = offs_u < U
            else:
                u_mask = (k0 + offs_u * CU) < K  # [U]
            w0, w1, w2 = _load_words(w_ptr, offs_n, n_mask, u0, offs_u, u_mask, WPR, WU)
            xm = b_mask[:, None] & u_mask[None, :]  # [BB, U]
            d = tl.zeros((BLOCK_B, BLOCK_N, U), dtype=tl.float32)  # per-unit sums of q * x
            xs = tl.zeros((BLOCK_B, U), dtype=tl.float32)  # per-unit sums of x
            for j in tl.static_range(CU):
                xj = tl.load(x_rows + (k0 + offs_u * CU + j)[None, :], mask=xm, other=0.0).to(tl.float32)
                qj = _code(w0, w1, w2, j, BITS)  # [BN, U]
                d += xj[:, None, :] * qj[None, :, :]
                xs += xj
            dg = tl.sum(tl.reshape(d, (BLOCK_B, BLOCK_N, GT, UPG)), axis=3)  # [BB, BN, GT]
            xg = tl.sum(tl.reshape(xs, (BLOCK_B, GT, UPG)), axis=2)  # [BB, GT]
            g_mask = n_mask[:, None] & ((k0 // GROUP + offs_g) < GPR)[None, :]  # [BN, GT]
            g_off = offs_n.to(tl.int64)[:, None] * GPR + (k0 // GROUP + offs_g)[None, :]
            s = tl.load(s_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)  # [BN, GT]
            z = tl.load(z_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
            acc += s[None, :, :] * (dg - z[None, :, :] * xg[:, None, :])
        y = tl.sum(acc, axis=2)  # [BB, BN]
        y_off = offs_b.to(tl.int64)[:, None] * stride_yb + offs_n[None, :]
        tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=b_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _qgemm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        B, N, K, WPR, GPR, stride_xb, stride_yb,
        BITS: tl.constexpr, GROUP: tl.constexpr, CU: tl.constexpr, WU: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
        FP32: tl.constexpr,
    ):
        """The same tile walk for 5..16 rows: dequantize code j of every unit ([BN, U], scales
        broadcast per unit) and multiply it with x's matching [BB, U] columns on the tensor cores."""
        GT: tl.constexpr = BLOCK_K // GROUP
        U: tl.constexpr = BLOCK_K // CU
        UPG: tl.constexpr = GROUP // CU
        pid_n = tl.program_id(0)
        offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        b_mask = offs_b < B
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_u = tl.arange(0, U)
        offs_g = tl.arange(0, GT)
        x_rows = x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for u0 in range(0, K // CU, U):  # the tile's first unit; a multiple of U, so loads can be wide
            k0 = u0 * CU
            if EVEN_K:  # K a multiple of BLOCK_K: no mask along K (masked loads do not vectorize)
                u_mask = offs_u < U
            else:
                u_mask = (k0 + offs_u * CU) < K  # [U]
            w0, w1, w2 = _load_words(w_ptr, offs_n, n_mask, u0, offs_u, u_mask, WPR, WU)
            g_mask = n_mask[:, None] & ((k0 // GROUP + offs_g) < GPR)[None, :]
            g_off = offs_n.to(tl.int64)[:, None] * GPR + (k0 // GROUP + offs_g)[None, :]
            s = tl.load(s_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)  # [BN, GT]
            z = tl.load(z_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
            su = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, GT, UPG)), (BLOCK_N, U))  # [BN, U]
            zu = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, GT, UPG)), (BLOCK_N, U))
            xm = b_mask[:, None] & u_mask[None, :]
            for j in tl.static_range(CU):
                xj = tl.load(x_rows + (k0 + offs_u * CU + j)[None, :], mask=xm, other=0.0)  # [BB, U]
                wj = (_code(w0, w1, w2, j, BITS) - zu) * su  # [BN, U]
                if FP32:
                    acc += tl.dot(xj.to(tl.float32), tl.trans(wj), input_precision="ieee")
                else:
                    acc += tl.dot(xj, tl.trans(wj.to(xj.dtype)))
        y_off = offs_b.to(tl.int64)[:, None] * stride_yb + offs_n[None, :]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=b_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _generic_kernel(
        x_ptr, packed_ptr, scales_ptr, zeros_ptr, y_ptr,
        N, K, P, G,  # out features, in features, packed bytes per row, groups per row
        stride_xb, stride_yb,
        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Any group size and row length: one program per (block of rows, batch row), byte loads."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_mask = offs_n < N
        row_p = offs_n.to(tl.int64) * P  # [BN] first byte of each packed row
        row_g = offs_n.to(tl.int64) * G  # [BN] first scale/zero of each row
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
            k_mask = offs_k < K
            x = tl.load(x_ptr + b * stride_xb + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # [BK]
            bitpos = offs_k * BITS
            byte = bitpos // 8  # [BK] byte holding the code's lowest bit
            shift = bitpos % 8  # [BK]
            mask = n_mask[:, None] & k_mask[None, :]  # [BN, BK]
            word = tl.load(packed_ptr + row_p[:, None] + byte[None, :], mask=mask, other=0).to(tl.int32)
            if BITS == 3:  # a 3-bit code may straddle two bytes
                hi_mask = mask & ((byte + 1) < P)[None, :]
                hi = tl.load(packed_ptr + row_p[:, None] + byte[None, :] + 1, mask=hi_mask, other=0).to(tl.int32)
                word = word | (hi << 8)
            q = ((word >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.float32)  # [BN, BK]
            g_off = row_g[:, None] + (offs_k // GROUP)[None, :]  # [BN, BK]
            s = tl.load(scales_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
            acc += (q - z) * s * x[None, :]
        y = tl.sum(acc, axis=1)  # [BN]
        tl.store(y_ptr + b * stride_yb + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    def _even_k(args) -> bool:
        return args["K"] % args["BLOCK_K"] == 0

    _KERNELS = {False: triton.heuristics({"EVEN_K": _even_k})(_qgemv_kernel),
                True: triton.heuristics({"EVEN_K": _even_k})(_qgemm_kernel)}
    _TUNED: dict = {}

    def _short_bench(fn, quantiles=None):
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    def _tuned(dot: bool, bits: int, group: int):
        """The autotuned launcher for one (kernel, bits, group): its configs depend on the group."""
        key = (dot, bits, group)
        if key not in _TUNED:
            table = _configs(GEMM_CONFIGS if dot else GEMV_CONFIGS, bits, group, dot)
            configs = [triton.Config({"BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"]},
                                     num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in table]
            extra = {}
            if "do_bench" in inspect.signature(triton.autotune).parameters:  # a short benchmark per config
                extra["do_bench"] = _short_bench
            # keyed by the batch *block*, not the batch: 1..16 rows share four tunings per shape
            _TUNED[key] = triton.autotune(configs=configs, key=["N", "K", "BLOCK_B"], **extra)(_KERNELS[dot])
        return _TUNED[key]


def tuned_config(bits: int, group_size: int, batch: int) -> str | None:
    """The config autotuning last chose for this width, group and batch kind (None before any run)."""
    tuned = _TUNED.get((batch > GEMV_MAX_BATCH, bits, group_size)) if HAS_TRITON else None
    best = getattr(tuned, "best_config", None)
    return None if best is None else str(best)


def _device(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _block_b(batch: int, dot: bool) -> int:
    return 16 if dot else triton.next_power_of_2(batch)


def dequant_matmul(x: torch.Tensor, qw, *, config: dict | None = None, kernel: str | None = None) -> torch.Tensor:
    """x [B, in] @ dequantized(qw [out, in]).T -> [B, out] in x's dtype, via a fused kernel; `qw` a
    `groupwise.QuantizedWeight` (its packed codes, fp16 scales and zeros, bits, group size, shape).

    kernel: None picks ("gemv" up to GEMV_MAX_BATCH rows, "gemm" above, "generic" where the word
    kernels do not apply); config: one entry of GEMV_CONFIGS / GEMM_CONFIGS instead of autotuning
    (tests use it to check every config; the interpreter uses the DEFAULT_* config)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use groupwise.qlinear, which falls back to torch")
    x = x.contiguous()
    packed, scales, zeros = qw.packed.contiguous(), qw.scales.contiguous(), qw.zeros.contiguous()
    bits, group_size, out_features = qw.bits, qw.group_size, qw.shape[0]
    batch, in_features = x.shape
    y = torch.empty(batch, out_features, dtype=x.dtype, device=x.device)
    if batch == 0 or out_features == 0:
        return y
    if kernel is None:
        kernel = ("generic" if not fast_path(packed, bits, group_size)
                  else "gemv" if batch <= GEMV_MAX_BATCH else "gemm")
    with _device(x):
        if kernel == "generic":
            grid = (triton.cdiv(out_features, 32), batch)
            _generic_kernel[grid](x, packed, scales, zeros, y, out_features, in_features, packed.shape[1],
                                  scales.shape[1], x.stride(0), y.stride(0),
                                  BITS=bits, GROUP=group_size, BLOCK_N=32, BLOCK_K=128)
            return y
        dot = kernel == "gemm"
        words = packed.view(torch.int32)  # [N, P/4]
        bb = _block_b(batch, dot)
        args = (x, words, scales, zeros, y, batch, out_features, in_features, words.shape[1], scales.shape[1],
                x.stride(0), y.stride(0))
        meta = dict(BITS=bits, GROUP=group_size, CU=CODES_PER_UNIT[bits], WU=WORDS_PER_UNIT[bits], BLOCK_B=bb)
        if dot:
            # the interpreter's tl.dot mishandles bf16 (Triton 3.9: products of the raw bits), so there
            # bf16 rows are multiplied in fp32; fp16 exercises the cast-to-x-dtype dot the GPU runs
            meta["FP32"] = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
        if config is None and _FIXED_CONFIG:
            config = DEFAULT_GEMM if dot else DEFAULT_GEMV  # no autotuning: one compile per kernel
        if config is not None:
            c = _configs([config], bits, group_size, dot)[0]
            grid = (triton.cdiv(out_features, c["BLOCK_N"]), triton.cdiv(batch, bb))
            _KERNELS[dot][grid](*args, **meta, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                     num_warps=c["num_warps"], num_stages=c["num_stages"])
        else:
            def grid(m):
                return (triton.cdiv(out_features, m["BLOCK_N"]), triton.cdiv(batch, bb))
            _tuned(dot, bits, group_size)[grid](*args, **meta)
    return y
