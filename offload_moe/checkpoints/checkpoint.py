"""Lazy reading of a Hugging Face checkpoint directory (safetensors, single file or sharded).

Opening reads `config.json`, the shard index and each shard's safetensors *header* only, and checks
every tensor the config implies (present, right shape, a dtype we compute in, bytes actually in
the file) so a broken checkpoint fails at once with one line naming the file and tensor. Tensor
data is read through safetensors' mmap when asked, so a 90 GB checkpoint opens on a 24 GB machine.

Tensor names and expert layouts are the family's (`arch`): per expert (published checkpoints,
transformers' default `save_pretrained`), e.g. Mixtral's
`model.layers.{i}.block_sparse_moe.experts.{e}.w1/w2/w3.weight`; fused (transformers
`save_original_format=False`): `model.layers.{i}.mlp.experts.gate_up_proj` [E, 2I, H] (gate rows
first, then up) and `...mlp.experts.down_proj` [E, H, I]; gpt-oss's transposed, interleaved one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import families as arch
from .config import ModelConfig
from ..base.errors import OffloadMoeError
from .hub import resolve as resolve_reference
from ..kernels.format import QuantSpec, tensor_kind
from ..kernels.groupwise import QuantizedWeight
from ..kernels.mxfp4 import is_mxfp4
from ..kernels.published_config import PublishedSpec, is_published
from ..kernels.pack import packed_cols
from .safetensors_header import TensorInfo, read_header  # noqa: F401  (re-exported)
from .safetensors_map import FileMaps
from .sanity import check_layers_present, index_weight_map

FLOAT_DTYPES = {"F32", "F16", "BF16"}
ROUTER_LIKE = ("gate.weight", "router.weight")   # routers and shared-expert gates: read as floats (`.weight`)


def dense_shapes(c: ModelConfig, layout: str = "per_expert") -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every dense (non-expert) tensor a config implies."""
    return arch.dense_shapes(c, c.family, layout)


WEIGHT_KINDS = ("attention", "experts", "routers", "embeddings", "norms", "dense MLPs")


def weight_kind(name: str) -> str:
    """What a tensor of a checkpoint (by our name) is, for `info` and `plan`: the kinds of
    `ModelConfig.params_by_kind` (q/k norms and MLA's latent norms belong to attention, as there;
    shared experts and their gates to the dense MLPs). Packed parts (`.qweight`, `.scales`...) go with
    their matrix."""
    if ".experts." in name:
        return "experts"
    if ".self_attn." in name or ".linear_attn." in name:
        return "attention"
    if "shared_expert" in name or (".mlp." in name and "_proj." in name):  # dense layers, shared experts
        return "dense MLPs"
    if name.endswith(("gate.weight", "gate.bias", ".router.weight", ".router.bias", "e_score_correction_bias")):
        return "routers"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    return "norms"


def weights_by_kind(*tensors) -> dict[str, tuple[int, int]]:
    """kind -> (parameters, bytes) summed over iterables of (our name, shape or None, bytes); the
    dense-MLP kind only where there is one (as `ModelConfig.params_by_kind`)."""
    params = dict.fromkeys(WEIGHT_KINDS, 0)
    nbytes = dict.fromkeys(WEIGHT_KINDS, 0)
    for group in tensors:
        for name, shape, n in group:
            kind = weight_kind(name)
            if shape is not None:
                params[kind] += math.prod(shape)
            nbytes[kind] += n
    return {k: (params[k], nbytes[k]) for k in WEIGHT_KINDS if k != "dense MLPs" or params[k] or nbytes[k]}


