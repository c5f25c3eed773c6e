"""One frozen description of a model, built once from `config.json` and passed down.

Everything else (checkpoint reader, model, expert engine, planner) reads sizes from here and never
re-reads JSON. Parameter and byte counts live here too, because the planner needs them before any
weights exist. An architecture differs only by how its `config.json` maps onto these fields
(`_PARSERS`); the model code is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .families import FAMILIES, family_of, mixer_shapes
from .families.reader import MLA, ConfigReader, LinearAttention
from ..base.errors import OffloadMoeError
from ..base.user_files import read_json_object



@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int            # H: width of the residual stream
    intermediate_size: int      # I: hidden width of one expert MLP
    num_layers: int
    num_heads: int
    num_kv_heads: int           # grouped-query attention: heads share K/V in groups
    head_dim: int               # query/key width per head (MLA: no-RoPE + RoPE parts)
    num_experts: int            # E: routed experts per MoE layer
    top_k: int                  # k: experts used per token
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None   # attend to at most this many most recent positions
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"       # dtype the checkpoint stores dense weights in
    quantization: dict[str, Any] | None = field(default=None, compare=False)
    # ---- where families differ, as config.json says (defaults: Mixtral) ----
    dense_layers: tuple[int, ...] = ()  # layers whose MLP is one dense SwiGLU on the device, no experts
    dense_intermediate_size: int = 0    # hidden width of those dense MLPs
    shared_expert_size: int = 0         # hidden width of the shared expert every token also uses (0: none)
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None       # clamp q, k, v to [-clip_qkv, clip_qkv] (OLMoE)
    norm_topk_prob: bool = True         # renormalise the top-k router weights to sum to 1 ...
    routed_scaling_factor: float = 1.0  # ... or else scale them by this
    n_group: int = 1                    # group-limited routing: experts in n_group groups, the best
    topk_group: int = 1                 # topk_group groups (by their best expert) are eligible
    layer_types: tuple[str, ...] = ()   # per layer "sliding_attention" / "full_attention" / "linear_attention"; (): all alike
    swiglu_limit: float | None = None   # clamped SwiGLU of gpt-oss: the clamp, and the sigmoid's alpha
    swiglu_alpha: float = 1.702
    mla: MLA | None = None
    rope_interleave: bool = True        # MLA: rotate (even, odd) pairs (DeepSeek's layout); else halves
    use_qk_norm: bool = True            # the family's q/k norm is there (GLM-4.5 has it, GLM-4.5-Air not)
    # rotate only the first rotary_dim dims of each head (GLM, MiniMax, Qwen3-Next's partial_rotary_factor); 0: all
    rotary_dim: int = 0
    linear_attention: LinearAttention | None = None  # the Gated DeltaNet of the "linear_attention" layers
    zero_centred_norms: bool = False    # RMSNorm weights are stored as weight - 1 (Qwen3-Next); GGUF stores weight
    rope_scaling: dict[str, Any] | None = field(default=None, compare=False)  # YaRN or llama3 parameters
    # which q/k dims RoPE rotates together: "half" (i, i + d/2) as transformers; "adjacent" (2i, 2i + 1)
    # where the q/k rows are in llama.cpp's order (a Mixtral GGUF computed where it lies: each head's
    # rows permuted (2, d/2) -> (d/2, 2) by its converter, so the same rotation pairs neighbours)
    rope_pairs: str = "half"
    # ---- Llama 4's attention ----
    attention_chunk: int | None = None  # "chunked_attention" layers see only their own chunk of positions
    nope_layers: tuple[int, ...] = ()   # layers without rotary embeddings (global attention)
    qk_l2_norm: bool = False            # weightless RMS norm of each q and k head on the RoPE layers
    attn_temperature: tuple[float, float] | None = None  # NoPE layers' query temperature: (floor_scale, attn_scale)

    # ---- layers ----
    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the layers with routed experts; the expert engine numbers them 0, 1, ..."""
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - len(self.dense_layers)

    def is_linear(self, layer: int) -> bool:
        """Whether the layer mixes tokens with a Gated DeltaNet (a recurrent state, no KV cache)."""
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers with a KV cache (softmax attention, full or sliding)."""
        return tuple(i for i in range(self.num_layers) if not self.is_linear(i))

    def window(self, layer: int) -> int | None:
        """The sliding window of one layer's attention (None: it sees every earlier position)."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def chunk(self, layer: int) -> int | None:
        """The chunk of one layer's local attention (Llama 4): a query sees the earlier positions of
        its own chunk, positions c*chunk .. (c+1)*chunk - 1 (None: not chunked)."""
        if self.layer_types and self.layer_types[layer] == "chunked_attention":
            return self.attention_chunk
        return None

    @property
    def rope_dim(self) -> int:
        """How many dimensions of each query/key head are rotated."""
        return self.mla.qk_rope_head_dim if self.mla else (self.rotary_dim or self.head_dim)

    @property
    def qk_norm(self) -> str | None:
        """The attention's q/k RMSNorm: "head", "full" (see `arch.Family.qk_norm`) or None."""
        return self.family.qk_norm if self.use_qk_norm else None

    @property
    def family(self):
        """The architecture adapter (`arch.Family`): tensor names and model options."""
        return family_of(self.model_type)

    # ---- parameter counts (what the planner and `info` report) ----
    @property
    def params_per_expert(self) -> int:
        n = 3 * self.hidden_size * self.intermediate_size  # w1, w3: [I, H]; w2: [H, I]
        if self.family.expert_bias:
            n += 2 * self.intermediate_size + self.hidden_size
        return n

    @property
    def attention_params(self) -> int:
        """Every layer's token mixer: projections, their biases, q/k norms, sinks; MLA's low-rank pairs
        and latent norm; a Gated DeltaNet's projections, convolution, decay and gated norm."""
        return sum(math.prod(s) for i in range(self.num_layers) for s in mixer_shapes(self, self.family, i).values())

    @property
    def router_params_per_layer(self) -> int:
        """Per MoE layer: the router's weight, its bias, the selection bias of sigmoid routing."""
        return self.num_experts * (self.hidden_size + self.family.router_bias + bool(self.family.score_bias))

    @property
    def shared_expert_params_per_layer(self) -> int:
        """Per MoE layer: the shared expert and its gate, if any."""
        if not self.shared_expert_size:
            return 0
        return 3 * self.hidden_size * self.shared_expert_size + self.hidden_size * self.family.shared_expert_gate

    @property
    def dense_mlp_params_per_layer(self) -> int:
        """Per dense layer."""
        return 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def norm_params(self) -> int:
        """The two RMSNorms of every layer and the final one (q/k norms count as attention)."""
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus lm_head (counted once when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def expert_params(self) -> int:
        return self.num_moe_layers * self.num_experts * self.params_per_expert

    @property
    def device_mlp_params(self) -> int:
        """Dense MLP layers and shared experts: MLP weights that stay on the compute device."""
        return (len(self.dense_layers) * self.dense_mlp_params_per_layer
                + self.num_moe_layers * self.shared_expert_params_per_layer)

    @property
    def shared_params(self) -> int:
        """Everything that is not a routed expert: it stays on the compute device."""
        return (self.attention_params
                + self.num_moe_layers * self.router_params_per_layer
                + self.device_mlp_params + self.norm_params + self.embedding_params)

    @property
    def total_params(self) -> int:
        return self.shared_params + self.expert_params

    def params_by_kind(self) -> dict[str, int]:
        """The parameter counts above by kind, as `checkpoint.weight_kind` sorts a checkpoint's tensors
        (`info` and `plan` show both; a dense-MLP row only where there are dense MLPs or shared experts)."""
        kinds = {"attention": self.attention_params, "experts": self.expert_params,
                 "routers": self.num_moe_layers * self.router_params_per_layer,
                 "embeddings": self.embedding_params, "norms": self.norm_params}
        if self.device_mlp_params:
            kinds["dense MLPs"] = self.device_mlp_params
        return kinds

    @property
    def active_params(self) -> int:
        return self.shared_params + self.num_moe_layers * self.top_k * self.params_per_expert

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        if self.mla:  # the latent and the rotated rope key, shared by all heads
            return self.num_layers * (self.mla.kv_lora_rank + self.mla.qk_rope_head_dim) * dtype_bytes
        return 2 * len(self.attention_layers) * self.num_kv_heads * self.head_dim * dtype_bytes

    def recurrent_state_bytes(self, dtype_bytes: int = 2) -> int:
        """One sequence's state in the Gated DeltaNet layers, whatever its length: the convolution's last
        inputs (compute dtype) and the recurrent state (fp32, as transformers keeps it)."""
        if self.linear_attention is None:
            return 0
        conv, state = self.linear_attention.state_elements()
        return (self.num_layers - len(self.attention_layers)) * (conv * dtype_bytes + state * 4)

    # ---- construction ----
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
        if family is None:
            supported = ", ".join(sorted(FAMILIES))
            raise OffloadMoeError(f"{source}: model_type {model_type!r} is not supported "
                                  f"(supported: {supported})")
        return cls(model_type=model_type, **family.parse(ConfigReader(raw, source)))

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Read a `config.json` file, or the one inside a checkpoint directory."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise OffloadMoeError(f"{file}: not found (expected a Hugging Face config.json)")
        return cls.from_dict(read_json_object(file, "config.json"), str(file))


SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))
