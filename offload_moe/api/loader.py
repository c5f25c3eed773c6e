"""`load()`: from a checkpoint directory (or the bundled demo) to a ready `Model`.

The order is the architecture's: open the checkpoint lazily → read the dense weights onto the
compute device → give the experts to a provider → build the transformer around both.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoints import families as arch
from .model import Model
from ..placement.budget import check_context, check_host_ram, check_kv_cache
from ..checkpoints.checkpoint import Checkpoint
from ..experts.cpu_kernels import resident_cpu_form
from .sources import open_checkpoint, open_tokenizer
from ..base.threads import set_threads
from ..experts.cpu_tier import SplitByLayer, cpu_layers, hybrid_tier
from ..base.errors import OffloadMoeError
from ..experts.cache import ExpertCache, Hybrid
from ..experts.costs import CostModel
from ..experts.layout import ExpertLayout
from ..experts.policy import POLICIES
from ..experts.resident import ResidentExperts
from ..experts.source import SourceStore, source_fields
from ..experts.store import HostStore
from ..model.expert_interface import Activation, ExpertWeights
from ..generation.defaults import GenerationDefaults
from ..checkpoints.hub import resolve as resolve_reference
from ..model.transformer import build_transformer
from .settings import ModelSettings
from ..placement.options import Placement, from_profile
from ..placement.profiles import Profile
from ..base.runtime import Progress, SizeError, available_ram, demo_dir, place, resolve_device, resolve_dtype, size_in_bytes
from ..kernels.cpu_bf16 import kernel_name as bf16_kernel_name
from ..kernels import native
from ..kernels.cpu_forms import kernel_name
from ..kernels.groupwise import QuantizedWeight
from ..kernels.nf4 import NF4Weight

DEFAULT_CONTEXT = 4096


def model_name(checkpoint_name: str) -> str:
    """Checkpoint tensor name -> the transformer's parameter name."""
    return arch.param_name(checkpoint_name)


