"""`tune`: measure what this machine can do, try a few engine settings on the real model, keep the best.

Two parts. `measure_machine` times the three things an offloaded expert costs: the host → device
copy of one expert (pinned RAM → GPU; on the CPU a RAM → RAM copy of the same size), a disk read
(a temporary file dropped from the page cache with `posix_fadvise(DONTNEED)` where the filesystem
allows it), and one expert's SwiGLU at batch 1 per bit width (bf16 weights, and int8/int4/int3/int2
through `qlinear`, on the device, at the model's expert shape). Then `tune` loads the model under a
few settings (slots per layer, prefetch depth, RAM or disk tier), decodes a fixed number of tokens
greedily from a fixed prompt under each, and measures decode tokens/s and the expert hit rate.
`write_profile` saves the fastest setting (ties: fewer slots) as a profile TOML, the measurements
in its comment header, where `load(profile="tuned")` finds it.

The default settings are a coordinate search, so a run stays short: slots per layer first (top_k,
2·top_k and all that fit), then prefetch depth 0/1/2 at the best slots, then the disk tier at the
best of those. When the best holds every expert in a slot, nothing is copied while decoding and
prefetch or tier cannot change its speed, so those two stages explore from the best setting with
fewer slots instead (where they matter); the fastest row overall is still the one chosen. Every setting is time-boxed (decoding stops at its deadline; tokens/s counts what
was decoded) and the whole workload has a budget, after which remaining settings are skipped.
Decode statistics exclude the prompt: expert counters are read after the first token, when the
prefill is done, and again at the end.

The link and compute timings are `experts/costs.py`'s (`measure_link`, `measure_throughput`), so
the figures tune reports are the ones the hybrid CPU/GPU engine's cost model uses; `cost_model`
turns them into that model (per width: the slot form on the device, and the CPU form the hybrid
computes from), which the CLI saves with `costs.save_costs` so `load()` need not measure.

Nothing here prints; progress goes through a `(what, done, total)` callback.
"""

from __future__ import annotations

import gc
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from .errors import OffloadMoeError

Progress = Callable[[str, int, int], None]  # (what, done, total)

EXPERT_BITS = ("bf16", "int8", "int4", "int3", "int2")
FLOAT_WIDTHS = ("bf16", "fp16", "fp32")
DISK_TEST_BYTES = 256 * 10**6       # the temporary file the disk read is timed on
PROMPT_TEXT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in "
               "Mainz combined movable metal type, oil-based ink and a screw press")
