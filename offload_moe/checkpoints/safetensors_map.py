"""Tensors of safetensors files as views of the files' mappings, for weights computed where they lie.

Why: a pre-quantized checkpoint's matrices are computed from their stored tensors (quant/published.py),
so on the CPU nothing needs copying: each tensor is a view of a copy-on-write mapping of its shard
(pages are read when first used and shared with the page cache; the file is never written), as
GGUF files are (gguf/reader.py). A tensor whose offset is not a multiple of its element size (a
writer that packs an odd-length 16-bit tensor before a 32-bit one) cannot be viewed by torch: None,
and the caller reads a copy.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch

from ..base.user_files import advise_huge
from .safetensors_header import TensorInfo

TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
                "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
                "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
                "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64}


class FileMaps:
    """One copy-on-write mapping per shard, opened on first use and kept for the checkpoint's life."""

    def __init__(self):
        self._maps: dict[Path, mmap.mmap] = {}

    def base(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as f:
                self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                advise_huge(self._maps[file])
        return self._maps[file]

    def view(self, info: TensorInfo) -> torch.Tensor | None:
        """Tensor `info` as a view of its file's mapping (no byte read), or None where torch cannot view it."""
        dtype = TORCH_DTYPES[info.dtype]
        if info.offset % dtype.itemsize or info.nbytes == 0:
            return None
        data = np.frombuffer(self.base(info.file), dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return torch.from_numpy(data).view(dtype).view(info.shape)