def load(path: "str | Path | Checkpoint | None" = None, placement: Placement | None = None, *,
         device: str = "auto", dtype=None, profile: "str | Path | Profile | None" = "auto",
         requantize: str | None = None, threads: int | str | None = "auto",
         progress: Progress | None = None) -> Model:
    """Load a checkpoint directory or .gguf file of a supported MoE family (`config.SUPPORTED_MODEL_TYPES`),
    or a Hugging Face repo id ("org/name", "org/name@revision": from the cache, else downloaded; see `hub`);
    None: the bundled demo model; an already opened `Checkpoint` or `SyntheticCheckpoint` is used as it is).

    profile: a VRAM profile name ("12gb"), a .toml path, a `Profile`, "auto" (measure free VRAM and
    RAM and pick) or None. The planner turns it into a `Placement` (slots per layer, prefetch depth,
    host tier, RAM budget, context length); the fields `placement` sets (not None) replace the plan's,
    and with profile=None they are the whole placement (the defaults for the rest: `options.DEFAULTS`).
    The checkpoint's own bits are used; quantize first (`offload-moe quantize`) to use fewer.

    The `Placement` fields:
    cache_slots: "all" keeps every expert resident on the device; an int (or one int per MoE layer)
    runs the offloading engine with that many device slots per layer, the other experts in the host
    tier (`offload` "ram" or "disk", `ram_budget` bytes or "20GB", `offload_dir`), prefetching
    `prefetch` layers ahead, evicting by `policy` ("lru"; "none" reuses nothing, a baseline).

    On a CPU device a GGUF file is computed where it lies (every weight a view of its mapping, see
    gguf/checkpoint.py); there `cache_slots` is a RAM expert cache in front of the file itself, which
    is the host tier whatever `offload` says (misses are preads of the expert's bytes, prefetched on
    an I/O thread; nothing is written under `offload_dir`; `settings.offload == "file"`).

    cpu_experts: which experts the CPU computes where they sit in host RAM (see `experts/cpu_tier.py`).
    "auto" (default): on a CPU device with resident experts, "all"; elsewhere "none". "none": always
    copy. "hybrid": each miss is either copied or computed on the CPU, whichever the cost model
    (`cpu_costs`, else the one saved for this machine, else measured at load) says finishes first.
    "all": every expert on the CPU (quantized ones through the CPU kernels). An int N: the first N
    MoE layers' experts on the CPU, the others as `cache_slots` says.

    nf4_experts: quantize float experts to NF4 at load (bitsandbytes' layout; computed through
    bitsandbytes on CUDA when it is installed, by a plain torch path otherwise).

    force_context: allow a context_length beyond the model's max_position_embeddings (the model's
    `settings.warning` then says so); without it that is an error.

    requantize: for a GGUF file, the width ("int4", ...) that tensor types with no exact packed form
    (IQ*, TQ*, ...) are requantized to; None refuses such a file with one line.

    threads: torch's CPU threads for this process, as the CLI's --threads: "auto" (default) takes the
    cores other work leaves free (`threads.default_threads`: on a busy machine more threads than free
    cores decode several times slower), an int sets them; None leaves torch's setting alone."""
    if placement is not None and not isinstance(placement, Placement):
        raise TypeError(f"placement = {placement!r}, expected an offload_moe.Placement")
    given = placement or Placement()
    if threads is not None:
        set_threads(threads)
    if path is None:
        path = demo_dir()
    if not hasattr(path, "expert"):  # a directory, a .gguf file, or a Hugging Face repo id (downloaded when not cached)
        path = resolve_reference(path, progress=progress)
    ckpt = path if hasattr(path, "expert") else open_checkpoint(path, requantize)
    cfg = ckpt.config
    device = resolve_device(device)
    mappable = device.type == "cpu" and getattr(ckpt, "in_place", False) and not given.nf4_experts
    if dtype is None and mappable and cfg.torch_dtype == "float16":
        # a GGUF file computed where it lies: its weights keep the file's types whatever the compute
        # dtype, and our CPU kernels take fp32 or bf16 activations, so float16 (torch's slowest CPU
        # dtype, converted around every kernel call) would only cost time: fp32, as llama.cpp computes
        dtype = "float32"
    dtype = resolve_dtype(dtype, cfg.torch_dtype)
    opts = from_profile(profile, cfg, device, dtype, mapped=mappable).override(**given.given()).filled()
    cache_slots, prefetch, offload, ram_budget = opts.cache_slots, opts.prefetch, opts.offload, opts.ram_budget
    offload_dir, policy, record_trace, nf4_experts = opts.offload_dir, opts.policy, opts.record_trace, opts.nf4_experts
    context = opts.context_length or min(cfg.max_position_embeddings, DEFAULT_CONTEXT)
    if not isinstance(context, int) or context < 2:
        raise OffloadMoeError(f"context_length = {context!r}, expected an integer >= 2")
    context_warning = check_context(cfg, context, opts.force_context)
    check_kv_cache(cfg, context, device, dtype)  # before any weight is read
    tokenizer = open_tokenizer(ckpt)  # a GGUF file carries its own; a bad one is refused before the weights
    report = progress or (lambda what, done, total: None)
    # The first n_cpu MoE layers' experts stay in RAM in CPU form; the engine below numbers the
    # others from 0 (SplitByLayer translates).
    mode, n_cpu = cpu_layers(opts.cpu_experts, len(cfg.moe_layers), device, offloaded=cache_slots not in (None, "all"))

    # A CPU run computes from the file where it lies when the checkpoint can say where (GGUF): every
    # weight a view of the mapping, the same form in every tier (`GGUFCheckpoint.expert_in_place`).
    # The offloading engine's slots hold one layout for every layer: a file whose expert types differ
    # across layers is repacked to one form for it instead.
    in_place = mappable and (cache_slots in (None, "all") or ckpt.uniform_experts)
    if in_place:  # q/k rows in the file's order: the model rotates the pairs that order makes
        cfg = replace(cfg, rope_pairs=getattr(ckpt, "rope_pairs", "half"))
    # Experts as views of the mapping: a CPU run computing where the file lies, or a CUDA run whose
    # file stores the experts in the compute dtype (its host tier and slots are filled from the mapped
    # bytes; quantized files are converted to the packed forms the device kernels take).
    expert_views = in_place or (device.type == "cuda" and not nf4_experts
                                and getattr(ckpt, "experts_stored_as", lambda d: False)(dtype))
    shapes = ckpt.expected_shapes()
    if in_place:
        read = lambda name, shape: ckpt.get_weight(name, shape, in_place=True)  # noqa: E731
    else:
        read = getattr(ckpt, "get_weight", lambda name, shape: ckpt.get(name))
    dense = {}
    for i, (name, shape) in enumerate(shapes.items()):
        # sigmoid routing's selection bias stays fp32, as transformers keeps it: a bf16 bias would change choices
        kept = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        dense[model_name(name)] = place(read(name, shape), device, kept)
        report("dense weights", i + 1, len(shapes))

    # The expert engine numbers the MoE layers 0, 1, ... (dense layers have no experts).
    moe_layers = cfg.moe_layers
    total = len(moe_layers) * cfg.num_experts

    if nf4_experts and cfg.quantization:
        how = (f"its tensor types are {', '.join(ckpt.dtypes())}; an F32, F16 or BF16 GGUF is a float one"
               if cfg.quantization.get("quant_method") == "gguf" else "its quantization_config says how")
        raise OffloadMoeError(f"{ckpt.path}: nf4_experts needs a float checkpoint; this one is already "
                              f"quantized ({how})")

    def load_expert(layer: int, e: int, to=device) -> ExpertWeights:
        if expert_views:  # views: nothing read, converted or copied (a float type other than dtype aside)
            return ExpertWeights(**{k: place(v, to, dtype) for k, v in ckpt.expert_in_place(moe_layers[layer], e).items()})
        w = {k: place(v, to, dtype) for k, v in ckpt.expert(moe_layers[layer], e).items()}
        if nf4_experts:
            w = {k: NF4Weight.quantize(v) if k in ("w1", "w3", "w2") else v for k, v in w.items()}
        report("experts", layer * cfg.num_experts + e + 1, total)
        return ExpertWeights(**w)

    settings = {"profile": opts.profile, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "context_length": context}
    if context_warning:
        settings["warning"] = context_warning

    def on_cpu(layer: int, e: int) -> ExpertWeights:
        return resident_cpu_form(load_expert(layer, e, to="cpu"))

    settings.update(cpu_experts=mode, cpu_layers=n_cpu)
    if in_place:
        settings.update(weights="mapped")
    act = Activation(cfg.swiglu_limit, cfg.swiglu_alpha)  # how every expert computes (gpt-oss clamps)
    if n_cpu == len(moe_layers):
        experts = ResidentExperts(on_cpu, n_cpu, cfg.num_experts, act, lazy=in_place)
        settings.update(experts="cpu")
    elif cache_slots is None or cache_slots == "all":
        experts = ResidentExperts(lambda layer, e: on_cpu(layer, e) if layer < n_cpu else load_expert(layer, e),
                                  len(moe_layers), cfg.num_experts, act, lazy=in_place)
        settings.update(experts="resident")
    else:
        slots = _slots_per_layer(cache_slots, len(moe_layers), cfg.num_experts)[n_cpu:]
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
            raise OffloadMoeError(f"prefetch = {prefetch!r}, expected a depth >= 0 (layers ahead)")
        offloaded = len(moe_layers) - n_cpu
        layout = ExpertLayout(load_expert(n_cpu, 0, to="cpu"))
        if offload not in ("ram", "disk"):
            raise OffloadMoeError(f"offload = {offload!r}, expected 'ram' or 'disk'")
        if (in_place or expert_views and offload == "disk") and \
                source_fields(layout, ckpt.expert_ranges(moe_layers[n_cpu], 0)):
            # the file is the tier: each miss a pread of the expert's ranges into a slot (CPU: the slots
            # are the RAM expert cache, anonymous memory) or into a pinned staging buffer on its way to
            # a device slot (CUDA); no copy at load, nothing under offload_dir
            if device.type == "cpu":
                check_host_ram(f"the RAM expert cache ({sum(slots)} slots of {layout.nbytes:,} bytes)",
                               sum(slots) * layout.nbytes)
            store = SourceStore(layout, lambda layer: ckpt.expert_ranges(moe_layers[n_cpu + layer], 0),
                                offloaded, cfg.num_experts)
        else:
            store = HostStore(layout, offloaded, cfg.num_experts, offload=offload,
                              ram_budget=_bytes("ram_budget", ram_budget), offload_dir=offload_dir,
                              pin=device.type == "cuda", check_ram=check_host_ram)
            for layer in range(offloaded):
                staging = store.staging(layer)
                for e in range(cfg.num_experts):
                    layout.write(staging[e], load_expert(n_cpu + layer, e, to="cpu"))
                store.commit_layer(layer)
            store.finish()
        if policy not in POLICIES:
            raise OffloadMoeError(f"policy = {policy!r}, expected one of {', '.join(POLICIES)}")
        tier, costs = None, None
        if mode == "hybrid":
            tier, costs = hybrid_tier(store, device=device, dtype=dtype, hidden=cfg.hidden_size, costs=opts.cpu_costs,
                                      max_extra_bytes=available_ram() - 4 * 2**30)
            settings.update(hybrid_layers=len(tier.layers) if tier else 0,
                            cpu_costs=costs.source if costs else None,
                            cpu_extra_bytes=tier.extra_bytes if tier else 0)
        experts = ExpertCache(store, device=device, slots=slots, prefetch=prefetch, record_trace=record_trace,
                              policy=lambda layer: POLICIES[policy](), activation=act,
                              hybrid=Hybrid(tier, costs) if tier is not None or costs is not None else None)
        settings.update(experts="offloaded", cache_slots=slots, prefetch=prefetch, policy=policy,
                        ram_layers=store.ram_layers, disk_layers=offloaded - store.ram_layers,
                        offload_dir=str(store.disk_dir) if store.disk_dir else None)
        if isinstance(store, SourceStore):
            settings.update(offload="file")
            if device.type == "cpu":  # the slots are the RAM expert cache (on CUDA: device memory)
                settings.update(expert_cache_bytes=sum(slots) * layout.nbytes)
        if n_cpu:
            experts = SplitByLayer(n_cpu, ResidentExperts(on_cpu, n_cpu, cfg.num_experts, act, lazy=in_place), experts)

    transformer = build_transformer(cfg, dense, experts, device=device, dtype=dtype, max_seq_len=context)
    generation = GenerationDefaults.load(ckpt.path if ckpt.path.is_dir() else None)
    settings["sampling"] = generation.describe()
    if (device.type == "cpu" or n_cpu or mode == "hybrid") and (
            cfg.quantization or any(isinstance(v, QuantizedWeight) for v in dense.values())):
        # a publisher's format computes in its own kernel (quant/published_mv.c), ours in qmv
        settings["cpu_kernel"] = (f"published ({native.status('published')})" if getattr(ckpt, "published", None)
                                  else kernel_name())
    elif device.type == "cpu" and dtype == torch.bfloat16:
        settings["cpu_kernel"] = bf16_kernel_name()
    return Model(transformer, experts, tokenizer, ckpt.path, ModelSettings(**settings),
                 placement=opts, generation=generation)


def _slots_per_layer(cache_slots, num_layers: int, num_experts: int) -> list[int]:
    values = [cache_slots] * num_layers if isinstance(cache_slots, int) else list(cache_slots)
    if (len(values) != num_layers
            or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts for k in values)):
        raise OffloadMoeError(f"cache_slots = {cache_slots!r}, expected 'all', an integer in 1..{num_experts}, "
                              f"or a list of {num_layers} such integers (one per layer)")
    return values


def _bytes(key: str, value) -> int | None:
    """None, a byte count, or a string such as "20GB" / "512MiB" (`runtime.size_in_bytes`)."""
    if value is None:
        return None
    try:
        n = size_in_bytes(value)
    except SizeError:
        n = 0
    if n > 0:
        return n
    shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:20]}... ({len(repr(value))} characters)"
    raise OffloadMoeError(f"{key} = {shown}, expected a positive size below 2**63 bytes such as 20GB or 512MiB")
