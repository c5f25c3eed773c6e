"""`Model.settings`: what `load()` made of its `options.Placement` on this machine, as one frozen value.

The placement is what load() was asked for (e.g. `cache_slots=4`, `cpu_experts="auto"`); these are
the values it resolved (the slots of every offloaded layer, the CPU tier it chose, how many layers
of the host tier landed in RAM and on disk). `as_dict()` is the plain JSON form chat transcripts and
the CLI's model line print: the fields that apply to this placement only (an offloaded engine's
fields when experts are offloaded, the hybrid's when there is a hybrid tier, a warning when there
is one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

OFFLOADED_FIELDS = ("cache_slots", "prefetch", "policy", "ram_layers", "disk_layers", "offload_dir", "offload",
                    "expert_cache_bytes")
HYBRID_FIELDS = ("hybrid_layers", "cpu_costs", "cpu_extra_bytes")


@dataclass(frozen=True)
class ModelSettings:
    device: str                          # "cpu", "cuda:0"
    dtype: str                           # the compute dtype: "float32", "bfloat16"...
    context_length: int                  # tokens the KV cache holds
    experts: str = "resident"            # "resident" (all on the device), "cpu" (all on the CPU), "offloaded"
    profile: str | None = None           # the profile the placement was planned from
    cpu_experts: str = "none"            # the CPU tier's mode: "none", "layers" (the first cpu_layers), "hybrid"
    cpu_layers: int = 0                  # MoE layers whose experts the CPU computes from RAM
    # the offloading engine (experts == "offloaded")
    cache_slots: list[int] | None = None  # device slots of each offloaded MoE layer
    prefetch: int | None = None
    policy: str | None = None
    ram_layers: int | None = None        # offloaded layers held in RAM ...
    disk_layers: int | None = None       # ... and on disk
    offload_dir: str | None = None
    offload: str | None = None           # "file": the source file is the tier (read by expert range, no copy)
    expert_cache_bytes: int | None = None  # the slots' bytes, when they are the RAM expert cache of a CPU run
    weights: str | None = None           # "mapped": a CPU run computes from views of the file (file pages, not anonymous)
    # the hybrid CPU/GPU tier (cpu_experts == "hybrid")
    hybrid_layers: int | None = None
    cpu_costs: str | None = None         # where its cost model came from
    cpu_extra_bytes: int | None = None   # RAM its CPU-form copies take
    cpu_kernel: str | None = None        # what computes quantized (or bf16) matrices on the CPU ("qmv (AVX-512 VNNI)"...)
    sampling: str | None = None          # the sampling in effect and where it came from (generation_config.json...)
    warning: str | None = None           # something the caller should tell the user about this load

    def as_dict(self) -> dict:
        d = asdict(self)
        skip = (() if self.experts == "offloaded" else OFFLOADED_FIELDS) + \
            (() if self.hybrid_layers is not None else HYBRID_FIELDS)
        return {k: v for k, v in d.items() if k not in skip and not (k in ("warning", "sampling", "cpu_kernel", "offload", "expert_cache_bytes", "weights") and v is None)}
