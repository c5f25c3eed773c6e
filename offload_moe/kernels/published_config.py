"""Which pre-quantized format a checkpoint's `quantization_config` names, and how its tensors read.

Three publishers' formats are read as they are stored (the forms in `published.py`):
- `"quant_method": "fp8"` with `weight_block_size` [bn, bk] (DeepSeek-V3/R1, Qwen3-FP8, GLM FP8):
  `X.weight` F8_E4M3 [O, I] + `X.weight_scale_inv` F32 [ceil(O/bn), ceil(I/bk)].
- `"quant_method": "compressed-tensors"`, format `pack-quantized` (llm-compressor's W4A16/W8A16): one
  int weights scheme in `config_groups` (num_bits 4 or 8, strategy group or channel, symmetric or
  not): `X.weight_packed` I32 [O, ceil(I·b/32)], `X.weight_scale` [O, G], `X.weight_zero_point`
  I32 [ceil(O/(32/b)), G] when asymmetric, `X.weight_shape` [2] (checked when present), `X.weight_g_idx`
  I32 [I] under actorder "group" (each input's group).
- `"quant_method": "gptq"` (bits 4 or 8; AutoGPTQ, GPTQModel, optimum): `X.qweight` I32 [I/(32/b), O],
  `X.qzeros` I32 [G, O/(32/b)], `X.scales` F16 [G, O], `X.g_idx` I32 [I] (needed with desc_act; else
  k / group when absent). `checkpoint_format` "gptq_v2" stores the zeros as they are; every other
  (v1, the default) stores them minus one.

Which matrices are quantized is read from the file: a matrix stored in the format's tensors is
read in it, any other (the router, lm_head, the layers in `modules_to_not_convert` / `ignore`) as
the floats it is stored in. Routers and norms stored quantized are refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base.errors import OffloadMoeError
from .published import FP8BlockWeight, GPTQWeight, IntPackWeight

METHODS = ("fp8", "compressed-tensors", "gptq")
SCALE_TYPES = ("F32", "BF16", "F16")


def is_published(quantization_config) -> bool:
    """Whether a config.json's quantization_config names one of the publishers' formats read here."""
    return isinstance(quantization_config, dict) and quantization_config.get("quant_method") in METHODS


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def G_of(in_features: int, group: int) -> int:
    """Groups of a row: one per `group` inputs (-1: the whole row)."""
    return 1 if group == -1 else _ceil(in_features, group)


def _checked(get, names: dict, name: str, groups: int) -> torch.Tensor:
    """A g_idx tensor whose every entry names one of the `groups` groups (the kernels index scales by it)."""
    g_idx = get(name)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise OffloadMoeError(f"{names[name].file}: tensor '{name}' holds groups {int(g_idx.min())} .. "
                              f"{int(g_idx.max())}, expected 0 .. {groups - 1}")
    return g_idx


@functools.cache
def _default_g_idx(in_features: int, group: int) -> torch.Tensor:
    """k / group for every input k: one shared tensor per (I, group), not one per matrix."""
    return (torch.arange(in_features, dtype=torch.int32) // group).contiguous()


@dataclass(frozen=True)
class PublishedSpec:
    method: str                    # "fp8", "compressed-tensors" or "gptq"
    bits: int                      # 8 for fp8; 4 or 8 for the int formats
    group: int                     # inputs per scale (fp8: bk; -1: one group per row)
    block_rows: int = 1            # fp8: bn
    symmetric: bool = True         # compressed-tensors: no zero points stored
    zero_offset: int = 1           # gptq: 1 for v1 checkpoints (zeros stored minus one), 0 for v2
    desc_act: bool = False         # gptq: inputs in activation order (g_idx required)

    @property
    def stored(self) -> str:
        """The format's name as `info` and `plan` show it."""
        names = {"fp8": "fp8-block", "compressed-tensors": f"int{self.bits}-pack", "gptq": f"gptq-int{self.bits}"}
        return names[self.method]

    @property
    def marker(self) -> str:
        """The suffix whose presence says a matrix `X.weight` is stored in the format (X.<marker>)."""
        return {"fp8": "weight_scale_inv", "compressed-tensors": "weight_packed", "gptq": "qweight"}[self.method]

    # ---- parsing ----
    @classmethod
    def from_config(cls, raw: dict, source: str) -> PublishedSpec:
        method = raw["quant_method"]
        where = f"{source}: quantization_config"
        if method == "fp8":
            block = raw.get("weight_block_size")
            if (not isinstance(block, list) or len(block) != 2 or
                    not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
                raise OffloadMoeError(f"{where}.weight_block_size {block!r}, expected [rows, columns] "
                                      "(block-scaled FP8, e.g. [128, 128])")
            if raw.get("fmt", "e4m3") != "e4m3":
                raise OffloadMoeError(f"{where}.fmt {raw.get('fmt')!r}, expected 'e4m3'")
            return cls("fp8", 8, block[1], block[0])
        if method == "gptq":
            bits, group = raw.get("bits"), raw.get("group_size", 128)
            if bits not in (4, 8):
                raise OffloadMoeError(f"{where}.bits {bits!r}, expected 4 or 8")
            if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
                raise OffloadMoeError(f"{where}.group_size {group!r}, expected a positive integer or -1")
            fmt = raw.get("checkpoint_format", "gptq")
            if fmt not in ("gptq", "gptq_v2"):
                raise OffloadMoeError(f"{where}.checkpoint_format {fmt!r}, expected 'gptq' or 'gptq_v2'")
            return cls("gptq", bits, group, zero_offset=0 if fmt == "gptq_v2" else 1,
                       desc_act=bool(raw.get("desc_act")))
        return cls._compressed(raw, where)

    @classmethod
    def _compressed(cls, raw: dict, where: str) -> PublishedSpec:
        groups = raw.get("config_groups")
        if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
            raise OffloadMoeError(f"{where}.config_groups {groups!r}, expected an object of quantization schemes")
        schemes = set()
        for name, g in groups.items():
            fmt = g.get("format") or raw.get("format")
            if fmt != "pack-quantized":
                raise OffloadMoeError(f"{where}.config_groups.{name}: format {fmt!r}, expected 'pack-quantized' "
                                      "(int4/int8 weights packed in int32; other compressed-tensors formats "
                                      "are not read)")
            w = g.get("weights")
            if not isinstance(w, dict) or w.get("type", "int") != "int" or w.get("num_bits") not in (4, 8):
                raise OffloadMoeError(f"{where}.config_groups.{name}.weights {w!r}, expected int weights of "
                                      "num_bits 4 or 8")
            strategy = w.get("strategy")
            if strategy == "group":
                group = w.get("group_size")
                if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
                    raise OffloadMoeError(f"{where}.config_groups.{name}.weights.group_size {group!r}, "
                                          "expected a positive integer")
            elif strategy == "channel":
                group = -1
            else:
                raise OffloadMoeError(f"{where}.config_groups.{name}.weights.strategy {strategy!r}, "
                                      "expected 'group' or 'channel'")
            schemes.add((w["num_bits"], group, bool(w.get("symmetric", True))))
        if len(schemes) > 1:
            raise OffloadMoeError(f"{where}.config_groups: {len(schemes)} different weight schemes "
                                  f"{sorted(schemes)}; one (bits, group size, symmetric) for every matrix is read")
        bits, group, symmetric = schemes.pop()
        return cls("compressed-tensors", bits, group, symmetric=symmetric)

    # ---- one matrix ----
    def quantized(self, tensors: dict, name: str) -> bool:
        """Whether matrix `name` ("X.weight") is stored in the format (its X.<marker> is in the file)."""
        return name.endswith(".weight") and f"{name.removesuffix('.weight')}.{self.marker}" in tensors

    def expected(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
        """suffix -> (allowed dtypes, shape) of the tensors a quantized [O, I] matrix is stored as."""
        O, I = shape
        per = 32 // self.bits
        G = G_of(I, self.group)
        if self.method == "fp8":
            return {"weight": (("F8_E4M3",), (O, I)),
                    "weight_scale_inv": (SCALE_TYPES, (_ceil(O, self.block_rows), _ceil(I, self.group)))}
        if self.method == "compressed-tensors":
            parts = {"weight_packed": (("I32",), (O, _ceil(I * self.bits, 32))), "weight_scale": (SCALE_TYPES, (O, G))}
            if not self.symmetric:
                parts["weight_zero_point"] = (("I32",), (_ceil(O, per), G))
            return parts
        return {"qweight": (("I32",), (I // per, O)), "qzeros": (("I32",), (G, O // per)),
                "scales": (SCALE_TYPES, (G, O))}

    def validate(self, tensors: dict, name: str, shape: tuple[int, ...], path: Path) -> None:
        """One line naming the file and tensor when a quantized matrix's tensors are not as the format stores them."""
        prefix = name.removesuffix(".weight")
        what = f"a {self.stored} {list(shape)} weight"
        if len(shape) != 2:
            raise OffloadMoeError(f"{path}: tensor {prefix}.{self.marker!r} quantizes {name!r}, which is not a "
                                  f"matrix (a router, norm or bias is expected as floats)")
        O, I = shape
        per = 32 // self.bits
        if self.method == "gptq" and (I % per or O % per):
            raise OffloadMoeError(f"{path}: {name!r} is [{O}, {I}]; GPTQ packs {per} values per int32 along both, "
                                  f"expected multiples of {per}")
        parts = self.expected(shape)
        if self.method == "gptq" and (self.desc_act or f"{prefix}.g_idx" in tensors):
            parts["g_idx"] = (("I32",), (I,))
        if self.method == "compressed-tensors" and f"{prefix}.weight_shape" in tensors:
            parts["weight_shape"] = (("I64", "I32"), (2,))
        if self.method == "compressed-tensors" and f"{prefix}.weight_g_idx" in tensors:
            parts["weight_g_idx"] = (("I32",), (I,))
        for suffix, (dtypes, want) in parts.items():
            info = tensors.get(f"{prefix}.{suffix}")
            if info is None:
                raise OffloadMoeError(f"{path}: tensor '{prefix}.{suffix}' is missing (expected {dtypes[0]} "
                                      f"{list(want)} for {what})")
            if info.dtype not in dtypes or info.shape != want:
                raise OffloadMoeError(f"{info.file}: tensor '{prefix}.{suffix}' is {info.dtype} {list(info.shape)}, "
                                      f"expected {' or '.join(dtypes)} {list(want)} for {what}")

    def read(self, get, names, name: str, shape: tuple[int, int]):
        """The weight form of matrix `name`, from `get(tensor name) -> tensor` (the stored tensors, as
        read); `names`: the checkpoint's tensor names (optional tensors are looked up there)."""
        prefix = name.removesuffix(".weight")
        O, I = shape
        if self.method == "fp8":
            scale = get(f"{prefix}.weight_scale_inv")
            return FP8BlockWeight(get(name).view(torch.uint8), scale if scale.dtype == torch.float32 else scale.float(),
                                  (self.block_rows, self.group))
        group = I if self.group == -1 else self.group
        if self.method == "compressed-tensors":
            if f"{prefix}.weight_shape" in names:
                stored = [int(v) for v in get(f"{prefix}.weight_shape").tolist()]
                if stored != [O, I]:
                    raise OffloadMoeError(f"{names[f'{prefix}.weight_shape'].file}: tensor '{prefix}.weight_shape' "
                                          f"is {stored}, expected {[O, I]} from config.json")
            zero = get(f"{prefix}.weight_zero_point") if not self.symmetric else None
            g_name = f"{prefix}.weight_g_idx"
            g_idx = _checked(get, names, g_name, G_of(I, self.group)) if g_name in names else None
            return IntPackWeight(get(f"{prefix}.weight_packed"), get(f"{prefix}.weight_scale"), zero, group,
                                 self.bits, I, g_idx)
        g_idx = _checked(get, names, f"{prefix}.g_idx", G_of(I, self.group)) if f"{prefix}.g_idx" in names \
            else _default_g_idx(I, group)
        order = GPTQWeight.sorted_order(g_idx) if self.desc_act else None   # walked in group order
        return GPTQWeight(get(f"{prefix}.qweight"), get(f"{prefix}.qzeros"), get(f"{prefix}.scales"), g_idx,
                          self.bits, self.zero_offset, order)


def stored_bytes(stored: str, out: int, in_: int, group: int) -> int | None:
    """Bytes of one [out, in] matrix in a published format (`PublishedSpec.stored`), for the planner; None
    for another name. fp8-block: `group` x `group` blocks (128 x 128 as published); the int formats:
    16-bit scales per `group` inputs (-1: per row); pack-quantized symmetric (no zero points, no
    g_idx) with its `weight_shape`; GPTQ with its g_idx."""
    G = 1 if group <= 0 else _ceil(in_, group)
    if stored == "fp8-block":
        return out * in_ + 4 * _ceil(out, group) * G
    for bits in (4, 8):
        if stored == f"int{bits}-pack":
            return 4 * out * _ceil(in_ * bits, 32) + 2 * out * G + 16   # + weight_shape, int64 [2]
        if stored == f"gptq-int{bits}":
            per = 32 // bits
            return 4 * _ceil(in_, per) * out + 4 * G * _ceil(out, per) + 2 * G * out + 4 * in_
    return None


def planner_settings(raw: dict, source: str) -> tuple[str, int]:
    """(the stored format's name, its group) of the matrices a published config quantizes."""
    spec = PublishedSpec.from_config(raw, source)
    return spec.stored, spec.group


__all__ = ["METHODS", "PublishedSpec", "is_published", "planner_settings", "stored_bytes"]
