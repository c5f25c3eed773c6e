"""A GGUF file (or split set) behind the same interface as `checkpoint.Checkpoint`.

`config`, `expected_shapes()`, `get_weight(name, shape)`, `expert(layer, e)` and the facts `info`
shows, with our checkpoint names (`model.layers.{i}.self_attn.q_proj.weight`, ...). A name maps to
llama.cpp's (`blk.{i}.attn_q.weight`) through the gguf package's own `TensorNameMap`, the table its
converter writes with. What the converter changes on the way, we undo:
- llama (Mixtral): q and k rows are permuted so RoPE's rotate-half pairs become (even, odd) neighbours;
  inverted for the repacked form; the in-place form keeps the file's order and rotates neighbours
  (`rope_pairs`).
- experts are stacked per layer, `blk.{i}.ffn_{gate,up,down}_exps.weight` [E, out, in]: expert e is
  row block e of the map, read alone.
- deepseek2: `kv_b_proj` is split into `attn_k_b` (transposed) and `attn_v_b`; rejoined (as floats).
- qwen3next / qwen35moe (Gated DeltaNet layers, `_linear_attn`, as floats): the inputs come split
  (`attn_qkv`, `attn_gate` = z, `ssm_beta`, `ssm_alpha`; qwen3next's b and a still joined per key head
  in `ssm_ba`), `ssm_a` = -exp(A_log), `ssm_dt.bias` = dt_bias; qwen35moe reorders the value heads from
  grouped by key head to tiled (ggml's broadcast) wherever they appear, which is undone.
Two forms of the same bytes:
- in place (`in_place`, `expert_in_place`, `get_weight(..., in_place=True)`): what a CPU run computes
  from. A quantized matrix is a `GGMLWeight` viewing the file's one mapping (expert e of a stacked
  `_exps` tensor is its e-th contiguous byte range), a float one a tensor viewing it; nothing is
  repacked, copied or expanded, and nothing is done per expert at load but making the view; Mixtral's
  q/k rows stay in llama.cpp's order too (the model then rotates (2i, 2i + 1) pairs, as llama.cpp does).
- repacked (`expert`, `get_weight`): our packed weights, for the CUDA slot formats, `quantize` and
  `requantize`. Quantized blocks become packed weights without requantizing (blocks.py). One packed
  format must serve every layer's experts (one flat slot layout), so where a file mixes types across layers
(Q4_K_M puts Q6_K in some layers' ffn_down), each matrix takes the widest bits and the smallest
group any layer uses: codes and scales carry over exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, MODEL_ARCH, GGMLQuantizationType as T, get_tensor_name_map

from .. import families as arch
from ..checkpoint import weights_by_kind
from ...base.errors import OffloadMoeError
from ...kernels.format import INT_SETTINGS, QuantSpec
from ...kernels.ggml import BLOCK_TYPES, FLOAT_TYPES, GGMLWeight
from ...kernels.groupwise import QuantizedWeight
from ...kernels.pack import pack
from . import blocks
from .config import config_from_gguf, model_type
from .reader import GGUFFile, GGUFTensor

EXPERT_MATRICES = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
EXPERT_BIASES = {"b1": "ffn_gate_exps", "b3": "ffn_up_exps", "b2": "ffn_down_exps"}
GGUF_ARCH = {"mixtral": "LLAMA", "qwen3_moe": "QWEN3MOE", "qwen2_moe": "QWEN2MOE", "olmoe": "OLMOE",
             "deepseek_v2": "DEEPSEEK2", "gpt_oss": "GPT_OSS", "deepseek_v3": "DEEPSEEK2", "glm4_moe": "GLM4_MOE",
             "minimax_m2": "MINIMAXM2", "qwen3_next": "QWEN3NEXT", "qwen3_5_moe_text": "QWEN35MOE",
             "llama4_text": "LLAMA4"}
# Gated DeltaNet tensors (ours after `linear_attn.`) -> llama.cpp's, after `blk.{i}.`
LINEAR_ATTN = {"in_proj_qkv.weight": "attn_qkv.weight", "in_proj_z.weight": "attn_gate.weight",
               "in_proj_b.weight": "ssm_beta.weight", "in_proj_a.weight": "ssm_alpha.weight",
               "conv1d.weight": "ssm_conv1d.weight", "dt_bias": "ssm_dt.bias", "A_log": "ssm_a",
               "norm.weight": "ssm_norm.weight", "out_proj.weight": "ssm_out.weight"}


class GGUFCheckpoint:
    """`Checkpoint`'s interface over a GGUF file; `requantize` ("int2".."int8") admits types with no
    exact packed form by dequantizing and requantizing them (RTN, group 32)."""

    layout = "per_expert"

    def __init__(self, path: str | Path, requantize: str | None = None):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        model_type(self.file)  # a known architecture before anything else
        self.requantize = None if requantize is None else INT_SETTINGS.get(requantize)
        if requantize is not None and self.requantize is None:
            raise OffloadMoeError(f"requantize = {requantize!r}, expected one of {', '.join(INT_SETTINGS)}")
        self.tensors = self.file.tensors
        self._check_types()
        self.config = config_from_gguf(self.file, header_quantization(self.file))
        q = self.config.quantization  # what tune and quantize ask a checkpoint: its widths, or None
        self.quant = None if q is None else QuantSpec({k: q[k] for k in ("experts", "attention", "embeddings")},
                                                      q["group_size"], "gguf")
        self._map = get_tensor_name_map(getattr(MODEL_ARCH, GGUF_ARCH[self.config.model_type]), self.config.num_layers)
        self._generic = get_tensor_name_map(MODEL_ARCH.LLAMA, self.config.num_layers)  # dense-layer MLPs
        self._targets = self._expert_targets()
        self._validate()

    # ---- names ----
    def gguf_name(self, name: str) -> str:
        """Our checkpoint name -> the GGUF tensor name."""
        if ".linear_attn." in name:
            layer, _, rest = name.removeprefix("model.layers.").partition(".linear_attn.")
            if self.config.model_type == "qwen3_next" and rest in ("in_proj_b.weight", "in_proj_a.weight"):
                return f"blk.{layer}.ssm_ba.weight"
            return f"blk.{layer}.{LINEAR_ATTN[rest]}"
        base, _, suffix = name.rpartition(".")
        if suffix.endswith("e_score_correction_bias"):  # the converter reads `_bias` as the suffix
            base, suffix = name.removesuffix("_bias"), "bias"
        elif suffix not in ("weight", "bias"):
            base, suffix = name, "weight"  # gpt-oss `self_attn.sinks`
        found = self._map.get_name(base) or self._generic.get_name(base)
        if found is None:
            raise OffloadMoeError(f"{self.path}: no GGUF name for tensor {name!r}")
        return f"{found}.{suffix}"

    def _tensor(self, gname: str, want: str) -> GGUFTensor:
        t = self.tensors.get(gname)
        if t is None:
            raise OffloadMoeError(f"{self.path}: tensor {gname!r} is missing (expected {want})")
        return t

    # ---- checks ----
    def _check_types(self):
        for t in self.tensors.values():
            if t.type not in blocks.SUPPORTED and self.requantize is None:
                raise OffloadMoeError(f"{t.file}: tensor {t.name!r} is {blocks.type_name(t.type)}, which has no "
                                      "exact packed form here (supported: "
                                      f"{', '.join(T(x).name for x in blocks.SUPPORTED)}); "
                                      "pass --requantize int4 (or int8, int3, int2) to convert it")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return arch.dense_shapes(self.config, self.config.family, "per_expert")

    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        c, E, I, H = self.config, self.config.num_experts, self.config.intermediate_size, self.config.hidden_size
        shapes = {}
        for i in c.moe_layers:
            shapes |= {f"blk.{i}.ffn_gate_exps.weight": (E, I, H), f"blk.{i}.ffn_up_exps.weight": (E, I, H),
                       f"blk.{i}.ffn_down_exps.weight": (E, H, I)}
            if c.family.expert_bias:
                shapes |= {f"blk.{i}.ffn_gate_exps.bias": (E, I), f"blk.{i}.ffn_up_exps.bias": (E, I),
                           f"blk.{i}.ffn_down_exps.bias": (E, H)}
        return shapes

    def _validate(self):
        for name, shape in self.expected_shapes().items():
            if name.endswith("kv_b_proj.weight") and self.gguf_name(name) not in self.tensors:
                continue  # rejoined from attn_k_b / attn_v_b, checked when read
            if ".linear_attn." in name:
                self._tensor(self.gguf_name(name), f"{list(shape)} for {name}")  # its size is checked when read
                continue
            g = self.gguf_name(name)
            t = self._tensor(g, f"{list(shape)} for {name}")
            if t.shape != shape and _squeezed(t.shape) != _squeezed(shape):
                raise OffloadMoeError(f"{t.file}: tensor {g!r} has shape {list(t.shape)}, expected {list(shape)} "
                                      "from the file's metadata")
        for g, shape in self.expert_shapes().items():
            t = self._tensor(g, f"{list(shape)}")
            if t.shape != shape:
                raise OffloadMoeError(f"{t.file}: tensor {g!r} has shape {list(t.shape)}, expected {list(shape)} "
                                      "from the file's metadata")

    # ---- reading ----
    def router_name(self, layer: int) -> str:
        return arch.router_name(self.config, self.config.family, "per_expert", layer)

    def get(self, name: str) -> torch.Tensor:
        """A tensor as floats (dequantized if packed), in our [out, in] orientation."""
        return self.get_weight(name, None, packed=False)

    def get_weight(self, name: str, shape, packed: bool = True, in_place: bool = False):
        """A dense weight: a float tensor, or a `QuantizedWeight` where the block type maps exactly and
        the model computes it through a quantized module (no bias; not a router or shared-expert gate).
        in_place: a `GGMLWeight` view of a quantized matrix instead (any ggml block type), a float
        tensor viewing the file where the file stores floats."""
        c = self.config
        if name.endswith("kv_b_proj.weight") and self.gguf_name(name) not in self.tensors:
            return self._kv_b(name)
        if ".linear_attn." in name:
            return self._linear_attn(name, shape)
        g = self.gguf_name(name)
        t = self._tensor(g, name)
        want = tuple(shape) if shape is not None else t.shape
        quantized_module = (packed and len(want) == 2 and not name.endswith(
            ("gate.weight", "router.weight", "shared_expert_gate.weight"))
            and name.removesuffix("weight") + "bias" not in self.expected_shapes())
        if in_place and (t.type in FLOAT_TYPES or (quantized_module and t.type in BLOCK_TYPES)):
            w = _view(t, None, want)
        elif quantized_module and t.type in blocks.PACKED:
            w = blocks.to_quantized(_bytes(t.data), T(t.type), want)
        else:
            w = _floats(t).reshape(want)
        if self._needs_unpermute(name) and not in_place:
            rows = unpermute(torch.arange(want[0]), c.num_heads if ".q_proj." in name else c.num_kv_heads)
            w = w[rows] if isinstance(w, torch.Tensor) else _take_rows(w, rows)
        return w

    @property
    def rope_pairs(self) -> str:
        """How RoPE pairs the q/k dims of the in-place weights (`ModelConfig.rope_pairs`): llama.cpp's
        converter permutes a llama-architecture file's q/k rows so its rotation pairs neighbours."""
        return "adjacent" if self.config.model_type == "mixtral" else "half"

    def _needs_unpermute(self, name: str) -> bool:
        return self.config.model_type == "mixtral" and name.endswith(("q_proj.weight", "k_proj.weight",
                                                                      "q_proj.bias", "k_proj.bias"))

    def _linear_attn(self, name: str, shape) -> torch.Tensor:
        """A Gated DeltaNet tensor as floats, in transformers' layout and order (see the module docstring)."""
        la, rest = self.config.linear_attention, name.rpartition(".linear_attn.")[2]
        t = self._tensor(self.gguf_name(name), name)
        w = _floats(t)
        nk, nv, dk, dv = la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim
        if t.name.endswith("ssm_ba.weight"):  # per key head: b (nv/nk rows), then a
            w = w.reshape(nk, 2, nv // nk, -1)[:, int(rest == "in_proj_a.weight")].reshape(nv, -1)
        elif rest == "A_log":
            w = torch.log(-w)
        want = tuple(shape) if shape is not None else (w.shape if rest != "conv1d.weight" else
                                                       (la.conv_dim, 1, la.conv_kernel))
        if w.numel() != int(np.prod(want)):
            raise OffloadMoeError(f"{t.file}: tensor {t.name!r} has shape {list(t.shape)}, expected {list(want)} "
                                  f"for {name} from the file's metadata")
        w = w.reshape(want)
        if self.config.model_type == "qwen3_5_moe_text" and nk != nv:  # tiled value heads -> grouped by key head
            if rest == "in_proj_qkv.weight":
                w = torch.cat((w[:2 * nk * dk], _grouped(w[2 * nk * dk:], 0, nk, dv)))
            elif rest == "conv1d.weight":
                w = torch.cat((w[:2 * nk * dk], _grouped(w[2 * nk * dk:], 0, nk, dv)))
            elif rest == "in_proj_z.weight":
                w = _grouped(w, 0, nk, dv)
            elif rest in ("in_proj_b.weight", "in_proj_a.weight", "A_log", "dt_bias"):
                w = _grouped(w, 0, nk, 1)
            elif rest == "out_proj.weight":
                w = _grouped(w, 1, nk, dv)
        return w.contiguous()

    def _kv_b(self, name: str) -> torch.Tensor:
        """DeepSeek's kv_b_proj [nh·(nope + v), rank] from attn_k_b [nh, rank, nope] and attn_v_b [nh, v, rank]."""
        m, nh = self.config.mla, self.config.num_heads
        prefix = self.gguf_name(name).removesuffix("attn_kv_b.weight")
        k_b = _floats(self._tensor(prefix + "attn_k_b.weight", "attn_kv_b or attn_k_b")).reshape(
            nh, m.kv_lora_rank, m.qk_nope_head_dim)
        v_b = _floats(self._tensor(prefix + "attn_v_b.weight", "attn_kv_b or attn_v_b")).reshape(
            nh, m.v_head_dim, m.kv_lora_rank)
        return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, m.kv_lora_rank)  # [nh·(nope+v), rank]

    def expert(self, layer: int, expert: int) -> dict:
        """One expert's w1, w3: [I, H] and w2: [H, I] (packed where the type maps), gpt-oss's biases."""
        out = {}
        for w, stem in EXPERT_MATRICES.items():
            t = self.tensors[f"blk.{layer}.{stem}.weight"]
            out[w] = self._expert_matrix(t, expert, self._targets[w])
        if self.config.family.expert_bias:
            for b, stem in EXPERT_BIASES.items():
                out[b] = _floats(self.tensors[f"blk.{layer}.{stem}.bias"], expert)
        return out

    @property
    def in_place(self) -> bool:
        """Whether every expert matrix (and bias) can be computed where it lies: a ggml block type or
        a float type (not when `requantize` asked for a conversion)."""
        if self.requantize is not None:
            return False
        return all(self.tensors[f"blk.{i}.{stem}.{kind}"].type in (*BLOCK_TYPES, *FLOAT_TYPES)
                   for i in self.config.moe_layers for stem in EXPERT_MATRICES.values()
                   for kind in (("weight", "bias") if self.config.family.expert_bias else ("weight",)))

    @property
    def uniform_experts(self) -> bool:
        """Whether each expert matrix has one type in every MoE layer (so one flat slot layout holds
        every layer's experts in the file's own bytes; Q4_K_M's Q6_K ffn_down layers do not)."""
        return all(len({self.tensors[f"blk.{i}.{stem}.weight"].type for i in self.config.moe_layers}) == 1
                   for stem in EXPERT_MATRICES.values())

    def experts_stored_as(self, dtype: torch.dtype) -> bool:
        """Whether every expert matrix is stored as floats of `dtype` (F32, F16, BF16): then the file's
        bytes are the very form a device computes them in, and a CUDA run fills its host tier and
        slots from the mapping instead of converting (no `requantize`)."""
        want = {torch.float32: T.F32, torch.float16: T.F16, torch.bfloat16: T.BF16}.get(dtype)
        return self.requantize is None and want is not None and all(
            self.tensors[f"blk.{i}.{stem}.weight"].type == want
            for i in self.config.moe_layers for stem in EXPERT_MATRICES.values())

    def expert_in_place(self, layer: int, expert: int) -> dict:
        """One expert as views of the mapping: w1, w3 [I, H] and w2 [H, I] as `GGMLWeight` (or float
        tensors for float types), gpt-oss's biases as float views. No byte is read here."""
        out = {}
        for w, stem in EXPERT_MATRICES.items():
            t = self.tensors[f"blk.{layer}.{stem}.weight"]
            out[w] = _view(t, expert, t.shape[1:])
        if self.config.family.expert_bias:
            for b, stem in EXPERT_BIASES.items():
                t = self.tensors[f"blk.{layer}.{stem}.bias"]
                out[b] = _view(t, expert, t.shape[1:])
        return out

    def expert_ranges(self, layer: int, expert: int) -> dict[str, tuple[Path, int, int]]:
        """Where each matrix of one expert lies: name -> (file, byte offset, byte count). Expert e of a
        stacked tensor is its e-th equal slice."""
        out = {}
        for w, stem in EXPERT_MATRICES.items():
            t = self.tensors[f"blk.{layer}.{stem}.weight"]
            per = t.nbytes // t.shape[0]
            out[w] = (t.file, t.offset + expert * per, per)
        return out

    def _expert_targets(self) -> dict[str, tuple]:
        """Per matrix, the one form every layer's experts take: ("float",), ("mxfp4",) or ("int", bits, group)."""
        targets = {}
        for w, stem in EXPERT_MATRICES.items():
            types = {self.tensors[f"blk.{i}.{stem}.weight"].type for i in self.config.moe_layers
                     if f"blk.{i}.{stem}.weight" in self.tensors}
            kinds = {_form(t, self.requantize) for t in types}
            if len({k[0] for k in kinds}) > 1:
                raise OffloadMoeError(f"{self.path}: {stem} mixes {', '.join(sorted(T(t).name for t in types))} "
                                      "across layers, which cannot share one packed form; pass --requantize int4")
            kind = next(iter(kinds)) if kinds else ("float",)
            if kind[0] == "int":
                kind = ("int", max(k[1] for k in kinds), min(k[2] for k in kinds))
            targets[w] = kind
        return targets

    def _expert_matrix(self, t: GGUFTensor, expert: int, target: tuple):
        shape = t.shape[1:]
        if target[0] == "float":
            return _floats(t, expert).reshape(shape)
        raw = _bytes(t.data[expert])
        if target[0] == "mxfp4":
            return blocks.to_mxfp4(raw, shape)
        if t.type in blocks.PACKED:
            qw = blocks.to_quantized(raw, T(t.type), shape)
        else:
            qw = blocks.requantized(t.data[expert], T(t.type), shape, self.requantize)
        return widen(qw, target[1], target[2])

    def config_json(self) -> dict:
        """What a checkpoint directory's config.json would say (for `quantize` with a GGUF source)."""
        from .config import config_json

        return config_json(self.file)

    def float_expert(self, layer: int, expert: int) -> dict:
        """One expert with every matrix as float32 (dequantized by the gguf package where packed)."""
        out = {}
        for w, stem in EXPERT_MATRICES.items():
            out[w] = _floats(self.tensors[f"blk.{layer}.{stem}.weight"], expert)
        if self.config.family.expert_bias:
            for b, stem in EXPERT_BIASES.items():
                out[b] = _floats(self.tensors[f"blk.{layer}.{stem}.bias"], expert)
        return out

    def tokenizer_parts(self):
        """The file's own tokenizer and chat template (`tokenizer.TokenizerParts`; None without a vocabulary)."""
        from .tokenizer import tokenizer_parts

        return tokenizer_parts(self.file) if self.file.get("tokenizer.ggml.tokens") else None

    # ---- facts for `info` and `plan` ----
    def weights_by_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (parameters, bytes in the file), from the tensor metadata alone, each tensor sorted by
        our name for it (`checkpoint.weight_kind`, as a safetensors checkpoint's are)."""
        ours = {}
        for name in self.expected_shapes():
            try:
                ours[self.gguf_name(name)] = name
            except OffloadMoeError:  # a tensor the converter renames or splits (deepseek2's kv_b)
                pass

        def our_name(gname: str) -> str:  # stacked experts and split attention have no single name of ours
            return ours.get(gname) or ("model.experts." if "_exps." in gname else
                                       "model.linear_attn." if ".ssm_" in gname else
                                       "model.self_attn." if ".attn_" in gname else gname)

        return weights_by_kind((our_name(t.name), t.shape, t.nbytes) for t in self.tensors.values())

    def dtypes(self) -> list[str]:
        return sorted({blocks.type_name(t.type) for t in self.tensors.values()})

    def shard_files(self) -> list[Path]:
        return list(self.file.files)

    def total_bytes(self) -> int:
        return self.file.total_bytes()


def header_quantization(f: GGUFFile) -> dict | None:
    """Our description of a file's widths, for the planner and `info`: per kind the setting of its
    widest tensor type (Q6_K -> int8, Q4_K -> int4, ...) and the smallest group; None when all float."""
    kinds = {"experts": "_exps.weight", "attention": ".attn_", "embeddings": "token_embd"}
    settings, groups, ggml = {}, [], {}
    for kind, marker in kinds.items():
        types = [t.type for t in f.tensors.values() if marker in t.name and len(t.shape) >= 2]
        settings[kind] = _setting_of(max(types, key=_width_rank)) if types else "bf16"
        if types:  # the planner sizes a kind by its widest type's own blocks (Q4_0: 18 bytes per 32)
            ggml[kind] = T(max(types, key=_width_rank)).name
        groups += [blocks.PACKED[T(x)][1] for x in types if x in blocks.PACKED]
    if all(s in ("bf16", "fp16", "fp32") for s in settings.values()):
        return None
    return {"quant_method": "gguf", "group_size": min(groups) if groups else 32, **settings,
            "file_type": f.get("general.file_type"), "ggml_types": ggml}


def _grouped(w: torch.Tensor, dim: int, key_heads: int, head_dim: int) -> torch.Tensor:
    """Value heads along `dim` from tiled order (qwen35moe: [v0 of every key head, v1 of every one, ...])
    back to grouped by key head, as transformers keeps them."""
    shape = list(w.shape)
    split = shape[:dim] + [-1, key_heads, head_dim] + shape[dim + 1:]   # (..., nv/nk, nk, hd, ...)
    return w.reshape(split).transpose(dim, dim + 1).reshape(shape)


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's `LlamaModel.permute` of q/k rows: [heads·d, ...] with each head's rows
    ordered (d/2, 2) back to (2, d/2)."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _take_rows(qw: QuantizedWeight, rows: torch.Tensor) -> QuantizedWeight:
    """Rows of a packed weight are independent: permuting them is exact."""
    return QuantizedWeight(qw.packed[rows], qw.scales[rows], qw.zeros[rows], qw.bits, qw.group_size, qw.shape)


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def widen(qw: QuantizedWeight, bits: int, group: int) -> QuantizedWeight:
    """The same weight with codes stored in `bits` >= qw.bits and scales per `group` (a divisor of
    qw.group_size): exact, values unchanged."""
    if qw.bits == bits and qw.group_size == group:
        return qw
    repeat = qw.group_size // group
    codes = qw.codes()
    return QuantizedWeight(pack(codes, bits), qw.scales.repeat_interleave(repeat, dim=1),
                           qw.zeros.repeat_interleave(repeat, dim=1), bits, group, qw.shape)


def _form(t: int, requantize: int | None) -> tuple:
    if t in blocks.FLOAT_TYPES:
        return ("float",)
    if t == T.MXFP4:
        return ("mxfp4",)
    if t in blocks.PACKED:
        return ("int", *blocks.PACKED[T(t)])
    return ("int", requantize, 32)


def _setting_of(t: int) -> str:
    if t in blocks.PACKED:
        return f"int{blocks.PACKED[T(t)][0]}"
    return {T.F32: "fp32", T.F16: "fp16", T.BF16: "bf16", T.MXFP4: "mxfp4"}.get(t, "int4")


def _width_rank(t: int) -> int:
    """Orders types by stored bits per weight, so a kind is described by its widest tensor."""
    bs, ts = GGML_QUANT_SIZES[T(t)]
    return ts * 8 // bs


def _view(t: GGUFTensor, index: int | None, shape: tuple[int, ...]):
    """A tensor (or row block `index`) where it lies in the mapping: a `GGMLWeight` for a block type
    (2-D), a float tensor of the file's dtype otherwise. No copy."""
    data = t.data if index is None else t.data[index]
    if t.type in BLOCK_TYPES:
        rows = int(np.prod(shape[:-1]))
        return GGMLWeight(torch.from_numpy(data).view(torch.uint8).reshape(rows, -1), T(t.type), (rows, shape[-1]))
    raw = torch.from_numpy(data)
    return (raw.view(torch.bfloat16) if t.type == T.BF16 else raw).reshape(shape)


def _bytes(a: np.ndarray) -> torch.Tensor:
    """Bytes of a mmap'd view, copied out of the map (only these bytes are read)."""
    return torch.from_numpy(np.array(a, copy=True).reshape(-1).view(np.uint8))


def _floats(t: GGUFTensor, index: int | None = None) -> torch.Tensor:
    """A tensor (or row block `index` of its first dimension) as float32 [torch order]."""
    data = t.data if index is None else t.data[index]
    shape = t.shape if index is None else t.shape[1:]
    if t.type == T.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)
    if t.type == T.F16:
        return torch.from_numpy(np.array(data, dtype=np.float16)).float().reshape(shape)
    if t.type == T.BF16:
        raw = torch.from_numpy(np.array(data, copy=True).view(np.uint8).reshape(-1))
        return raw.view(torch.bfloat16).float().reshape(shape)
    return blocks.dequantize(np.array(data, copy=True), T(t.type), shape)