TIERS = ("ram", "disk")
_CHUNK = 16 * 2**20
_IN_MEMORY_FS = {"tmpfs", "ramfs", "devtmpfs"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------
# measuring the machine
# ---------------------------------------------------------------------------------------------

def measure_link_bandwidth(device: torch.device | str, nbytes: int, *, repeats: int = 5) -> float:
    """Bytes/s of copying one `nbytes` buffer (one expert) from host RAM into a buffer on `device`,
    as a miss does: from pinned RAM on CUDA, a RAM → RAM memcpy on the CPU. The timing is
    `experts.costs.measure_link` (the fastest of `repeats` copies after a warm-up)."""
    from .experts.costs import measure_link

    device = torch.device(device)
    if nbytes < 1:
        raise ValueError(f"nbytes = {nbytes}: expected a positive buffer size")
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    source.fill_(7)  # touch every page before timing
    target = torch.zeros(nbytes, dtype=torch.uint8, device=device)  # one slot, as a miss fills
    return measure_link(source, target, repeats=repeats)


def filesystem_type(path: str | Path) -> str:
    """The type of the filesystem holding `path` ('ext4', 'tmpfs', ...), from /proc/self/mounts;
    'unknown' where that is not readable."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])  # \040: space
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def measure_disk_read(nbytes: int = DISK_TEST_BYTES, directory: str | Path | None = None) -> dict:
    """Sequential read bandwidth of a fresh `nbytes` file in `directory` (default: the temp dir).

    The file is written, flushed to disk and dropped from the page cache with
    posix_fadvise(DONTNEED) before it is read back, so the read comes from the device where the
    filesystem allows it. Returns {"bytes_per_second", "bytes", "cold", "filesystem", "directory"};
    "cold" is False when the page cache could not be dropped (no fadvise, or an in-memory
    filesystem such as tmpfs), so the figure is RAM speed."""
    if nbytes < 2**20:
        raise OffloadMoeError(f"disk test size {nbytes:,} bytes: expected at least 1MiB")
    directory = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
    except OSError as e:
        raise OffloadMoeError(f"{directory}: cannot use it for the disk test ({e.strerror})") from None
    nbytes = int(min(nbytes, free // 4))
    if nbytes < 2**20:
        raise OffloadMoeError(f"{directory}: only {free / 1e6:.1f} MB free, too little for the disk test")
    pattern = os.urandom(min(_CHUNK, nbytes))
    fd, name = tempfile.mkstemp(prefix=".offload-moe-disktest-", dir=directory)
    cold = hasattr(os, "posix_fadvise")
    try:
        try:
            left = nbytes
            while left:
                left -= os.write(fd, pattern[:min(left, len(pattern))])
            os.fsync(fd)  # dirty pages cannot be dropped
        except OSError as e:
            raise OffloadMoeError(f"{directory}: cannot write the disk test file ({e.strerror})") from None
        if cold:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                cold = False
        os.close(fd)
        fd = -1
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        t0 = time.perf_counter()
        got = 0
        with open(name, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                got += n
        seconds = max(time.perf_counter() - t0, 1e-9)
    finally:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(name)
        except OSError:
            pass
    fs = filesystem_type(directory)
    return {"bytes_per_second": got / seconds, "bytes": got, "cold": cold and fs not in _IN_MEMORY_FS,
            "filesystem": fs, "directory": str(directory)}


def pick_group_size(hidden: int, intermediate: int, preferred: int = 64) -> int:
    """`preferred` when it divides both dimensions, else the largest power of two up to 128 that
    does, else their gcd (the groupwise format needs groups that tile every row)."""
    if hidden % preferred == 0 and intermediate % preferred == 0:
        return preferred
    g = math.gcd(hidden, intermediate)
    for size in (128, 64, 32, 16, 8, 4, 2):
        if g % size == 0:
            return size
    return g


def random_expert(hidden: int, intermediate: int, bits: str, device: torch.device | str, *,
                  dtype: torch.dtype = torch.bfloat16, group_size: int = 64):
    """An `ExpertWeights` of the given shape and width with arbitrary (finite, small) values: what
    a timing needs, without paying for quantization. Ints are packed groupwise `QuantizedWeight`s."""
    from .experts.weights import ExpertWeights
    from .quant.format import INT_SETTINGS
    from .quant.groupwise import QuantizedWeight
    from .quant.pack import packed_cols

    device = torch.device(device)
    shapes = {"w1": (intermediate, hidden), "w3": (intermediate, hidden), "w2": (hidden, intermediate)}
    if bits in INT_SETTINGS:
        b = INT_SETTINGS[bits]
        mats = {}
        for name, (out, in_) in shapes.items():
            packed = torch.randint(0, 256, (out, packed_cols(in_, b)), dtype=torch.uint8, device=device)
            groups = (out, in_ // group_size)
            scales = torch.full(groups, 0.01, dtype=torch.float16, device=device)
            zeros = torch.full(groups, float(2 ** (b - 1)), dtype=torch.float16, device=device)
            mats[name] = QuantizedWeight(packed, scales, zeros, b, group_size, (out, in_))
        return ExpertWeights(**mats)
    from .quant.format import FLOAT_SETTINGS
    if bits not in FLOAT_SETTINGS:
        raise ValueError(f"bit width {bits!r}: expected one of {', '.join((*INT_SETTINGS, *FLOAT_SETTINGS))}")
    float_dtype = getattr(torch, FLOAT_SETTINGS[bits])
    return ExpertWeights(**{name: (torch.randn(shape, device=device) * 0.02).to(float_dtype)
                            for name, shape in shapes.items()})


def measure_expert_throughput(device: torch.device | str, hidden: int, intermediate: int, bits: str, *,
                              dtype: torch.dtype = torch.bfloat16, group_size: int | None = None,
                              cpu_form: bool = False, tokens: int = 8, repeats: int = 3):
    """`experts.costs.Throughput` of one expert of this shape and width: `expert_forward` at 1 and
    `tokens` tokens of `dtype` activations (float widths: their own dtype), timed by
    `experts.costs.measure_throughput`.

    cpu_form=False: the weights on `device` as an expert slot holds them, so ints go through
    `qlinear` (the fused kernel on CUDA where available, dequantize + F.linear elsewhere).
    cpu_form=True: on the CPU in the form the hybrid's CPU tier computes from (`cpu.kernels`:
    torch's int4 CPU kernel where the shape allows it)."""
    return _throughput(device, hidden, intermediate, bits, dtype=dtype, group_size=group_size, cpu_form=cpu_form,
                       tokens=tokens, repeats=repeats)[0]


def _throughput(device, hidden, intermediate, bits, *, dtype, group_size, cpu_form, tokens, repeats):
    """(Throughput, weight bytes one forward reads)."""
    from .cpu.kernels import weight_nbytes
    from .experts.costs import measure_throughput

    from .quant.format import FLOAT_SETTINGS

    if bits in FLOAT_SETTINGS:  # float weights compute in their own dtype, as the model does
        dtype = getattr(torch, FLOAT_SETTINGS[bits])
    group = group_size or pick_group_size(hidden, intermediate)
    if cpu_form:
        from .cpu.kernels import cpu_form as to_cpu_form
        w = to_cpu_form(random_expert(hidden, intermediate, bits, "cpu", dtype=dtype, group_size=group))
    else:
        w = random_expert(hidden, intermediate, bits, device, dtype=dtype, group_size=group)
    throughput = measure_throughput(w, hidden, tokens=tokens, repeats=repeats, dtype=dtype)
    nbytes = weight_nbytes(w)
    del w
    return throughput, nbytes


def measure_expert_compute(device: torch.device | str, hidden: int, intermediate: int, bits: str, *,
                           dtype: torch.dtype = torch.bfloat16, group_size: int | None = None,
                           repeats: int = 3) -> float:
    """Seconds for one expert's SwiGLU on one token at `bits` on `device`, weights as a slot holds
    them (see `measure_expert_throughput`)."""
    t, nbytes = _throughput(device, hidden, intermediate, bits, dtype=dtype, group_size=group_size,
                            cpu_form=False, tokens=1, repeats=repeats)
    return t.seconds(nbytes, 1)


def measure_machine(device: torch.device | str, expert_shape: tuple[int, int], *, expert_bytes: int | None = None,
                    bits: Iterable[str] = EXPERT_BITS, dtype: torch.dtype = torch.bfloat16,
                    group_size: int | None = None, disk_bytes: int = DISK_TEST_BYTES,
                    disk_dir: str | Path | None = None, repeats: int = 3, cpu_forms: bool = True,
                    progress: Progress | None = None) -> dict:
    """Link bandwidth, disk read bandwidth and per-width expert compute for an expert of
    `expert_shape` = (hidden, intermediate). `expert_bytes` is the size one miss copies (default:
    the expert at bf16). Every figure is a positive finite number.

    Keys: link_bytes_per_second, disk_read_bytes_per_second (+ disk_cold: whether the page cache
    was dropped), expert_seconds {width: seconds for one token on the device}, and for the cost
    model of the hybrid engine `device_throughput` and (cpu_forms) `cpu_throughput`
    {width: {"bytes_per_second", "token_factor"}} (`experts.costs.Throughput` fields)."""
    from .api import resolve_device

    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    hidden, intermediate = (int(d) for d in expert_shape)
    bits = list(bits)
    report = progress or (lambda what, done, total: None)
    total, done = 2 + len(bits) * (2 if cpu_forms else 1), 0
    group = group_size or pick_group_size(hidden, intermediate)
    nbytes = expert_bytes or 3 * hidden * intermediate * 2

    def step():
        nonlocal done
        done += 1
        report("machine", done, total)

    report("machine", 0, total)
    link = measure_link_bandwidth(device, nbytes, repeats=max(repeats, 5))
    step()
    disk = measure_disk_read(disk_bytes, disk_dir)
    step()
    compute, cpu_compute, on_device, on_cpu = {}, {}, {}, {}
    for b in bits:
        t, wbytes = _throughput(device, hidden, intermediate, b, dtype=dtype, group_size=group, cpu_form=False,
                                tokens=8, repeats=repeats)
        on_device[b] = {"bytes_per_second": t.bytes_per_second, "token_factor": t.token_factor}
        compute[b] = t.seconds(wbytes, 1)
        step()
        if cpu_forms:
            if device.type != "cuda" and b in FLOAT_WIDTHS:  # the CPU form is the slot form: same figure
                on_cpu[b], cpu_compute[b] = on_device[b], compute[b]
            else:
                t, wbytes = _throughput(device, hidden, intermediate, b, dtype=dtype, group_size=group,
                                        cpu_form=True, tokens=8, repeats=repeats)
                on_cpu[b] = {"bytes_per_second": t.bytes_per_second, "token_factor": t.token_factor}
                cpu_compute[b] = t.seconds(wbytes, 1)
            step()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "link": "pinned RAM → GPU" if device.type == "cuda" else "RAM → RAM",
        "link_bytes_per_second": link,
        "link_copy_bytes": nbytes,
        "disk_read_bytes_per_second": disk["bytes_per_second"],
        "disk_bytes": disk["bytes"],
        "disk_cold": disk["cold"],
        "disk_filesystem": disk["filesystem"],
        "disk_dir": disk["directory"],
        "expert_shape": [hidden, intermediate],
        "expert_dtype": str(dtype).removeprefix("torch."),
        "expert_group_size": group,
        "expert_seconds": compute,
        "device_throughput": on_device,
    }
    if cpu_forms:
        out["cpu_expert_seconds"] = cpu_compute
        out["cpu_throughput"] = on_cpu
    return out


