"""Experts computed on the CPU: kernels against the reference, the hybrid's per-miss choice, static modes.

On a CPU-only machine the "device" and the CPU are the same, so the hybrid is tested through the
engine with `cpu_experts="hybrid"` and a fake cost model: fp32 experts computed from the CPU tier
run the same F.linear as from a slot, so results are bitwise those of the all-resident run.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import offload_moe
from conftest import save, tiny_mixtral
from offload_moe import OffloadMoeError
from offload_moe.checkpoints.checkpoint import Checkpoint
from offload_moe.experts.cpu_kernels import cpu_form
from offload_moe.experts.cpu_tier import CpuTier, cpu_layers
from offload_moe.experts.cpu_kernels import CPU_FORMS, TOLERANCE, Int4Planes, QmvMatrix, has_cpu_kernel, reference_linear, to_int4_planes
from offload_moe.experts.cache import ExpertCache, Hybrid
from offload_moe.experts.cost_file import save_costs, saved_costs
from offload_moe.experts.cost_timing import measure_expert_costs, measure_throughput
from offload_moe.experts.costs import CostModel, Throughput
from offload_moe.experts.layout import ExpertLayout
from offload_moe.experts.store import HostStore
from offload_moe.model.expert_interface import ExpertWeights, expert_forward
from offload_moe.kernels import quantize
from offload_moe import Placement

PROMPT = [1, 17, 42, 5, 66, 23, 9]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def costs(cpu_fmt: str = "fp32", *, link: float = 1e9, cpu: float = 1e12, cpu_token_factor: float = 0.0,
          device: float = 1e12) -> CostModel:
    """A fake cost model: by default the CPU computes an expert far faster than the link copies it."""
    return CostModel(link, {cpu_fmt: Throughput(cpu, cpu_token_factor)}, {"fp32": Throughput(device)}, "fake")


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group", [((48, 64), 32), ((64, 256), 64), ((128, 512), 128), ((32, 256), 256)])
@pytest.mark.parametrize("batch", [1, 4])
def test_int4_kernel_matches_reference(bits, shape, group, batch):
    g = torch.Generator().manual_seed(bits * 1000 + shape[0] + batch)
    qw = quantize(torch.randn(shape, generator=g) * 0.02, bits, group)
    planes = to_int4_planes(qw)
    assert len(planes.planes) == (2 if bits == 8 else 1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(batch, shape[1], generator=g).to(dtype)
        y = planes.linear(x)
        assert y.dtype == dtype and y.shape == (batch, shape[0])
        assert rel_error(y, reference_linear(x, qw)) < TOLERANCE


def test_int4_kernel_keeps_leading_dimensions():
    qw = quantize(torch.randn(64, 128) * 0.02, 4, 64)
    x = torch.randn(2, 3, 128)
    assert rel_error(to_int4_planes(qw).linear(x), reference_linear(x, qw)) < TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_experts_are_plain_linear_bitwise(dtype):
    w = ExpertWeights(*(torch.randn(s).to(dtype) for s in [(48, 32), (48, 32), (32, 48)]))
    c = cpu_form(w)
    assert c.w1 is w.w1 and c.w2 is w.w2  # the host bytes themselves, no copy
    for batch in (1, 4):
        x = torch.randn(batch, 32).to(dtype)
        assert torch.equal(expert_forward(x, c), expert_forward(x, w))
        assert torch.equal(F.linear(x, c.w1), reference_linear(x, w.w1))


@pytest.mark.parametrize("bits", [4, 8])
def test_expert_in_cpu_form_matches_reference(bits):
    g = torch.Generator().manual_seed(bits)
    w = ExpertWeights(*(quantize(torch.randn(s, generator=g) * 0.05, bits, 64) for s in [(128, 64), (128, 64), (64, 128)]))
    c = cpu_form(w)
    assert all(isinstance(m, CPU_FORMS) for m in (c.w1, c.w3, c.w2))
    x = torch.randn(4, 64, generator=g)
    assert rel_error(expert_forward(x, c), expert_forward(x, w)) < TOLERANCE


def test_shapes_no_kernel_takes_keep_the_reference_form():
    small_group = quantize(torch.randn(64, 48), 4, 16)      # group 16, in % 64 != 0
    assert not has_cpu_kernel(small_group)
    w = cpu_form(ExpertWeights(small_group, small_group, small_group))
    assert w.w1 is not None and not isinstance(w.w1, CPU_FORMS)


def test_rows_torch_kernel_cannot_take_go_to_ours_where_it_is_built():
    odd_rows = quantize(torch.randn(40, 64), 4, 32)          # out % 16 != 0: not torch's int4 kernel
    w = cpu_form(ExpertWeights(odd_rows, odd_rows, odd_rows))
    assert isinstance(w.w1, QmvMatrix) == has_cpu_kernel(odd_rows)
    assert not isinstance(w.w1, Int4Planes)


# ---------------------------------------------------------------- the decision, on the engine alone


def tiny_engine(cost_model, *, slots=1, recent=2, experts=4):
    """An engine over one layer of `experts` random fp32 experts, with a CPU tier on the host bytes."""
    g = torch.Generator().manual_seed(0)
    weights = [ExpertWeights(*(torch.randn(s, generator=g) for s in [(48, 32), (48, 32), (32, 48)]))
               for _ in range(experts)]
    layout = ExpertLayout(weights[0])
    store = HostStore(layout, 1, experts)
    for e, w in enumerate(weights):
        layout.write(store.staging(0)[e], w)
    store.commit_layer(0)
    tier = CpuTier.build([0], experts, lambda layer, e: layout.view(store.ram[layer][e]))
    cache = ExpertCache(store, device=torch.device("cpu"), slots=[slots], prefetch=0,
                        hybrid=Hybrid(tier, cost_model, recent))
    return cache, tier


def placed(cache, tier, experts) -> dict[int, str]:
    """Run one step; where each expert's weights came from: "cpu" (the tier) or "slot"."""
    return {e: "cpu" if expert.weights is tier.weights(0, e) else "slot" for e, expert in cache.fetch(0, experts, 1)}


