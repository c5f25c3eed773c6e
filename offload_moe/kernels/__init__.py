"""Weight quantization for offloaded experts: bit packing, groupwise RTN/HQQ, fused kernels.

    from offload_moe.kernels import quantize, qlinear
    qw = quantize(w, bits=4, group_size=64, method="hqq")   # w: float [out, in]
    y = qlinear(x, qw)                                       # == F.linear(x, qw.dequantize(x.dtype))
"""

from .groupwise import METHODS, QuantizedWeight, nbytes_for, qlinear, quantize
from .pack import SUPPORTED_BITS, pack, packed_cols, unpack

__all__ = ["QuantizedWeight", "quantize", "qlinear", "nbytes_for", "pack", "unpack", "packed_cols",
           "SUPPORTED_BITS", "METHODS"]
