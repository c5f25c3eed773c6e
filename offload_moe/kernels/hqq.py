"""HQQ: half-quadratic optimisation of the zero point (Badri & Shaji, 2023).

Why: round-to-nearest with min-max scaling spends the code range on the extremes of each group,
so the bulk of the weights sees a badly placed grid. HQQ keeps the scale and moves the zero point
to minimise an lp (p < 1) norm of the reconstruction error, which is robust to the outliers of
real weight matrices. No calibration data; a few vectorised iterations over all groups at once.

This follows the `hqq` package's `optimize_weights_proximal_legacy` with our convention
w ~ (q - zero) * scale (hqq stores the inverse scale): alternate
    q    = clamp(round(w / s + z), 0, qmax)                       # codes for the current zero
    e    = shrink_p(w - (q - z) * s, beta)                        # proximal step on the lp error:
                                                                  # sign(x) relu(|x| - |x|^(p-1) / beta)
    z    = mean(q - (w - e) / s)                                  # closed-form zero update
    beta = beta * kappa
for a fixed number of iterations (no global early stop, so each group's result does not depend on
which other rows share the call, and chunked quantization is exact).

`refit_scale` optionally follows with a least-squares fit of (scale, zero) for the fixed codes,
kept per group only where it lowers the squared error: an addition of ours, not part of HQQ.
"""

from __future__ import annotations

import torch

FP16_MAX = 65504.0


def optimize_zero(
    wg: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmax: int,
    *,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> torch.Tensor:
    """Zero points minimising the lp reconstruction error for fixed scales.

    wg: float32 [M, group] weights, one group per row; scale, zero: float32 [M, 1] (RTN start).
    Returns float32 [M, 1].
    """
    # Same algebra as the docstring, in step units with preallocated buffers (3x faster on CPU):
    # mean(q - (w - e) / s) = mean(q) - mean(w / s) + mean(e) / s, since s is constant per group.
    ws = wg / scale  # [M, group] weights in steps
    ws_mean = ws.mean(dim=-1, keepdim=True)  # [M, 1]
    z = zero.clone()
    q, d, a = torch.empty_like(ws), torch.empty_like(ws), torch.empty_like(ws)
    for _ in range(iters):
        torch.add(ws, z, out=q).round_().clamp_(0, qmax)  # [M, group] codes
        torch.sub(ws, q, out=d).add_(z).mul_(scale)  # [M, group] residual w - (q - z) * s
        torch.abs(d, out=a)
        a.sub_(a.pow(lp_norm - 1).div_(beta)).relu_()  # |shrink_lp(d)|
        e_mean = torch.copysign(a, d, out=a).mean(dim=-1, keepdim=True)  # [M, 1]
        z = q.mean(dim=-1, keepdim=True) - ws_mean + e_mean / scale  # [M, 1]
        beta *= kappa
    return z.clamp_(-FP16_MAX, FP16_MAX)


def squared_error(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-group sum of squared reconstruction error: [M, group] -> [M, 1]."""
    q = torch.round(wg / scale + zero).clamp_(0, qmax)
    return ((q - zero) * scale - wg).pow_(2).sum(dim=-1, keepdim=True)


def refit_scale(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, rounds: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (scale, zero) for the current codes, kept where it lowers the error.

    For fixed codes q, w ~ a*q + b is a per-group linear regression: a = cov(q, w) / var(q),
    b = mean(w) - a*mean(q); then scale = a, zero = -b / a, both rounded to fp16 as stored.
    Re-rounding the codes and repeating is a Lloyd-style alternation. All [M, 1] float32.
    """
    err = squared_error(wg, scale, zero, qmax)  # [M, 1]
    wm = wg.mean(dim=-1, keepdim=True)  # [M, 1]
    for _ in range(rounds):
        q = torch.round(wg / scale + zero).clamp_(0, qmax)  # [M, group]
        qm = q.mean(dim=-1, keepdim=True)  # [M, 1]
        qc = q - qm
        var = qc.pow(2).mean(dim=-1, keepdim=True)
        cov = (qc * (wg - wm)).mean(dim=-1, keepdim=True)
        a = torch.where(var > 0, cov / var.clamp_min(1e-30), scale)
        a = torch.where(torch.isfinite(a) & (a > 0), a, scale)
        s_new = a.to(torch.float16).float().clamp_min(2.0**-24)  # [M, 1]
        z_new = ((qm * s_new - wm) / s_new).clamp(-FP16_MAX, FP16_MAX).to(torch.float16).float()
        err_new = squared_error(wg, s_new, z_new, qmax)
        better = err_new < err  # NaN compares False: keep the old pair
        scale = torch.where(better, s_new, scale)
        zero = torch.where(better, z_new, zero)
        err = torch.where(better, err_new, err)
    return scale, zero