def cost_model(measurements: dict, source: str = "offload-moe tune"):
    """The hybrid engine's `experts.costs.CostModel` from `measure_machine`'s figures (None when
    there are none): save it with `experts.costs.save_costs` so `load()` need not measure."""
    from .experts.costs import CostModel, Throughput

    if not measurements or "cpu_throughput" not in measurements:
        return None
    return CostModel(link_bytes_per_second=measurements["link_bytes_per_second"],
                     cpu={k: Throughput(**v) for k, v in measurements["cpu_throughput"].items()},
                     device={k: Throughput(**v) for k, v in measurements["device_throughput"].items()},
                     source=source)


# ---------------------------------------------------------------------------------------------
# the routing workload
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    slots: int           # device slots per layer
    prefetch: int        # layers ahead
    tier: str            # "ram" or "disk"

    def __str__(self):
        return f"{self.slots} slots, prefetch {self.prefetch}, {self.tier}"


@dataclass
class Row:
    slots: int
    prefetch: int
    tier: str
    tokens: int = 0                         # tokens decoded (the first, from the prompt, not counted)
    decode_seconds: float = 0.0
    decode_tokens_per_second: float = 0.0
    hit_rate: float = 0.0                   # during decode
    bytes_moved: int = 0                    # expert bytes copied into slots during decode
    stall_seconds: float = 0.0
    prefetch_accuracy: float = 0.0
    load_seconds: float = 0.0
    timed_out: bool = False                 # stopped at the setting's deadline before `tokens`
    error: str | None = None                # e.g. out of device memory; such rows are never best

    @property
    def setting(self) -> Setting:
        return Setting(self.slots, self.prefetch, self.tier)