def test_cold_misses_go_to_the_cpu_and_recently_used_ones_are_copied():
    cache, tier = tiny_engine(costs(), slots=1, recent=2)
    assert placed(cache, tier, [0, 1]) == {0: "cpu", 1: "cpu"}      # both cold
    assert placed(cache, tier, [0, 2]) == {0: "slot", 2: "cpu"}     # 0 was used a step ago: copied
    assert placed(cache, tier, [0, 3]) == {0: "slot", 3: "cpu"}     # 0 now a hit
    assert placed(cache, tier, [1]) == {1: "cpu"}                   # used 3 steps ago: cold again
    s = cache.stats()
    assert (s["hits"], s["misses"], s["cpu_computed"]) == (1, 6, 5)
    assert s["bytes_moved"] == 1 * s["bytes_per_expert"]
    assert s["bytes_not_moved"] == 5 * s["bytes_per_expert"]
    assert s["est_seconds_saved"] > 0


def test_a_slow_cpu_is_never_chosen():
    cache, tier = tiny_engine(costs(cpu=1e3), slots=2)
    for step in ([0, 1], [2, 3], [1, 2]):
        assert set(placed(cache, tier, step).values()) == {"slot"}
    assert cache.stats()["cpu_computed"] == 0


def test_lanes_side_by_side_on_cuda_one_lane_on_the_cpu():
    """Two cold misses, a copy 1 s, device compute 0.1 s, CPU 1.5 s per expert. Side by side (CUDA):
    copy the first (done at 1.1 s) and compute the second on the CPU (1.5 s) instead of copying it
    too (2.1 s). One lane (CPU-only): copy + compute (1.1 s) beats the CPU (1.5 s) for both."""
    nbytes = 1000
    model = CostModel(nbytes / 1.0, {"fp32": Throughput(nbytes / 1.5)}, {"fp32": Throughput(nbytes / 0.1)})
    cache, tier = tiny_engine(model, slots=2)
    cache.layout.nbytes = tier.nbytes = nbytes  # round figures for the arithmetic above
    cache.cuda = True                           # only the plan: nothing is run on a stream
    chosen, saved = cache._choose_cpu(0, [], [0, 1], tokens=1)
    assert chosen == [1] and math.isclose(saved, 2.1 - 1.5)
    cache.cuda = False
    assert cache._choose_cpu(0, [], [0, 1], tokens=1) == ([], 0.0)


