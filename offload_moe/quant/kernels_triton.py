"""Fused dequantize + matrix-vector product for packed groupwise weights (Triton, CUDA).

Why: at batch 1 a quantized expert is memory-bound; dequantizing to a full bf16 matrix first
writes and rereads 4x the bytes the packed form needs. This kernel reads the packed codes,
scales and zeros once and accumulates y[b, n] = sum_k x[b, k] * (q[n, k] - z[n, g]) * s[n, g]
in fp32, g = k // group_size. Simple on purpose: one program per (block of output rows, batch
row); every code is found with the bit-stream rule of pack.py, so one kernel serves 2/3/4/8 bits.

Importable without triton: `HAS_TRITON` says whether the kernel exists; `supports()` is the gate.
"""

from __future__ import annotations

import torch

try:  # triton is optional: CPU-only installs never import it
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install without a driver
    triton = None
    tl = None

HAS_TRITON = triton is not None
KERNEL_BITS = (2, 3, 4, 8)
MAX_BATCH = 16  # above this, dequantize once and use the dense matmul
BLOCK_N = 32
BLOCK_K = 128


def supports(x: torch.Tensor, bits: int) -> bool:
    """Whether the fused kernel can run this input: CUDA (or the Triton interpreter), a float dtype."""
    return HAS_TRITON and bits in KERNEL_BITS and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


if HAS_TRITON:

    @triton.jit
    def _dequant_matvec_kernel(
        x_ptr, packed_ptr, scales_ptr, zeros_ptr, y_ptr,
        N, K, P, G,  # out features, in features, packed bytes per row, groups per row
        stride_xb, stride_yb,
        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_mask = offs_n < N
        row_p = offs_n.to(tl.int64) * P  # [BN] first byte of each packed row
        row_g = offs_n.to(tl.int64) * G  # [BN] first scale/zero of each row
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
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
            acc += tl.sum((q - z) * s * x[None, :], axis=1)  # [BN]
        tl.store(y_ptr + b * stride_yb + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def dequant_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, group_size: int, out_features: int) -> torch.Tensor:
    """x [B, in] @ dequantized([out, in]).T -> [B, out] in x's dtype, via the fused kernel."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use groupwise.qlinear, which falls back to torch")
    x = x.contiguous()
    packed, scales, zeros = packed.contiguous(), scales.contiguous(), zeros.contiguous()
    batch, in_features = x.shape
    y = torch.empty(batch, out_features, dtype=x.dtype, device=x.device)
    if batch == 0 or out_features == 0:
        return y
    grid = (triton.cdiv(out_features, BLOCK_N), batch)
    _dequant_matvec_kernel[grid](
        x, packed, scales, zeros, y,
        out_features, in_features, packed.shape[1], scales.shape[1],
        x.stride(0), y.stride(0),
        BITS=bits, GROUP=group_size, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return y
