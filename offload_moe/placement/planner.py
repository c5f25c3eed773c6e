"""The memory plan: where every byte of a model goes under a profile, computed from config.json alone.

Why before loading anything: a wrong guess costs a 25 GB download and an out-of-memory error
minutes later. The plan says what stays on the device (shared weights, KV cache, reserve), how many
expert slots per layer fit, which expert copies live in RAM and which on disk, and what each
token will move over the bus; `explain()` says the same in a paragraph, `rows()` as a table.

Byte formulas (the packed groupwise format of `offload_moe.kernels`): a weight [out, in] at b bits
with group size g takes out·ceil(in·b/8) packed bytes plus fp16 scales and zeros, 2·2·out·ceil(in/g)
bytes; int8 is the same formula with b = 8; bf16/fp16 take 2 bytes per parameter. Norms and
routers stay in 16 bits; the KV cache is fp16 (2·layers·kv_heads·head_dim·2 bytes per token).

Slots (the rule of the engine in `experts/cache.py`): each layer owns `slots` expert-sized device
buffers used as an LRU cache, and a miss is copied straight into one, so the minimum is 1 slot per
layer and no device staging buffer (the engine's two staging buffers are pinned host memory for
disk reads). Fewer than top_k slots works, because the engine computes an expert and releases its
slot before claiming it for the next miss, but it thrashes: every token misses at least
top_k - slots experts per layer, and the plan says so. `cache_slots = "auto"` takes as many slots
as fit, at most num_experts (then nothing is offloaded). Prefetch (layers ahead) copies into the
same slots, so it costs no extra memory. The KV cache holds context_length positions even under a
sliding window, as `attention.KVCache` allocates them.

Tiers (the rule of `experts/store.py`): with offload = "ram", whole layers of experts are kept in
host RAM (pinned on a GPU) until ram_budget is spent and the remaining layers go to memory-mapped
disk files; a budget below one layer's experts is an error. offload = "disk" puts every layer on disk.

Mapped (`mapped=True`: a CPU run of a file computed where it lies, a GGUF file): weights are file
pages of the mapping, not anonymous memory. The anonymous memory is the KV cache, the reserve
(activations, per-layer state) and, when the experts do not all fit, the RAM expert cache: slots in
front of the source file (`experts/source.py`), each miss a read of the expert's bytes from it. "In
RAM" then means mapped and resident; everything fits when the shared weights and every expert fit
in ram_budget beside the anonymous memory (offload = "disk" streams anyway). `disk_rate` (bytes/s,
measured on the file by the caller) turns the bytes each token reads into seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..checkpoints.families import mixer_shapes
from ..checkpoints.config import ModelConfig
from ..experts.pinned import planned_bytes
from ..base.errors import OffloadMoeError
from ..kernels.format import QuantSpec
from ..kernels.mxfp4 import is_mxfp4
from ..kernels.mxfp4 import nbytes_for as mxfp4_bytes
from ..kernels.published_config import is_published, planner_settings, stored_bytes
from .profiles import BIT_WIDTHS, Profile, bundled_profiles
from ..base.runtime import available_ram, fmt_bytes, fmt_count, free_vram

GROUP_SIZE = 64            # quantization group along the input dimension
GGML_TYPE_NAMES = {t.name: t for t in GGMLQuantizationType}
AUTO_RAM_FRACTION = 0.9    # ram_budget = "auto": this much of MemAvailable, the rest for the OS


def weight_bytes(out: int, in_: int, bits: str, group_size: int = GROUP_SIZE) -> int:
    """Bytes of one [out, in] weight at a profile bit width ('bf16', 'int4', ...)."""
    if bits == "mxfp4":  # gpt-oss's published experts: 16 code bytes + 1 exponent byte per 32 weights
        return mxfp4_bytes(out, in_)
    published = stored_bytes(bits, out, in_, group_size)  # a publisher's format: "fp8-block", "int4-pack", "gptq-int4"
    if published is not None:
        return published
    b = BIT_WIDTHS[bits]
    if b >= 16:  # stored as floats
        return b // 8 * out * in_
    g = in_ if group_size <= 0 else group_size  # g <= 0: one group per row
    return out * math.ceil(in_ * b / 8) + 2 * 2 * out * math.ceil(in_ / g)


def _checkpoint_bits(config: ModelConfig) -> tuple[str, str, str, int]:
    """(experts, attention, embeddings, group size) settings of an already quantized checkpoint."""
    if is_mxfp4(config.quantization):  # only the experts are MXFP4; the rest is stored as floats
        floats = checkpoint_float_bits(config)
        return "mxfp4", floats, floats, 32
    q = config.quantization
    if is_published(q):  # attention and experts in the publisher's format; embeddings as stored floats
        stored, group = planner_settings(q, "config.json")
        return stored, stored, checkpoint_float_bits(config), group
    if q.get("quant_method") == "gguf":  # a GGUF file's widths, as its header says (gguf/checkpoint.py)
        return q["experts"], q["attention"], q["embeddings"], q["group_size"]
    spec = QuantSpec.from_config(q, "config.json")
    return spec.settings["experts"], spec.settings["attention"], spec.settings["embeddings"], spec.group_size


def checkpoint_float_bits(config: ModelConfig) -> str:
    """The setting name of an unquantized checkpoint's dtype ('bf16', 'fp16' or 'fp32')."""
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[config.torch_dtype]


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass(frozen=True)
class Plan:
    config: ModelConfig
    profile: Profile
    experts_bits: str
    attention_bits: str
    embeddings_bits: str
    bits_from_checkpoint: bool  # the checkpoint is already quantized: its bits override the profile's
    group_size: int
    attention_bytes: int        # all layers' attention projections (q, k, v, o; MLA's low-rank pairs)
    embedding_bytes: int        # input embeddings + lm_head (once when tied)
    norm_router_bytes: int      # RMSNorm weights and routers, 16-bit
    kv_tokens: int              # positions the KV cache holds
    kv_bytes: int               # the KV cache and the recurrent state of linear-attention layers (one sequence)
    bytes_per_expert: int
    slots_per_layer: int        # device slots per layer (0 on the CPU: experts are used where they lie)
    ram_budget: int             # resolved: "auto" measured at planning time
    experts_in_ram: int         # expert copies in host RAM (pinned on a GPU): whole layers
    experts_on_disk: int        # expert copies memory-mapped from disk files: whole layers
    hit_rate: float             # share of needed experts found without a transfer
    hit_rate_estimated: bool
    bytes_per_token: int        # expert bytes moved per decoded token at that hit rate
    notes: tuple[str, ...] = ()
    dense_mlp_bytes: int = 0    # dense MLP layers and shared experts: on the device, at attention bits
    mapped: bool = False        # a CPU run computing from the file's mapping: weights are file pages
    disk_rate: float | None = None  # measured read rate of the source file, bytes/s (mapped plans)
    state_bytes: int = 0        # of kv_bytes: the Gated DeltaNet layers' recurrent state (fp32) and conv inputs

    @property
    def anonymous_bytes(self) -> int:
        """A mapped CPU run's own memory: KV cache, reserve (activations, per-layer state), expert cache."""
        return self.kv_bytes + self.profile.reserve + self.cache_bytes

    @property
    def cache_bytes(self) -> int:
        """The RAM expert cache of a mapped run that streams experts from its file (slots × expert)."""
        return self.slots_per_layer * self.config.num_moe_layers * self.bytes_per_expert if self.mapped else 0

    @property
    def file_page_bytes(self) -> int:
        """A mapped run's weights kept resident as file pages: shared weights and the experts in RAM."""
        return self.shared_bytes + self.experts_in_ram * self.bytes_per_expert if self.mapped else 0

    @property
    def shared_bytes(self) -> int:
        return self.attention_bytes + self.embedding_bytes + self.norm_router_bytes + self.dense_mlp_bytes

    @property
    def slot_bytes(self) -> int:
        return self.slots_per_layer * self.config.num_moe_layers * self.bytes_per_expert

    @property
    def on_gpu(self) -> bool:
        return self.profile.device == "cuda"

    @property
    def fixed_bytes(self) -> int:
        """What the compute device holds before any expert: shared weights, KV cache, reserve."""
        return self.shared_bytes + self.kv_bytes + self.profile.reserve

    @property
    def vram_bytes(self) -> int:
        return self.fixed_bytes + self.slot_bytes if self.on_gpu else 0

    @property
    def ram_bytes(self) -> int:
        if self.mapped:
            return self.anonymous_bytes + self.file_page_bytes
        experts = self.experts_in_ram * self.bytes_per_expert
        return experts if self.on_gpu else self.fixed_bytes + experts

    @property
    def transfer(self) -> str:
        return "host → GPU" if self.on_gpu else "disk → RAM"

    @property
    def seconds_per_token(self) -> float | None:
        """Disk time each token's reads take at the measured rate (mapped plans that read)."""
        return self.bytes_per_token / self.disk_rate if self.disk_rate and self.bytes_per_token else None

    def rows(self) -> list[tuple[str, str]]:
        c, p = self.config, self.profile
        n_experts = c.num_moe_layers * c.num_experts
        bits_from = "from the checkpoint" if self.bits_from_checkpoint else "from the profile"
        rows = [
            ("model", f"{c.model_type}: {c.num_layers} layers × {c.num_experts} experts, top-{c.top_k}"),
            ("parameters", f"{fmt_count(c.total_params)} total, {fmt_count(c.active_params)} active per token"),
            ("profile", f"{p.name} ({p.device}, {p.source})"),
            ("bits", f"experts {self.experts_bits}, attention {self.attention_bits}, "
                     f"embeddings {self.embeddings_bits} ({bits_from})"),
            ("shared weights", fmt_bytes(self.shared_bytes)),
            ("KV cache", f"{fmt_bytes(self.kv_bytes)} ({self.kv_tokens} tokens" + (
                f"; {fmt_bytes(self.state_bytes)} of it the linear-attention layers' recurrent state)"
                if self.state_bytes else ")")),
            ("reserve", fmt_bytes(p.reserve)),
            ("one expert", f"{fmt_bytes(self.bytes_per_expert)} ({c.params_per_expert:,} params)"),
        ]
        if self.on_gpu:
            rows += [("slots per layer", f"{self.slots_per_layer} of {c.num_experts} ({fmt_bytes(self.slot_bytes)})"),
                     ("VRAM planned", f"{fmt_bytes(self.vram_bytes)} of {fmt_bytes(p.vram_budget)}")]
        if self.mapped:
            read = (f"{fmt_bytes(self.bytes_per_token)} at {fmt_bytes(self.disk_rate)}/s measured: "
                    f"{self.seconds_per_token:.3f} s" if self.seconds_per_token is not None
                    else fmt_bytes(self.bytes_per_token))
            return rows + [
                ("weights", f"mapped from the file: {fmt_bytes(self.file_page_bytes)} of file pages kept resident "
                            "(reclaimable, not anonymous)"),
                ("experts in RAM (mapped)", f"{self.experts_in_ram} of {n_experts}"),
                ("experts read from the file", f"{self.experts_on_disk} of {n_experts} through a RAM expert cache "
                                               f"of {self.slots_per_layer} per layer ({fmt_bytes(self.cache_bytes)})"),
                ("anonymous memory", f"{fmt_bytes(self.anonymous_bytes)}: KV cache, reserve, expert cache"),
                ("RAM planned", f"{fmt_bytes(self.ram_bytes)} of {fmt_bytes(self.ram_budget)}"),
                ("hit rate", f"{self.hit_rate:.1%} ({'estimated' if self.hit_rate_estimated else 'given'})"),
                ("read from disk per token", read),
                ("prefetch", f"{p.prefetch} layer(s) ahead"),
            ]
        rows += [
            ("experts in RAM", f"{self.experts_in_ram} of {n_experts} "
                               f"({fmt_bytes(self.experts_in_ram * self.bytes_per_expert)})"),
            ("experts on disk", f"{self.experts_on_disk} ({fmt_bytes(self.experts_on_disk * self.bytes_per_expert)})"),
            ("RAM planned", f"{fmt_bytes(self.ram_bytes)} of {fmt_bytes(self.ram_budget)} ({p.offload} offload)"),
            ("hit rate", f"{self.hit_rate:.1%} ({'estimated' if self.hit_rate_estimated else 'given'})"),
            (f"{self.transfer} per token", fmt_bytes(self.bytes_per_token)),
            ("prefetch", f"{p.prefetch} layer(s) ahead"),
        ]
        return rows

    def explain(self) -> str:
        c, p = self.config, self.profile
        n_experts = c.num_moe_layers * c.num_experts
        bits = (f"the checkpoint is already quantized, so its bits override the profile's: experts "
                f"{self.experts_bits}, attention {self.attention_bits}" if self.bits_from_checkpoint
                else f"experts at {self.experts_bits}, attention at {self.attention_bits}, embeddings at "
                     f"{self.embeddings_bits}")
        where = f"on the GPU within {_gb(p.vram_budget)}" if self.on_gpu else \
            f"on the CPU within a RAM budget of {_gb(self.ram_budget)}"
        s = [f"{c.model_type} ({fmt_count(c.total_params)} parameters, {fmt_count(c.active_params)} "
             f"active per token) under profile {p.name} runs {where}; {bits}.",
             f"The shared weights (attention, embeddings, norms and routers"
             f"{', dense MLPs and shared experts' if self.dense_mlp_bytes else ''}) take {_gb(self.shared_bytes)}, "
             f"the KV cache for {self.kv_tokens} tokens {_gb(self.kv_bytes)} and the reserve "
             f"{_gb(p.reserve)}."]
        if self.on_gpu:
            layer = c.num_moe_layers * self.bytes_per_expert
            if self.slots_per_layer == c.num_experts:
                s.append(f"Every expert fits on the GPU ({_gb(self.slot_bytes)}), so nothing is offloaded.")
            else:
                s.append(f"One expert is {fmt_bytes(self.bytes_per_expert)}, so a slot in each of the "
                         f"{c.num_moe_layers} MoE layers costs {_gb(layer)}: the rest of the budget holds "
                         f"{self.slots_per_layer} slots per layer of {c.num_experts} experts, "
                         f"{_gb(self.vram_bytes)} of VRAM in all.")
        if self.mapped:
            s.append(f"The weights are computed where they lie in the file: {_gb(self.file_page_bytes)} of them stay "
                     "mapped and resident as file pages the kernel may reclaim, not anonymous memory; the "
                     f"anonymous memory is the KV cache, the reserve and the expert cache, {_gb(self.anonymous_bytes)}.")
            if self.experts_on_disk:
                rate = (f", {self.seconds_per_token:.3f} s at the {_gb(self.disk_rate)}/s measured on the file"
                        if self.seconds_per_token is not None else " (read rate not measured)")
                s.append(f"The experts do not all fit, so each layer keeps {self.slots_per_layer} of {c.num_experts} "
                         f"in a RAM cache and reads the others from the file by expert: at an estimated hit rate of "
                         f"{self.hit_rate:.1%} a token reads {_gb(self.bytes_per_token)}{rate}.")
            s.extend(self.notes)
            return " ".join(s)
        if self.experts_in_ram or self.experts_on_disk:
            layers_in_ram = self.experts_in_ram // c.num_experts
            tiers = ("offload = 'disk' puts every layer in memory-mapped files" if not self.experts_in_ram else
                     f"all layers fit in RAM under its {_gb(self.ram_budget)} budget" if not self.experts_on_disk else
                     f"{layers_in_ram} of {c.num_moe_layers} MoE layers ({self.experts_in_ram} experts) fit in RAM under "
                     f"its {_gb(self.ram_budget)} budget, the other {self.experts_on_disk} experts are memory-mapped "
                     "from disk")
            s.append(f"The {n_experts} experts' copies take {_gb(n_experts * self.bytes_per_expert)}: {tiers}.")
        if self.bytes_per_token:
            why = (f"{self.slots_per_layer} slots of {c.num_experts} experts under uniform routing; real "
                   "routing reuses experts across tokens, so measured rates run higher" if self.on_gpu
                   else "the share of layers held in RAM")
            rate = f"an estimated hit rate of {self.hit_rate:.1%} ({why})" if self.hit_rate_estimated \
                else f"a hit rate of {self.hit_rate:.1%}"
            s.append(f"At {rate} each token moves {c.num_moe_layers} MoE layers × top-{c.top_k} × "
                     f"{1 - self.hit_rate:.1%} misses × {fmt_bytes(self.bytes_per_expert)} = "
                     f"{_gb(self.bytes_per_token)} {self.transfer}"
                     + (f"; prefetching {p.prefetch} layer(s) ahead overlaps part of that with compute but "
                        "does not shrink it." if p.prefetch and self.on_gpu else "."))
        s.extend(self.notes)
        return " ".join(s)