def test_many_tokens_make_copies_win():
    """Per-token CPU cost (token_factor) grows with the batch; copying an expert does not."""
    cache, _ = tiny_engine(costs(cpu=2e7, cpu_token_factor=1.0, link=1e7), slots=4)
    assert cache._choose_cpu(0, [], [0, 1], tokens=1)[0] == [0, 1]   # decode: CPU
    assert cache._choose_cpu(0, [], [0, 1], tokens=64)[0] == []      # prefill: copy


def test_tier_and_costs_go_together():
    cache, tier = tiny_engine(costs())
    with pytest.raises(ValueError, match="go together"):
        ExpertCache(cache.store, device=torch.device("cpu"), slots=[1], hybrid=Hybrid(tier, None))


# ---------------------------------------------------------------- through the model (fp32: bitwise)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0], device="cpu")
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    tokens = model.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    return ids, model.logits(ids), tokens


def equals_reference(model, reference) -> bool:
    ids, logits, tokens = reference
    out = model.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    return torch.equal(model.logits(ids), logits) and out == tokens


@pytest.mark.parametrize("cpu_experts,cache_slots", [("all", None), (1, None), (2, 2), (3, 3)])
def test_static_modes_equal_resident_bitwise(tiny_checkpoint, reference, cpu_experts, cache_slots):
    model = offload_moe.load(tiny_checkpoint[0], Placement(cpu_experts=cpu_experts, cache_slots=cache_slots),
                             device="cpu")
    assert model.settings.cpu_layers == (3 if cpu_experts == "all" else cpu_experts)
    assert equals_reference(model, reference)
    if cache_slots == 2:  # layer 2 offloaded: the engine's layer 0, with its own counters
        s = model.stats["experts"]
        assert s["cpu_layers"] == 2 and s["slots_per_layer"] == [2] and s["misses"] > 0


def test_hybrid_computes_cold_misses_on_cpu_bitwise(tiny_checkpoint, reference):
    copying = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, prefetch=0, cpu_experts="none"),
                               device="cpu")
    hybrid = offload_moe.load(tiny_checkpoint[0],
                              Placement(cache_slots=2, prefetch=0, cpu_experts="hybrid", cpu_costs=costs()),
                              device="cpu")
    assert equals_reference(copying, reference) and equals_reference(hybrid, reference)
    h, c = hybrid.stats["experts"], copying.stats["experts"]
    assert h["cpu_computed"] > 0 and c["cpu_computed"] == 0
    assert h["bytes_moved"] == (h["misses"] - h["cpu_computed"]) * h["bytes_per_expert"]
    assert h["bytes_not_moved"] == h["cpu_computed"] * h["bytes_per_expert"]
    assert h["bytes_moved"] < c["bytes_moved"]
    assert hybrid.settings.cpu_costs == "fake" and hybrid.settings.hybrid_layers == 3


def test_prefill_copies_and_decode_uses_the_cpu(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0],
                             Placement(cache_slots=2, prefetch=0, cpu_experts="hybrid", cpu_costs=costs(cpu=2e7, cpu_token_factor=1.0, link=1e7)),
                             device="cpu")
    model.generate(PROMPT, max_new_tokens=1, temperature=0)          # the prompt's 7 tokens: copies
    assert model.stats["experts"]["cpu_computed"] == 0
    model.experts.reset_stats()
    model.generate(PROMPT, max_new_tokens=12, temperature=0.9, seed=1, ignore_eos=True)
    assert model.stats["experts"]["cpu_computed"] > 0                # one token at a time: the CPU