class Checkpoint:
    """A checkpoint directory: its config, a map of tensor name → location, and lazy reads."""

    def __init__(self, path: str | Path):
        if Path(path).is_file():
            raise OffloadMoeError(f"{path}: a file, not a checkpoint directory (expected a directory "
                                  "holding config.json and *.safetensors)")
        self.path = resolve_reference(path)  # a Hugging Face repo id becomes its snapshot in the cache
        if not self.path.is_dir():
            raise OffloadMoeError(f"{self.path}: no such checkpoint directory")
        self.config = ModelConfig.load(self.path)
        q = self.config.quantization  # gpt-oss's own MXFP4 experts are a layout, not our format
        # a publisher's pre-quantized format (FP8 blocks, pack-quantized int, GPTQ), read as stored
        self.published = PublishedSpec.from_config(q, str(self.path / "config.json")) if is_published(q) else None
        self.quant = None if is_mxfp4(q) or self.published else QuantSpec.from_config(q, str(self.path / "config.json"))
        self.stored: dict[str, str] = {}  # our name -> the name in the file, where the family renames
        self.tensors = self._index()
        check_layers_present(self.config, self.tensors, self.path)  # before sizes from config.json are trusted
        self.layout = self._detect_layout()
        self._handles: dict[Path, object] = {}
        self._maps = FileMaps()  # views of the shards, for weights computed where they lie (`in_place`)
        self._biased = {n.removesuffix("bias") + "weight" for n in self.expected_shapes() if n.endswith(".bias")}
        self._validate()

    # ---- opening ----
    def _index(self) -> dict[str, TensorInfo]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if os.path.lexists(index):
            weight_map = index_weight_map(index)
            files = sorted(set(weight_map.values()))
        elif os.path.lexists(single):
            weight_map, files = None, ["model.safetensors"]
        else:
            raise OffloadMoeError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            file = self.path / name
            if not os.path.lexists(file):
                raise OffloadMoeError(f"{index}: names shard {name!r}, which is missing from {self.path}")
            tensors.update(read_header(file))
        if weight_map is not None:
            for tensor, name in weight_map.items():
                if tensor not in tensors or tensors[tensor].file.name != name:
                    raise OffloadMoeError(f"{self.path / name}: tensor {tensor!r} listed in the index is "
                                          "not in that shard")
        return self._rename(tensors)

    def _rename(self, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """The family's names for the stored ones (Llama 4's `language_model.`, `feed_forward.`; Qwen3.5's
        `model.language_model.`), without the tensors it does not read (a vision tower, an MTP layer);
        `stored` keeps the way back."""
        rename = self.config.family.rename
        if rename is None:
            return tensors
        ours = {}
        for stored, info in tensors.items():
            name = rename(stored)
            if name is not None:
                ours[name] = info
                if name != stored:
                    self.stored[name] = stored
        return ours

    def _detect_layout(self) -> str:
        """The first of the family's stacked layouts whose first tensor is present, else per expert."""
        fam = self.config.family
        prefix = f"model.layers.{self.config.moe_layers[0]}.mlp.experts."
        for name, stacked in fam.stacked.items():
            if name in fam.layouts and next(iter(stacked.shapes(self.config, prefix))) in self.tensors:
                return name
        if "per_expert" not in fam.layouts:
            raise OffloadMoeError(f"{self.path}: no model.layers.{self.config.moe_layers[0]}.mlp.experts.gate_up_proj "
                                  f"(expected a {self.config.model_type} checkpoint's experts)")
        return "per_expert"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every dense (non-expert) tensor the config implies, with its shape."""
        return dense_shapes(self.config, self.layout)

    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        return arch.expert_shapes(self.config, self.config.family, self.layout)

    def _validate(self):
        for name, shape in {**self.expected_shapes(), **self.expert_shapes()}.items():
            if self._bits(name) is not None:
                self._validate_quantized(name, shape)
                continue
            if self.published and self.published.quantized(self.tensors, name):
                if weight_kind(name) in ("routers", "norms") or name.endswith(ROUTER_LIKE):
                    raise OffloadMoeError(f"{self.path}: {name!r} is stored {self.published.stored}; a router or "
                                          "norm is read as the floats it should be stored in")
                self.published.validate(self.tensors, name, shape, self.path)
                continue
            info = self.tensors.get(name)
            if info is None:
                raise OffloadMoeError(f"{self.path}: tensor {name!r} is missing "
                                      f"(expected shape {list(shape)} from config.json)")
            if info.shape != shape:
                raise OffloadMoeError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                      f"expected {list(shape)} from config.json")
            if name.endswith(("_blocks", "_scales")):  # MXFP4 codes and exponents
                if info.dtype != "U8":
                    raise OffloadMoeError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected U8 (MXFP4)")
            elif info.dtype not in FLOAT_DTYPES:
                raise OffloadMoeError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, "
                                      "expected one of BF16, F16, F32")

    def _bits(self, name: str) -> int | None:
        return self.quant.bits(tensor_kind(name)) if self.quant and name.endswith(".weight") else None

    def _validate_quantized(self, name: str, shape: tuple[int, ...]):
        bits, group, prefix = self._bits(name), self.quant.group_size, name.removesuffix(".weight")
        out_f, in_f = shape
        expected = {"qweight": ("U8", (out_f, packed_cols(in_f, bits))),
                    "scales": ("F16", (out_f, in_f // group)), "zeros": ("F16", (out_f, in_f // group))}
        for suffix, (dtype, want) in expected.items():
            info = self.tensors.get(f"{prefix}.{suffix}")
            if info is None:
                raise OffloadMoeError(f"{self.path}: tensor {prefix}.{suffix!r} is missing (expected {dtype} "
                                      f"{list(want)} for a {bits}-bit {list(shape)} weight)")
            if info.dtype != dtype or info.shape != want:
                raise OffloadMoeError(f"{info.file}: tensor '{prefix}.{suffix}' is {info.dtype} {list(info.shape)}, "
                                      f"expected {dtype} {list(want)} for a {bits}-bit {list(shape)} weight")

    # ---- reading ----
    def router_name(self, layer: int) -> str:
        return arch.router_name(self.config, self.config.family, self.layout, layer)

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def get_weight(self, name: str, shape: tuple[int, ...], in_place: bool = False):
        """A weight as stored: a tensor, or a `QuantizedWeight` in a quantized checkpoint, or a
        publisher's form (quant/published.py). in_place: its tensors views of the file's mapping."""
        if self.published and self.published.quantized(self.tensors, name):
            w = self.published.read(self._view if in_place else self.get, self.tensors, name, shape)
            # a projection with a bias (Qwen2-MoE's q/k/v) is an nn.Linear: its floats, dequantized once at load
            return w.dequantize(torch.float32) if name in self._biased else w
        if in_place:
            return self._view(name)
        bits = self._bits(name)
        if bits is None:
            return self.get(name)
        prefix = name.removesuffix(".weight")
        parts = {f"{prefix}.{s}": self.get(f"{prefix}.{s}") for s in ("qweight", "scales", "zeros")}
        return QuantizedWeight.from_state_dict(parts, prefix, bits, self.quant.group_size, shape)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (only its bytes are touched)."""
        info = self.tensors.get(name)
        if info is None:
            raise OffloadMoeError(f"{self.path}: tensor {name!r} not found")
        try:
            return self._handle(info.file).get_tensor(self.stored.get(name, name))
        except SafetensorError as e:  # the file changed since its header was checked
            raise OffloadMoeError(f"{info.file}: cannot read tensor {name!r} ({str(e).splitlines()[0]})") from None

    def _view(self, name: str) -> torch.Tensor:
        """Tensor `name` as a view of its shard's mapping, or a copy where torch cannot view it."""
        view = self._maps.view(self.tensors[name])
        return view if view is not None else self.get(name)

    # ---- computed where they lie (a CPU run of a publisher's pre-quantized checkpoint) ----
    @property
    def in_place(self) -> bool:
        """Whether a CPU run computes from views of the files: a publisher's pre-quantized checkpoint in
        the per-expert layout (each form computes from its stored tensors; see quant/published.py)."""
        return self.published is not None and self.layout == "per_expert"

    uniform_experts = False   # experts in the offloading engine are copied into its host tier as they are

    def expert_in_place(self, layer: int, expert: int) -> dict:
        """One expert's w1, w3 [I, H] and w2 [H, I] as views of the mapping: nothing read here."""
        names = arch.expert_names(self.config, self.config.family, layer, expert)
        return {w: self.get_weight(name, shape, in_place=True) for w, (name, shape) in names.items()}

    def _get_row(self, name: str, index: int) -> torch.Tensor:
        info = self.tensors[name]
        try:
            return self._handle(info.file).get_slice(self.stored.get(name, name))[index]
        except SafetensorError as e:
            raise OffloadMoeError(f"{info.file}: cannot read tensor {name!r} ({str(e).splitlines()[0]})") from None

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """The three matrices of one expert in [out, in] form: w1 (gate), w3 (up): [I, H]; w2: [H, I]
        (gpt-oss adds biases b1, b3: [I]; b2: [H]). `layer` counts all layers, dense ones too."""
        stacked = self.config.family.stacked.get(self.layout)
        if stacked is not None:  # the family's file says how to cut expert `expert` out of its tensors
            p = f"model.layers.{layer}.mlp.experts."
            return stacked.decode(lambda name: self._get_row(p + name, expert), self.config)
        names = arch.expert_names(self.config, self.config.family, layer, expert)
        return {w: self.get_weight(name, shape) for w, (name, shape) in names.items()}

    # ---- facts for `info` and `plan` ----
    def weights_by_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (parameters, bytes in the files), from the headers: parameters from the shapes the
        config implies (a packed tensor's logical shape), bytes from what is stored under each name."""
        return weights_by_kind(((name, shape, 0) for name, shape in
                                {**self.expected_shapes(), **self.expert_shapes()}.items()),
                               ((name, None, info.nbytes) for name, info in self.tensors.items()))

    def stored_types(self) -> dict[str, list[str]]:
        """kind -> the types its matrices and vectors are stored in ("bf16", "int4", "fp8-block",
        "int4-pack", "gptq-int4", "mxfp4"...), from the headers, for `info` and `plan`."""
        names = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "U8": "mxfp4"}
        out: dict[str, set[str]] = {}
        for name in {**self.expected_shapes(), **self.expert_shapes()}:
            if self.published and self.published.quantized(self.tensors, name):
                stored = self.published.stored
            elif self._bits(name) is not None:
                stored = f"int{self._bits(name)}"
            else:
                stored = names.get(self.tensors[name].dtype, self.tensors[name].dtype.lower())
            out.setdefault(weight_kind(name), set()).add(stored)
        return {k: sorted(v) for k, v in out.items()}

    def dtypes(self) -> list[str]:
        return sorted({info.dtype for info in self.tensors.values()})

    def shard_files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

    def total_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.shard_files())