@dataclass
class TuneResult:
    model: str
    model_summary: str
    device: str                             # "cpu", "cuda", "cuda:1"
    device_type: str                        # the profile's device: "cpu" or "cuda"
    bits: dict                              # {"experts", "attention", "embeddings"}: the checkpoint's
    vram_budget: int                        # free VRAM when tuning started (0 on the CPU)
    tokens: int
    prompt_tokens: int
    measurements: dict
    rows: list[Row]
    best: Row
    skipped: int = 0                        # settings not run: the time budget ran out
    date: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def pick_best(rows: Iterable[Row]) -> Row:
    """Highest decode tokens/s; ties go to fewer slots, then the RAM tier, then less prefetch."""
    ok = [r for r in rows if r.error is None and r.tokens > 0]
    if not ok:
        raise OffloadMoeError("tune: no setting decoded any token (every one failed or ran out of time)")
    return max(ok, key=lambda r: (r.decode_tokens_per_second, -r.slots, r.tier == "ram", -r.prefetch))


def parse_settings(text: str) -> list[Setting]:
    """'2:0:ram,4:1:disk' -> settings (SLOTS:PREFETCH:TIER, comma-separated)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+):(\d+):(ram|disk)", part)
        if m is None:
            raise OffloadMoeError(f"setting {part!r}: expected SLOTS:PREFETCH:TIER such as 4:1:ram")
        out.append(Setting(int(m.group(1)), int(m.group(2)), m.group(3)))
    return out


def _checkpoint_bits(ckpt) -> dict:
    from .planner import checkpoint_float_bits

    if ckpt.quant is not None:
        return {k: ckpt.quant.settings[k] for k in ("experts", "attention", "embeddings")}
    b = checkpoint_float_bits(ckpt.config)
    return {"experts": b, "attention": b, "embeddings": b}


def _cuda_fit(cfg, bits: dict, vram: int) -> int:
    """Slots per layer the planner fits in `vram` bytes (reserve 1 GB, a 4096-token KV cache)."""
    from .planner import plan
    from .profiles import Profile

    prof = Profile(name="tune", source="tune", device="cuda", vram_budget=vram, reserve=10**9,
                   context_length=4096, experts_bits=bits["experts"], attention_bits=bits["attention"],
                   embeddings_bits=bits["embeddings"], cache_slots=None, prefetch=1, offload="ram",
                   ram_budget=None)
    try:
        return plan(cfg, prof).slots_per_layer
    except OffloadMoeError:
        return 0


def _default_stages(cfg, fit: int, on_cuda: bool) -> list[list[Setting] | str]:
    """Stage 1: slots; 'prefetch' and 'tier' stages are filled in from the best row so far."""
    k = cfg.top_k
    slots = sorted({min(k, fit), min(2 * k, fit), fit} - {0})
    first = 1 if on_cuda else 0
    return [[Setting(s, first, "ram") for s in slots], "prefetch", "tier"]


def prompt_ids(ckpt) -> list[int]:
    """The fixed prompt: PROMPT_TEXT through the checkpoint's tokenizer, or without a tokenizer.json
    a fixed spread of 16 ids after BOS."""
    from .text import Tokenizer

    if (ckpt.path / "tokenizer.json").exists():
        return Tokenizer(ckpt.path).encode(PROMPT_TEXT)
    cfg = ckpt.config
    start = [cfg.bos_token_id] if cfg.bos_token_id is not None else []
    return start + [(17 * i + 5) % cfg.vocab_size for i in range(16)]


def _delta(after: dict, before: dict, key: str):
    return after.get(key, 0) - before.get(key, 0)


def tune(model_path: str | Path | None = None, *, device: str = "auto", tokens: int | None = None,
         settings: Iterable[Setting | tuple] | None = None, progress: Progress | None = None,
         offload_dir: str | Path | None = None, disk_bytes: int = DISK_TEST_BYTES,
         setting_seconds: float | None = None, time_budget: float | None = None,
         measure: bool = True) -> TuneResult:
    """Measure the machine, then decode `tokens` tokens (default 32 on the CPU, 64 on CUDA) under
    each setting (default: the coordinate search in the module docstring) and pick the best.

    settings: (slots, prefetch, tier) tuples or `Setting`s, run in order. setting_seconds: the
    deadline of one setting's decode (default 8 s on the CPU, 20 s on CUDA). time_budget: seconds
    for the whole run, measurements included (default 100 on the CPU, 300 on CUDA); settings left
    when it is spent are skipped (the first always runs). offload_dir: where the disk tier and the
    disk test write (default: the temp dir); everything written there is removed afterwards.
    measure=False skips `measure_machine` (the profile header then says so)."""
    from .api import DEMO_DIR, DTYPES, resolve_device
    from .checkpoint import Checkpoint
    from .loader import load
    from .planner import fmt_bytes

    started = time.perf_counter()
    report = progress or (lambda what, done, total: None)
    if model_path is None:
        if not (DEMO_DIR / "config.json").exists():
            raise OffloadMoeError(f"{DEMO_DIR}: the bundled demo model is missing from this install; "
                                  "pass a checkpoint directory (--model PATH)")
        model_path = DEMO_DIR
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    if tokens is None:
        tokens = 64 if on_cuda else 32
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise OffloadMoeError(f"tokens = {tokens!r}, expected an integer >= 2 (one prefill token, then decode)")
    if setting_seconds is not None and not setting_seconds > 0:
        raise OffloadMoeError(f"seconds per setting = {setting_seconds!r}, expected a positive number")
    if time_budget is not None and not time_budget > 0:
        raise OffloadMoeError(f"time budget = {time_budget!r}, expected a positive number of seconds")
    if measure and disk_bytes < 2**20:
        raise OffloadMoeError(f"disk test size {disk_bytes:,} bytes: expected at least 1MiB")
    setting_seconds = setting_seconds or (20.0 if on_cuda else 8.0)
    time_budget = time_budget or (300.0 if on_cuda else 100.0)
    ckpt = Checkpoint(model_path)
    cfg = ckpt.config
    bits = _checkpoint_bits(ckpt)
    # free VRAM now, in whole 10 MB: the profile's budget, so the slots chosen below fit it exactly
    vram = torch.cuda.mem_get_info(dev)[0] // 10**7 * 10**7 if on_cuda else 0
    fit = cfg.num_experts
    notes = []
    if on_cuda:
        fit = _cuda_fit(cfg, bits, vram)
        if fit < 1:
            raise OffloadMoeError(f"tune: {fmt_bytes(vram)} of free VRAM does not hold the shared weights, "
                                  "a 4096-token KV cache, 1 GB reserve and one expert slot per layer")

    from .experts.layout import ExpertLayout
    from .experts.weights import ExpertWeights
    first_moe = getattr(cfg, "moe_layers", (0,))[0]  # checkpoint layer numbering counts dense layers
    layout = ExpertLayout(ExpertWeights(**ckpt.expert(first_moe, 0)))
    base = Path(offload_dir) if offload_dir is not None else None
    if base is not None:
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OffloadMoeError(f"offload_dir {str(base)!r} cannot be created ({e.strerror})") from None

    # ---- the workload ----
    if settings is not None:
        stages: list = [[s if isinstance(s, Setting) else Setting(*s) for s in settings]]
        if not stages[0]:
            raise OffloadMoeError("settings: expected at least one (slots, prefetch, tier)")
    else:
        stages = _default_stages(cfg, fit, on_cuda)
    for s in (stages[0] if settings is not None else []):
        if not 1 <= s.slots <= cfg.num_experts or s.prefetch < 0 or s.tier not in TIERS:
            raise OffloadMoeError(f"setting {s}: expected 1..{cfg.num_experts} slots, prefetch >= 0, "
                                  "tier ram or disk")
    max_pos = cfg.max_position_embeddings
    prompt = prompt_ids(ckpt)[:max(1, max_pos // 2)]
    if len(prompt) + tokens > max_pos:
        tokens = max_pos - len(prompt)
        notes.append(f"tokens cut to {tokens}: the model has {max_pos} positions")
    if tokens < 2:
        raise OffloadMoeError(f"tune: the prompt leaves no room to decode in {max_pos} positions")
    context = min(max_pos, len(prompt) + tokens + 1)
    measurements = {}
    if measure:
        group = ckpt.quant.group_size if ckpt.quant is not None else 64
        group = pick_group_size(cfg.hidden_size, cfg.intermediate_size, group)
        widths = EXPERT_BITS + ((bits["experts"],) if bits["experts"] not in EXPERT_BITS else ())
        measurements = measure_machine(dev, (cfg.hidden_size, cfg.intermediate_size), expert_bytes=layout.nbytes,
                                       bits=widths, dtype=DTYPES[cfg.torch_dtype], group_size=group,
                                       disk_bytes=disk_bytes, disk_dir=base, progress=report)

    # on CUDA the hybrid engine (`load(cpu_experts="auto")`) takes its cost model from these figures
    costs = cost_model(measurements, source="offload-moe tune (measuring)")
    extra = {"cpu_costs": costs} if costs is not None else {}
    total = len(stages[0]) + (2 + 1 if settings is None else 0)
    rows: list[Row] = []
    deadline_all = started + time_budget  # measurements included
    skipped = 0
    oom = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", MemoryError))
    report("settings", 0, total)

    def run_one(s: Setting) -> Row:
        row = Row(s.slots, s.prefetch, s.tier)
        tier_dir = Path(tempfile.mkdtemp(prefix="offload-moe-tune-", dir=base)) if s.tier == "disk" else None
        model = None
        try:
            t0 = time.perf_counter()
            try:
                model = load(ckpt, device=dev, profile=None, cache_slots=s.slots, prefetch=s.prefetch,
                             offload=s.tier, offload_dir=tier_dir, context_length=context, **extra)
            except oom:
                row.error = "out of device memory"
                return row
            row.load_seconds = time.perf_counter() - t0
            # warm-up: first-call allocations and a cache that has seen a prompt
            model.generate(prompt, max_new_tokens=2, temperature=0, ignore_eos=True)
            model.experts.reset_stats()
            marks: dict = {}
            stop_at = min(time.perf_counter() + setting_seconds, deadline_all)

            def should_stop() -> bool:  # called after each token
                if not marks:  # the first call: the prompt is done, decode starts now
                    marks["before"] = model.experts.stats()
                marks["tokens"] = n = marks.get("tokens", 0) + 1
                report("decode", n, tokens)
                if n >= 3 and time.perf_counter() > stop_at:
                    row.timed_out = True
                    return True
                return False

            try:
                model.generate(prompt, max_new_tokens=tokens, temperature=0, ignore_eos=True,
                               should_stop=should_stop)
            except oom:
                row.error = "out of device memory"
                return row
            after = model.experts.stats()
            before = marks.get("before", {})
            timing = model.last_timing
            hits, misses = _delta(after, before, "hits"), _delta(after, before, "misses")
            issued, used = _delta(after, before, "prefetch_issued"), _delta(after, before, "prefetch_used")
            row.tokens = max(timing.new_tokens - 1, 0)
            row.decode_seconds = timing.decode_seconds
            row.decode_tokens_per_second = timing.decode_tokens_per_second
            row.hit_rate = hits / (hits + misses) if hits + misses else 0.0
            row.bytes_moved = _delta(after, before, "bytes_moved")
            row.stall_seconds = _delta(after, before, "stall_seconds")
            row.prefetch_accuracy = used / issued if issued else 0.0
            return row
        finally:
            model = None  # noqa: F841 (drop the engine's buffers before the next load)
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()
            if tier_dir is not None:
                shutil.rmtree(tier_dir, ignore_errors=True)

    def run_stage(stage: list[Setting]):
        nonlocal skipped
        for s in stage:
            if any(r.setting == s for r in rows):
                continue
            if rows and time.perf_counter() > deadline_all:  # the first setting always runs
                skipped += 1
                continue
            rows.append(run_one(s))
            report("settings", len(rows) + skipped, total)

    def explore_from() -> Row:
        """The best row so far; if it holds every expert in a slot (nothing is copied while decoding,
        so prefetch and tier cannot matter), the best with fewer slots, where they do."""
        b = pick_best(rows)
        fewer = [r for r in rows if r.slots < cfg.num_experts and r.error is None and r.tokens > 0]
        return pick_best(fewer) if b.slots == cfg.num_experts and fewer else b

    for stage in stages:
        if stage == "prefetch":
            b = explore_from()
            stage = [Setting(b.slots, d, "ram") for d in (0, 1, 2) if d != stages[0][0].prefetch]
        elif stage == "tier":
            b = explore_from()
            stage = [Setting(b.slots, b.prefetch, "disk")]
        run_stage(stage)
    report("settings", total, total)
    best = pick_best(rows)
    summary = (f"{cfg.model_type}, {cfg.num_layers} layers × {cfg.num_experts} experts, top-{cfg.top_k}, "
               f"experts {bits['experts']} ({fmt_bytes(layout.nbytes)} each)")
    return TuneResult(model=str(Path(model_path).resolve()), model_summary=summary, device=str(dev),
                      device_type=dev.type, bits=bits, vram_budget=vram, tokens=tokens,
                      prompt_tokens=len(prompt), measurements=measurements, rows=rows, best=best,
                      skipped=skipped, date=datetime.now().astimezone().isoformat(timespec="seconds"),
                      seconds=time.perf_counter() - started, notes=notes)


# ---------------------------------------------------------------------------------------------
# the profile
# ---------------------------------------------------------------------------------------------

def _rate(bps: float) -> str:
    from .planner import fmt_bytes
    return fmt_bytes(bps) + "/s"


def _dur(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def measurement_lines(m: dict) -> list[str]:
    """The measurements in words, one line each (the profile header and the CLI use them)."""
    from .planner import fmt_bytes

    if not m:
        return ["machine not measured"]
    disk_note = "page cache dropped" if m["disk_cold"] else "page cache NOT dropped: RAM speed"
    h, i = m["expert_shape"]
    compute = ", ".join(f"{b} {_dur(s)}" for b, s in m["expert_seconds"].items())
    lines = [
        f"device {m['device']} ({_one_line(m['device_name'])}, torch {m['torch']}, {m['threads']} CPU threads)",
        f"{m['link']} copy of one expert ({fmt_bytes(m['link_copy_bytes'])}): {_rate(m['link_bytes_per_second'])}",
        f"disk read ({m['disk_filesystem']}, {disk_note}): {_rate(m['disk_read_bytes_per_second'])} "
        f"over {fmt_bytes(m['disk_bytes'])}",
        f"one expert [{h} x {i}] at batch 1 (ints: {m['expert_dtype']} activations, group {m['expert_group_size']}): "
        f"{compute}",
    ]
    if m.get("cpu_expert_seconds"):
        cpu = ", ".join(f"{b} {_dur(s)}" for b, s in m["cpu_expert_seconds"].items())
        lines.append(f"the same on the CPU in the hybrid's CPU form: {cpu}")
    return lines


def profile_text(result: TuneResult, name: str) -> str:
    """The profile TOML: a comment header with the measurements, then the keys `load_profile` reads."""
    from .planner import fmt_bytes

    b = result.best
    lines = [f"# {name}: written by `offload-moe tune` on {result.date}",
             f"# model {_one_line(result.model)}",
             f"# ({_one_line(result.model_summary)})"]
    lines += [f"# {line}" for line in measurement_lines(result.measurements)]
    lines.append(f"# workload: {result.tokens} tokens decoded greedily after a {result.prompt_tokens}-token "
                 f"prompt, {len(result.rows)} settings in {result.seconds:.1f} s"
                 + (f" ({result.skipped} skipped: time budget)" if result.skipped else ""))
    lines.append("#   slots  prefetch  tier   tok/s    hit rate  moved")
    for r in result.rows:
        mark = "  <- chosen" if r is b else ""
        if r.error:
            lines.append(f"#   {r.slots:>5}  {r.prefetch:>8}  {r.tier:<5}  {r.error}")
            continue
        lines.append(f"#   {r.slots:>5}  {r.prefetch:>8}  {r.tier:<5}  {r.decode_tokens_per_second:>7.1f}  "
                     f"{r.hit_rate:>8.1%}  {fmt_bytes(r.bytes_moved)}{mark}")
    for note in result.notes:
        lines.append(f"# note: {_one_line(note)}")
    on_cuda = result.device_type == "cuda"
    lines += [
        f'device = "{result.device_type}"',
    ]
    if on_cuda:
        lines.append(f'vram_budget = "{result.vram_budget / 1e9:.2f}GB"   # free VRAM when tuned')
    lines += [
        f'reserve = "{"1GB" if on_cuda else "2GB"}"',
        "context_length = 4096",
        f"cache_slots = {b.slots}",
        f"prefetch = {b.prefetch}",
        f'offload = "{b.tier}"',
        'ram_budget = "auto"',
        "",
        "[bits]",
        f'experts = "{result.bits["experts"]}"',
        f'attention = "{result.bits["attention"]}"',
        f'embeddings = "{result.bits["embeddings"]}"',
    ]
    return "\n".join(lines) + "\n"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".toml") or name == "auto":
        raise OffloadMoeError(f"profile name {name!r}: expected letters, digits, '.', '_' or '-' without "
                              ".toml (and not 'auto'), e.g. tuned")
    return name


def profile_path(name: str, directory: str | Path | None = None) -> Path:
    from .profiles import user_dir

    return Path(directory if directory is not None else user_dir()) / f"{check_name(name)}.toml"


def write_profile(result: TuneResult, name: str = "tuned", directory: str | Path | None = None,
                  force: bool = False) -> Path:
    """Write `<directory>/<name>.toml` (default directory: the user profile directory) atomically;
    an existing file is an error unless `force`. The text is validated by `load_profile` first."""
    from .profiles import load_profile

    path = profile_path(name, directory)
    if path.exists() and not force:
        raise OffloadMoeError(f"{path} exists; pass --force to overwrite it, or choose another --name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".toml", dir=path.parent)
    except OSError as e:
        raise OffloadMoeError(f"{path.parent}: cannot write a profile there ({e.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(profile_text(result, name))
            f.flush()
            os.fsync(f.fileno())
        load_profile(Path(tmp))  # a file that would not load is never put in place
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the name appeared meanwhile: never clobbers
            except FileExistsError:
                raise OffloadMoeError(f"{path} exists; pass --force to overwrite it, or choose another "
                                      "--name") from None
            except OSError:  # no hard links on this filesystem
                if path.exists():
                    raise OffloadMoeError(f"{path} exists; pass --force to overwrite it") from None
                os.replace(tmp, path)
    except OSError as e:
        raise OffloadMoeError(f"{path}: cannot write the profile ({e.strerror})") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return path


__all__ = ["measure_machine", "measure_link_bandwidth", "measure_disk_read", "measure_expert_compute",
           "measure_expert_throughput", "cost_model", "tune", "write_profile", "profile_text", "pick_best", "parse_settings",
           "Setting", "Row", "TuneResult", "EXPERT_BITS"]