def test_auto_on_a_cpu_machine_changes_nothing(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, cpu_experts="auto"), device="cpu")
    assert model.settings.cpu_experts == "none"
    model.generate(PROMPT, max_new_tokens=4, temperature=0)
    assert model.stats["experts"]["cpu_computed"] == 0


def test_hybrid_measures_its_costs_at_load_without_a_saved_model(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    model = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, cpu_experts="hybrid"), device="cpu")
    assert model.settings.cpu_costs == "measured at load"
    m = model.experts.costs
    assert m.link_bytes_per_second > 0 and m.cpu["fp32"].bytes_per_second > 0 and "fp32" in m.device


@pytest.mark.parametrize("value", ["some", -1, 4, True, 2.5, "hybrid"])
def test_bad_cpu_experts(tiny_checkpoint, value):
    with pytest.raises(OffloadMoeError, match="cpu_experts"):
        offload_moe.load(tiny_checkpoint[0], Placement(cpu_experts=value), device="cpu")  # "hybrid" needs slots


# ---------------------------------------------------------------- quantized experts through the model


class QuantizedExperts:
    """A checkpoint whose experts read as groupwise-quantized weights (quantized on first read)."""

    def __init__(self, path, bits: int, group_size: int = 32):
        self.checkpoint, self.bits, self.group_size = Checkpoint(path), bits, group_size
        self.quantized: dict[tuple[int, int], dict] = {}

    def __getattr__(self, name):
        return getattr(self.checkpoint, name)

    def expert(self, layer: int, e: int) -> dict:
        if (layer, e) not in self.quantized:
            self.quantized[layer, e] = {k: quantize(v.float(), self.bits, self.group_size)
                                        for k, v in self.checkpoint.expert(layer, e).items()}
        return self.quantized[layer, e]


@pytest.fixture(scope="module")
def quantizable_checkpoint(tmp_path_factory):
    """Shapes the int4 kernel takes (64 / 128 features), weights std 0.1: the std 0.2 of the shared
    tiny models makes even bf16 rounding of activations move the logits by several percent."""
    model = tiny_mixtral(hidden_size=64, intermediate_size=128)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    return save(model, tmp_path_factory.mktemp("quantizable"))


def fixed_routes(model):
    """Route token t of layer l to experts (3t + l + j) % 8: a kernel's rounding cannot flip a top-k
    choice and turn a small difference into a different token's worth of logits."""
    class Fixed:
        def forced(self, layer: int, n: int) -> torch.Tensor:
            return (torch.arange(n)[:, None] * 3 + layer + torch.arange(2)) % 8   # (n, k)

        def guess(self, layer: int, n: int) -> None:
            return None
    model.transformer.set_routing(Fixed())
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_cpu_modes_equal_resident_within_tolerance(quantizable_checkpoint, bits):
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    checkpoint = QuantizedExperts(quantizable_checkpoint, bits)
    expected = fixed_routes(offload_moe.load(checkpoint, device="cpu")).logits(ids)
    for kw in (dict(cpu_experts="all"), dict(cpu_experts="hybrid", cache_slots=2, cpu_costs=costs(f"int{bits}"))):
        model = fixed_routes(offload_moe.load(checkpoint, Placement(**kw), device="cpu"))
        assert rel_error(model.logits(ids), expected) < TOLERANCE
    assert model.stats["experts"]["cpu_computed"] > 0
    # our kernel computes 4/8-bit experts from the host tier's own bytes; torch's needs a copy
    shares = has_cpu_kernel(quantize(torch.randn(64, 64), bits, 64)) and not isinstance(
        cpu_form(ExpertWeights(*[quantize(torch.randn(64, 64), bits, 64)] * 3)).w1, Int4Planes)
    assert (model.settings.cpu_extra_bytes == 0) == shares


# ---------------------------------------------------------------- the cost model


