"""Synthetic checkpoints: the real layer shapes of known models with random weights.

A `SyntheticCheckpoint` answers the same reads as `Checkpoint` (config, dense tensors, one expert
at a time) but makes the tensors up, deterministically from a seed and the tensor's name, so a
full-size Mixtral-8x7B can be benchmarked layer by layer straight into the expert tiers without a
90 GB file. `layers` and `scale` shrink it for CPU smoke tests while keeping its proportions.

`bits` (2, 3, 4 or 8) makes it a quantized checkpoint instead (experts and attention at that width,
attention without biases only,
offload_moe's own format, as `offload-moe quantize` writes it), built directly in packed form:
random codes are drawn once per matrix shape into a pool twice the matrix's height, each matrix
is a row-offset view of it, and only its small scales are drawn per matrix. So a full-size int4
Mixtral-8x7B (256 experts, 25 GB packed) is made in seconds rather than in half an hour of bf16
`randn`; the float tensors of that mode (embeddings) come from pools the same way.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from .checkpoint import dense_shapes
from .config import ModelConfig
from ..base.errors import OffloadMoeError
from ..kernels.format import QuantSpec, tensor_kind
from ..kernels.groupwise import QuantizedWeight
from ..kernels.pack import SUPPORTED_BITS, packed_cols
from .synthetic_sigmoid import SIGMOID_MODELS

LLAMA4_TEXT = dict(model_type="llama4_text", vocab_size=202048, hidden_size=5120, intermediate_size=8192,
                   intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                   head_dim=128, num_experts_per_tok=1, no_rope_layer_interval=4, attention_chunk_size=8192,
                   attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1, rms_norm_eps=1e-5,
                   rope_theta=500000.0, bos_token_id=200000, eos_token_id=[200001, 200007, 200008],
                   torch_dtype="bfloat16")
# Published config.json values (the fields our ModelConfig reads).
KNOWN_MODELS = {
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
                         max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
                         torch_dtype="bfloat16"),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
                          rope_theta=1e6, max_position_embeddings=40960, bos_token_id=151643,
                          eos_token_id=151645, torch_dtype="bfloat16"),
    "olmoe-1b-7b": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                        num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None, rms_norm_eps=1e-5,
                        rope_theta=10000.0, max_position_embeddings=4096, eos_token_id=50279,
                        torch_dtype="bfloat16"),
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
                             qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
                             num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
                             topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                             routed_scaling_factor=1.0, rms_norm_eps=1e-6, rope_theta=10000,
                             rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                               beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
                             max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
                             torch_dtype="bfloat16"),
    # gpt-oss publishes its experts in MXFP4; synthetic experts are bf16 (the transposed layout's shapes)
    "gpt-oss-20b": dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                        num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                        num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                        layer_types=["sliding_attention", "full_attention"] * 12, attention_bias=True,
                        swiglu_limit=7.0, rms_norm_eps=1e-5, rope_theta=150000,
                        rope_scaling=dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=4096,
                                          beta_fast=32.0, beta_slow=1.0, truncate=False),
                        max_position_embeddings=131072, eos_token_id=200002, torch_dtype="bfloat16"),
    # hybrid: three Gated DeltaNet layers to one gated full-attention layer (tests/data holds the published files)
    "qwen3-next-80b-a3b": dict(model_type="qwen3_next", vocab_size=151936, hidden_size=2048, intermediate_size=5120,
                               moe_intermediate_size=512, shared_expert_intermediate_size=512, num_hidden_layers=48,
                               num_attention_heads=16, num_key_value_heads=2, head_dim=256, num_experts=512,
                               num_experts_per_tok=10, norm_topk_prob=True, full_attention_interval=4,
                               linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                               linear_value_head_dim=128, linear_conv_kernel_dim=4, partial_rotary_factor=0.25,
                               rms_norm_eps=1e-6, rope_theta=1e7, max_position_embeddings=262144,
                               bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16"),
    "qwen3.5-35b-a3b": dict(model_type="qwen3_5_moe_text", vocab_size=248320, hidden_size=2048,
                            moe_intermediate_size=512, shared_expert_intermediate_size=512, num_hidden_layers=40,
                            num_attention_heads=16, num_key_value_heads=2, head_dim=256, num_experts=256,
                            num_experts_per_tok=8, full_attention_interval=4, linear_num_key_heads=16,
                            linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                            linear_conv_kernel_dim=4, partial_rotary_factor=0.25, rms_norm_eps=1e-6,
                            rope_theta=1e7, max_position_embeddings=262144, torch_dtype="bfloat16"),
    # Llama 4's text models (MoE and NoPE layers from interleave_moe_layer_step and no_rope_layer_interval,
    # as transformers derives them, so `layers` can cut them short)
    "llama-4-scout-17b-16e": dict(LLAMA4_TEXT, num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
                                  max_position_embeddings=262144,
                                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-4-maverick-17b-128e": dict(LLAMA4_TEXT, num_local_experts=128, interleave_moe_layer_step=2,
                                      use_qk_norm=False, max_position_embeddings=1048576),
}
KNOWN_MODELS |= SIGMOID_MODELS  # DeepSeek-V3, Kimi-K2, GLM-4.5/-Air, GLM-4.7-Flash, MiniMax-M2 (synthetic_sigmoid.py)
# Widths that `scale` shrinks, and the multiple each is rounded to.
_SCALED = {"rotary_dim": 8, "intermediate_size": 64, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
           "intermediate_size_mlp": 64,
           "kv_lora_rank": 8, "q_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
           "linear_key_head_dim": 8, "linear_value_head_dim": 8}


def synthetic_config(name: str, *, layers: int | None = None, scale: float = 1.0,
                     bits: int | None = None) -> ModelConfig:
    if name not in KNOWN_MODELS:
        raise OffloadMoeError(f"synthetic model {name!r} is not known (known: {', '.join(sorted(KNOWN_MODELS))})")
    raw = dict(KNOWN_MODELS[name])
    if layers is not None:
        if not 1 <= layers <= raw["num_hidden_layers"]:
            raise OffloadMoeError(f"layers = {layers}, expected 1..{raw['num_hidden_layers']} for {name}")
        raw["num_hidden_layers"] = layers
        if "layer_types" in raw:
            raw["layer_types"] = raw["layer_types"][:layers]
        if raw.get("full_attention_interval", 0) > layers:  # hybrid: keep one full-attention layer, the last
            raw["full_attention_interval"] = layers
    if not 0 < scale <= 1:
        raise OffloadMoeError(f"scale = {scale}, expected 0 < scale <= 1")
    if scale < 1:
        def shrink(value: int, multiple: int) -> int:
            return max(multiple, round(value * scale / multiple) * multiple)

        heads = raw["num_attention_heads"]
        if "head_dim" in raw:  # the hidden size need not be heads × head_dim
            raw["head_dim"], raw["hidden_size"] = shrink(raw["head_dim"], 8), shrink(raw["hidden_size"], 64)
        else:
            raw["head_dim"] = shrink(raw["hidden_size"] // heads, 8)
            raw["hidden_size"] = heads * raw["head_dim"]
        raw |= {k: shrink(raw[k], m) for k, m in _SCALED.items() if raw.get(k)}
        raw["vocab_size"] = max(256, round(raw["vocab_size"] * scale))
    if bits is not None:
        if bits not in SUPPORTED_BITS:
            raise OffloadMoeError(f"bits = {bits!r}, expected one of {', '.join(map(str, SUPPORTED_BITS))}")
        cfg = ModelConfig.from_dict(raw, source=f"synthetic:{name}")
        ins = [s[-1] for s in {**dense_shapes(cfg), "w1": (1, cfg.hidden_size), "w2": (1, cfg.intermediate_size)}
               .values() if len(s) == 2]
        group = 64
        while any(i % group for i in ins):  # the largest power of two <= 64 dividing every input width
            group //= 2
        # attention with biases (gpt-oss) stays bf16: the model takes quantized attention without biases only
        attention = "bf16" if cfg.qkv_bias or cfg.o_bias else f"int{bits}"
        raw["quantization_config"] = QuantSpec({"experts": f"int{bits}", "attention": attention,
                                                "embeddings": "bf16"}, group, "rtn").to_config()
    return ModelConfig.from_dict(raw, source=f"synthetic:{name}")


class SyntheticCheckpoint:
    """Random weights with a known model's shapes; same read interface as `Checkpoint`."""

    layout = "per_expert"

    def __init__(self, name: str, *, layers: int | None = None, scale: float = 1.0, seed: int = 0,
                 bits: int | None = None):
        self.config = synthetic_config(name, layers=layers, scale=scale, bits=bits)
        self.path = Path(f"synthetic:{name}" + (f"-int{bits}" if bits else ""))
        self.seed = seed
        self.dtype = torch.bfloat16
        self.quant = QuantSpec.from_config(self.config.quantization, "synthetic") if bits else None
        self._pools: dict[tuple, torch.Tensor] = {}

    def _generator(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))

    def _pooled(self, kind: str, name: str, rows: int, cols: int, make) -> torch.Tensor:
        """A [rows, cols] row-offset view of a pool `make(generator, shape)` made once per (kind, shape)."""
        key = (kind, rows, cols)
        if key not in self._pools:
            self._pools[key] = make(self._generator(f"pool:{kind}:{rows}x{cols}"), (2 * rows, cols))
        start = zlib.crc32(f"{kind}:{name}".encode()) % rows
        return self._pools[key][start:start + rows]  # contiguous rows

    def _packed(self, name: str, shape: tuple[int, int], bits: int) -> QuantizedWeight:
        """Random codes and scales, pooled: w = (q - qmax/2) * s with s ~ U[0.5, 1.5) * 2 / (qmax sqrt(in))."""
        out_f, in_f = shape
        group, qmax = self.quant.group_size, (1 << bits) - 1
        unit = 2 / qmax * in_f ** -0.5
        codes = self._pooled("codes", name, out_f, packed_cols(in_f, bits),
                             lambda g, s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8))
        scales = self._pooled(f"scales{bits}:{in_f}", name, out_f, in_f // group,
                              lambda g, s: ((torch.rand(s, generator=g) + 0.5) * unit).half())
        zeros = self._pooled(f"zeros{bits}", "", out_f, in_f // group,
                             lambda g, s: torch.full(s, qmax / 2, dtype=torch.float16))
        return QuantizedWeight(codes, scales, zeros, bits, group, shape)

    def get_weight(self, name: str, shape: tuple[int, ...]):
        """A weight as a quantized checkpoint stores it: packed where its kind is quantized."""
        bits = self.quant.bits(tensor_kind(name)) if self.quant and name.endswith(".weight") else None
        if bits is not None and len(shape) == 2:
            return self._packed(name, shape, bits)
        if self.quant and len(shape) == 2:
            return self._pooled("float", name, *shape,
                                lambda g, s: (torch.randn(s, generator=g) * s[1] ** -0.5).to(self.dtype))
        return self.get(name)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return dense_shapes(self.config)

    def _random(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:  # norm weights 1, biases and sinks 0
            return (torch.ones if name.endswith("norm.weight") else torch.zeros)(shape, dtype=self.dtype)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(self.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._random(name, self.expected_shapes()[name])

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        H, I = self.config.hidden_size, self.config.intermediate_size
        p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        if self.quant:
            bits = self.quant.bits("experts")
            w = {"w1": self._packed(p + "w1", (I, H), bits), "w3": self._packed(p + "w3", (I, H), bits),
                 "w2": self._packed(p + "w2", (H, I), bits)}
        else:
            w = {"w1": self._random(p + "w1", (I, H)), "w3": self._random(p + "w3", (I, H)),
                 "w2": self._random(p + "w2", (H, I))}
        if self.config.family.expert_bias:
            w |= {"b1": self._random(p + "b1", (I,)), "b3": self._random(p + "b3", (I,)),
                  "b2": self._random(p + "b2", (H,))}
        return w