def plan(config: ModelConfig, profile: Profile, *, hit_rate: float | None = None,
         ram_available: int | None = None, mapped: bool = False, disk_rate: float | None = None) -> Plan:
    """The memory plan for `config` under `profile`; OffloadMoeError when the budget cannot work.

    `hit_rate` is the share of needed experts already where they are used (default: estimated as
    slots/num_experts on a GPU, the share held in RAM on the CPU). `ram_available` is the host RAM
    that `ram_budget = "auto"` takes `AUTO_RAM_FRACTION` of (default: MemAvailable now). `mapped`:
    a CPU run computing from the file's mapping (see the module docstring), `disk_rate` its file's
    measured read rate.
    """
    if hit_rate is not None and not (isinstance(hit_rate, (int, float)) and 0 <= hit_rate <= 1):
        raise OffloadMoeError(f"hit rate {hit_rate!r}: expected a number from 0 to 1")
    try:
        mapped = mapped and profile.device == "cpu"
        result = _plan(config, profile, hit_rate, ram_available, mapped)
        if mapped:
            result = _mapped(result, hit_rate, disk_rate)
        return result
    except _Impossible as e:
        fixes = _fixes(config, profile, ram_available)
        raise OffloadMoeError(f"{e}; {fixes}") from None


class _Impossible(Exception):
    """The budget cannot hold the model; `plan` appends what would fit."""