def test_throughput_model():
    t = Throughput(bytes_per_second=1e9, token_factor=0.5)
    assert t.seconds(10**9) == 1.0 and t.seconds(10**9, tokens=3) == 2.0
    m = costs()
    assert m.cpu_seconds("int4", 100) == math.inf  # a format never measured is never chosen


def test_costs_saved_per_machine(tmp_path):
    path = tmp_path / "costs.json"
    m = costs("int4")
    save_costs(m, torch.device("cpu"), path)
    back = saved_costs(torch.device("cpu"), ("int4", "fp32"), path)
    assert back.cpu == m.cpu and back.device == m.device and back.source == str(path)
    assert saved_costs(torch.device("cpu"), ("int8", "fp32"), path) is None  # that format was not measured
    assert saved_costs(torch.device("cpu"), None, tmp_path / "missing.json") is None


def test_measure_functions_return_positive_numbers():
    w = ExpertWeights(*(torch.randn(s) for s in [(64, 32), (64, 32), (32, 64)]))
    q = cpu_form(ExpertWeights(*(quantize(torch.randn(s), 4, 32) for s in [(64, 32), (64, 32), (32, 64)])))
    for weights in (w, q):
        t = measure_throughput(weights, 32, tokens=4, repeats=1)
        assert 0 < t.bytes_per_second < math.inf and t.token_factor >= 0
    quantized = ExpertWeights(*(quantize(torch.randn(s), 8, 32) for s in [(64, 32), (64, 32), (32, 64)]))
    m = measure_expert_costs(quantized, "cpu", repeats=1)
    assert set(m.cpu) == set(m.device) == {"int8"} and m.link_bytes_per_second > 0


def test_cpu_layers_parsing():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cpu_layers("auto", 4, cpu, offloaded=True) == ("none", 0)
    assert cpu_layers("auto", 4, cpu, offloaded=False) == ("layers", 4)  # resident on a CPU: the CPU kernels
    assert cpu_layers("auto", 4, cuda, offloaded=True) == ("none", 0)     # hybrid is opt-in until measured
    assert cpu_layers("hybrid", 4, cuda, offloaded=True) == ("hybrid", 0)
    assert cpu_layers("auto", 4, cuda, offloaded=False) == ("none", 0)
    assert cpu_layers("all", 4, cuda, offloaded=False) == ("layers", 4)
    assert cpu_layers(2, 4, cuda, offloaded=True) == ("layers", 2)
    assert cpu_layers(0, 4, cuda, offloaded=True) == ("none", 0)


# ---------------------------------------------------------------- CUDA


@needs_cuda
def test_cuda_hybrid_equals_resident_within_tolerance(tiny_checkpoint):
    """CPU-computed experts run on a side stream beside the device's; fp32 GEMMs differ between
    CPU and GPU in rounding only."""
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    resident = offload_moe.load(tiny_checkpoint[0], device="cuda").logits(ids)
    auto = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, cpu_experts="auto"), device="cuda")
    assert auto.settings.cpu_experts == "none"   # "auto" copies on CUDA until the hybrid is measured there
    model = offload_moe.load(tiny_checkpoint[0],
                             Placement(cache_slots=2, prefetch=1, cpu_experts="hybrid", cpu_costs=costs()),
                             device="cuda")
    assert model.settings.cpu_experts == "hybrid"
    assert rel_error(model.logits(ids), resident) < 1e-4
    model.generate(PROMPT, max_new_tokens=16, temperature=0, ignore_eos=True)
    assert model.stats["experts"]["cpu_computed"] > 0


@needs_cuda
def test_cuda_static_modes_equal_resident_within_tolerance(tiny_checkpoint):
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    resident = offload_moe.load(tiny_checkpoint[0], device="cuda").logits(ids)
    for kw in (dict(cpu_experts="all"), dict(cpu_experts=1, cache_slots=2)):
        model = offload_moe.load(tiny_checkpoint[0], Placement(**kw), device="cuda")
        assert rel_error(model.logits(ids), resident) < 1e-4