def _plan(config: ModelConfig, profile: Profile, hit_rate: float | None, ram_available: int | None,
          mapped: bool = False) -> Plan:
    c, p = config, profile
    notes = []
    if c.quantization:
        experts_bits, attention_bits, embeddings_bits, group = _checkpoint_bits(c)
    else:
        experts_bits, attention_bits, embeddings_bits, group = \
            p.experts_bits, p.attention_bits, p.embeddings_bits, GROUP_SIZE

    H, I, L, E = c.hidden_size, c.intermediate_size, c.num_moe_layers, c.num_experts  # L: layers with experts
    ggml = (c.quantization or {}).get("ggml_types") or {}  # a GGUF file: kinds sized by their block type

    bits_of = {"experts": experts_bits, "attention": attention_bits, "embeddings": embeddings_bits}

    def sized(out: int, in_: int, kind: str) -> int:
        """One [out, in] weight of a kind: its GGUF block type's own bytes, else the packed formula."""
        if ggml.get(kind) in GGML_TYPE_NAMES:
            bs, ts = GGML_QUANT_SIZES[GGML_TYPE_NAMES[ggml[kind]]]
            return out * -(-in_ // bs) * ts
        return weight_bytes(out, in_, bits_of[kind], group)

    # every layer's token mixer; vectors (norms, biases, sinks; a DeltaNet's convolution and decay) stay 16-bit
    shapes = [s for i in range(c.num_layers) for s in mixer_shapes(c, c.family, i).values()]
    attention = sum(sized(*s, "attention") for s in shapes if len(s) == 2)
    embeddings = (1 if c.tie_word_embeddings else 2) * sized(c.vocab_size, H, "embeddings")
    norm_router = 2 * (c.norm_params + sum(math.prod(s) for s in shapes if len(s) != 2)
                       + L * c.router_params_per_layer)
    mlp = (len(c.dense_layers) * _mlp_bytes(H, c.dense_intermediate_size, attention_bits, group)
           + L * _mlp_bytes(H, c.shared_expert_size, attention_bits, group) + 2 * L * H * (c.family.shared_expert_gate and c.shared_expert_size > 0))
    per_expert = (2 * sized(I, H, "experts") + sized(H, I, "experts")
                  + 2 * (2 * I + H) * c.family.expert_bias)  # 16-bit biases (gpt-oss)

    kv_tokens = p.context_length
    if kv_tokens > c.max_position_embeddings:
        kv_tokens = c.max_position_embeddings
        notes.append(f"The profile's context_length {p.context_length} exceeds the model's "
                     f"{c.max_position_embeddings} positions, so the KV cache is sized for {kv_tokens}.")
    state = c.recurrent_state_bytes(2)  # one sequence's Gated DeltaNet state, whatever its length
    kv = kv_tokens * c.kv_cache_bytes_per_token(2) + state
    fixed = attention + embeddings + norm_router + mlp + kv + p.reserve
    ram_budget = p.ram_budget if p.ram_budget is not None else \
        int(AUTO_RAM_FRACTION * (available_ram() if ram_available is None else ram_available))
    ram_name = f"ram_budget {_gb(ram_budget)}" + (" (auto)" if p.ram_budget is None else "")
    layer_bytes = E * per_expert  # the host tier's unit: one layer's experts

    if p.device == "cuda":
        slots = _slots(c, p, fixed, per_expert, attention + embeddings + norm_router + mlp, kv)
        if slots < c.top_k:
            notes.append(f"Fewer slots per layer ({slots}) than experts per token ({c.top_k}): every token "
                         f"misses at least {c.top_k - slots} expert(s) in every layer, so the cache thrashes.")
        host_layers = 0 if slots == E else L  # everything resident: no host copies to keep
        ram_free = ram_budget
    else:
        slots, host_layers = 0, L
        if fixed > ram_budget:
            raise _Impossible(f"{p.source}: {ram_name} is {_gb(fixed - ram_budget)} too small for the shared "
                              f"weights, KV cache and reserve ({_gb(fixed)})")
        ram_free = ram_budget - fixed

    ram_layers = 0
    if host_layers and p.offload == "ram" and not mapped:  # mapped: the file is the tier (`_mapped`)
        if ram_free < layer_bytes or (p.device == "cuda" and ram_free < planned_bytes(E, per_expert)):
            raise _Impossible(f"{p.source}: {ram_name} is {_gb(layer_bytes - ram_free)} too small to hold one "
                              f"layer's {E} experts at {experts_bits} ({_gb(layer_bytes)}) with offload = 'ram'"
                              + (f" after the shared weights, KV cache and reserve ({_gb(fixed)})"
                                 if p.device == "cpu" else ""))
        ram_layers = min(host_layers, ram_free // layer_bytes)
        if p.device == "cuda":  # pinned: count the bytes really pinned (experts/pinned.py), not the data
            while ram_layers and planned_bytes(ram_layers * E, per_expert) > ram_free:
                ram_layers -= 1

    estimated = hit_rate is None
    if estimated:
        hit_rate = slots / E if p.device == "cuda" else ram_layers / L
    moved = round(L * c.top_k * (1 - hit_rate) * per_expert)
    return Plan(config=c, profile=p, experts_bits=experts_bits, attention_bits=attention_bits,
                embeddings_bits=embeddings_bits, bits_from_checkpoint=bool(c.quantization), group_size=group,
                attention_bytes=attention, embedding_bytes=embeddings, norm_router_bytes=norm_router,
                kv_tokens=kv_tokens, kv_bytes=kv, state_bytes=state, bytes_per_expert=per_expert, slots_per_layer=slots,
                ram_budget=ram_budget, experts_in_ram=ram_layers * E, experts_on_disk=(host_layers - ram_layers) * E,
                hit_rate=float(hit_rate), hit_rate_estimated=estimated,
                bytes_per_token=moved, notes=tuple(notes), dense_mlp_bytes=mlp)


# Layers ahead whose guessed experts a run streaming them from its file reads on the I/O thread
# (BENCHMARKS.md, "read-ahead of the file tier": 2 halved the stall per token against 0, every read used).
FILE_PREFETCH = 2


def _mapped(p: Plan, hit_rate: float | None, disk_rate: float | None) -> Plan:
    """A CPU plan redone for a run computing from the file's mapping: every expert mapped when the
    weights fit beside the anonymous memory (and offload is not "disk"), else a RAM expert cache of
    as many slots per layer as fit (at least top_k; a profile's cache_slots wins) before the file."""
    c, prof = p.config, p.profile
    L, E = c.num_moe_layers, c.num_experts
    anonymous = p.kv_bytes + prof.reserve
    pages = p.ram_budget - anonymous - p.shared_bytes    # room for experts, as pages or as cache
    if prof.offload != "disk" and prof.cache_slots is None and pages >= L * E * p.bytes_per_expert:
        slots, in_ram = 0, L * E
    else:
        slots = prof.cache_slots if prof.cache_slots is not None else             max(c.top_k, min(E, pages // max(1, L * p.bytes_per_expert)))
        slots, in_ram = min(slots, E), 0
    estimated = hit_rate is None
    rate = (1.0 if not slots else slots / E) if estimated else hit_rate
    moved = 0 if not slots else round(L * c.top_k * (1 - rate) * p.bytes_per_expert)
    if slots:  # reads of the file wait on the disk on the I/O thread, not on the cores compute runs on
        prof = replace(prof, prefetch=max(prof.prefetch, FILE_PREFETCH))
    return replace(p, profile=prof, mapped=True, disk_rate=disk_rate, slots_per_layer=slots, experts_in_ram=in_ram,
                   experts_on_disk=L * E - in_ram, hit_rate=float(rate), hit_rate_estimated=estimated,
                   bytes_per_token=moved)


def _mlp_bytes(hidden: int, inner: int, bits: str, group: int) -> int:
    """A dense SwiGLU MLP (0 when inner is 0): gate and up [inner, hidden], down [hidden, inner]."""
    return 2 * weight_bytes(inner, hidden, bits, group) + weight_bytes(hidden, inner, bits, group) if inner else 0


def _slots(c: ModelConfig, p: Profile, fixed: int, per_expert: int, shared: int, kv: int) -> int:
    """Slots per layer under the rule in the module docstring, or _Impossible."""
    L, E = c.num_moe_layers, c.num_experts
    fit = max(0, min(E, (p.vram_budget - fixed) // (L * per_expert)))
    slots = fit if p.cache_slots is None else min(p.cache_slots, E)
    if slots > fit or slots < 1:
        need = fixed + max(slots, 1) * L * per_expert
        what = f"cache_slots = {slots}" if p.cache_slots is not None else "1 slot per layer"
        hint = f" ({fit} slots per layer fit)" if p.cache_slots is not None and fit else ""
        raise _Impossible(f"{p.source}: vram_budget {_gb(p.vram_budget)} is {_gb(need - p.vram_budget)} too "
                          f"small{hint}: shared weights {_gb(shared)} + KV cache {_gb(kv)} + reserve "
                          f"{_gb(p.reserve)} + {what} at {fmt_bytes(per_expert)} per expert = {_gb(need)}")
    return slots


def _fixes(config: ModelConfig, profile: Profile, ram_available: int | None) -> str:
    """What would fit instead, each candidate checked by planning it: a smaller expert bit width
    (the largest that fits), offload = 'disk', or the smallest larger bundled profile."""
    def fits(p: Profile) -> bool:
        try:
            _plan(config, p, None, ram_available)
            return True
        except (_Impossible, OffloadMoeError):
            return False

    found = []
    if not config.quantization:
        smaller = sorted((b for b, n in BIT_WIDTHS.items() if n < BIT_WIDTHS[profile.experts_bits]),
                         key=lambda b: -BIT_WIDTHS[b])
        bits = next((b for b in smaller if fits(replace(profile, experts_bits=b))), None)
        found.append(f"experts at {bits} would fit" if bits else "no smaller expert bit width fits")
    if profile.offload == "ram" and fits(replace(profile, offload="disk")):
        found.append("offload = 'disk' would fit")
    if profile.device == "cuda":
        larger = sorted((b for b in bundled_profiles() if b.device == "cuda" and b.vram_budget > profile.vram_budget),
                        key=lambda b: b.vram_budget)
        bigger = next((b for b in larger if fits(b)), None)
        found.append(f"profile {bigger.name} ({_gb(bigger.vram_budget)}) would fit" if bigger
                     else "no larger bundled profile fits")
    return "; ".join(found)


def auto_profile(config=None, *, vram: int | None = None, ram: int | None = None) -> Profile:
    """The largest bundled GPU profile whose budget fits the free VRAM, `cpu` without a GPU.

    With a `ModelConfig`, a profile also has to yield a plan (`planner.plan`) for that model with
    `ram` bytes of available host RAM, so a host too small for its offload setting falls back to
    the next profile. `vram` and `ram` default to what the machine has free now.
    """
    vram = free_vram() if vram is None else vram
    bundled = bundled_profiles()
    gpu = [p for p in bundled if p.device == "cuda" and p.vram_budget <= vram]
    for p in sorted(gpu, key=lambda p: p.vram_budget, reverse=True):
        if config is None:
            return p
        try:
            plan(config, p, ram_available=ram)
            return p
        except OffloadMoeError:
            continue
    return next(p for p in bundled if p.device == "cpu")


__all__ = ["Plan", "plan", "auto_profile", "weight_bytes", "GROUP_SIZE", "AUTO_RAM_FRACTION"]
