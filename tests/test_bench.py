"""`offload-moe bench` end to end on the CPU, and routing traces: format, synthesis, replay."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import offload_moe
from offload_moe import OffloadMoeError
from offload_moe import Placement
from offload_moe.bench import ROW_FIELDS, BenchOptions, run_bench
from offload_moe.cli.main import main
from offload_moe.checkpoints.synthetic import SyntheticCheckpoint
from offload_moe.tools.trace import FORMAT, TraceRouter, load_trace, reuse_rate, save_trace, synthesize
from offload_moe import Placement

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "offload_moe" / "demo"
DEMO_TRACE = ROOT / "benchmarks" / "traces" / "demo-heldout.json"
TOP_LEVEL = ("format", "created", "versions", "model", "device", "vram_limit", "settings", "routing", "memcpy",
             "warmup_seconds", "compute_reference", "belady", "hit_rate_curve", "same_tokens", "rows", "notes")
ROWS = ("engine", "resident", "on_demand", "lru", "accelerate")


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: one torch thread avoids OpenMP threads waiting on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(layers: int = 2) -> SyntheticCheckpoint:
    return SyntheticCheckpoint("mixtral-8x7b", layers=layers, scale=0.05)


# ---- the CLI, end to end ----

def run_cli(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "offload_moe", "bench", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    return proc, time.perf_counter() - t0


def check_result(result: dict, *, trace_replayed: bool, device: str = "cpu", accelerate: bool = False) -> None:
    """Every field for every row, and the numbers agree with each other."""
    for key in TOP_LEVEL:
        assert key in result, key
    assert result["format"] == "offload-moe-bench/1"
    assert [r["name"] for r in result["rows"]] == list(ROWS)
    for row in result["rows"]:
        assert set(ROW_FIELDS) <= set(row), set(ROW_FIELDS) - set(row)
    rows = {r["name"]: r for r in result["rows"]}
    bpe = result["model"]["bytes_per_expert"]
    assert result["memcpy"]["peak_gbps"] > 0 and result["memcpy"]["bytes"] == bpe
    assert result["device"]["type"] == device
    assert result["vram_limit"]["applied"] is (device == "cuda" and result["vram_limit"]["requested_bytes"] is not None)
    assert result["memcpy"]["kind"] == ("pinned host->device" if device == "cuda" else "host RAM->RAM memcpy")

    if accelerate:
        r = rows["accelerate"]
        assert r["status"] == "ok", r["reason"]
        per_forward = r["settings"]["offloaded_bytes_per_forward"]
        assert r["bytes_moved"] == r["new_tokens"] * per_forward
        assert r["decode_bytes_moved"] == (r["new_tokens"] - 1) * per_forward
        assert r["peak_vram_bytes"] > 0 and r["ratio"] > 0
    else:
        assert rows["accelerate"]["status"] == "skipped" and rows["accelerate"]["reason"]
    for name in ("engine", "resident", "on_demand", "lru"):
        r = rows[name]
        assert r["status"] == "ok", (name, r["reason"])
        assert r["new_tokens"] == result["settings"]["tokens"]
        assert r["prompt_tokens"] == result["settings"]["prompt_tokens"]
        assert r["ttft_seconds"] == r["prefill_seconds"] > 0
        assert math.isclose(r["prefill_tokens_per_second"], r["prompt_tokens"] / r["prefill_seconds"])
        assert math.isclose(r["decode_tokens_per_second"], (r["new_tokens"] - 1) / r["decode_seconds"])
        assert (r["peak_vram_bytes"] > 0) if device == "cuda" else (r["peak_vram_bytes"] is None)
        assert r["peak_rss_bytes"] > 0
        assert r["tokens_match_engine"] is True and len(r["token_ids"]) == r["new_tokens"]
        assert math.isclose(r["bound_seconds"], max(r["bound_transfer_seconds"], r["bound_compute_seconds"]))
        assert math.isclose(r["bound_transfer_seconds"],
                            r["decode_bytes_moved"] / (result["memcpy"]["peak_gbps"] * 1e9))
        assert 0 < r["decode_step_min_seconds"] <= r["decode_step_median_seconds"] <= r["decode_seconds"]
        # compute time: (tokens - 1) x the fastest decode step of any run of any row
        assert math.isclose(r["bound_compute_seconds"],
                            result["compute_reference"]["step_seconds"] * (r["new_tokens"] - 1))
        assert result["compute_reference"]["step_seconds"] <= r["decode_step_min_seconds"]
        assert math.isclose(r["ratio"], r["decode_seconds"] / r["bound_seconds"])
        assert r["ratio"] >= 1.0, (name, r["ratio"])   # no row below its lower bound, however busy the machine
        # repeated runs: the row is its median run, with the spread of all runs
        runs = r["runs"]["decode_tokens_per_second"]
        assert r["repeats"] == result["settings"]["repeats"] == len(runs)
        assert r["decode_tokens_per_second"] == sorted(runs)[len(runs) // 2]
        assert r["decode_tokens_per_second_min"] == min(runs) and r["decode_tokens_per_second_max"] == max(runs)
        assert math.isclose(r["spread"], (max(runs) - min(runs)) / statistics.median(runs))
    mc = result["memcpy"]
    assert mc["rounds"] == result["settings"]["repeats"] and len(mc["trial_gbps"]) == mc["rounds"] * mc["trials"]
    assert mc["peak_gbps"] == max(mc["memcpy_peak_gbps"], mc["row_peak_gbps"] or 0) >= max(mc["trial_gbps"])
    assert result["same_tokens"] is True
    assert result["compute_reference"]["source"] == "fastest decode step of any run"
    assert rows["resident"]["bytes_moved"] == 0 and rows["resident"]["bound_transfer_seconds"] == 0

    for name in ("engine", "on_demand", "lru"):
        r = rows[name]
        assert r["bytes_per_expert"] == bpe
        uses = r["hits"] + r["misses"]
        assert math.isclose(r["hit_rate"], r["hits"] / uses)
        assert r["decode_hits"] + r["decode_misses"] <= uses
        assert math.isclose(r["achieved_gbps"], r["bytes_moved"] / r["copy_seconds"] / 1e9)
        assert 0 < r["decode_copy_seconds"] <= r["copy_seconds"]
        assert r["belady_hit_rate"] >= r["lru_hit_rate_simulated"] - 1e-12
        assert 0 < r["lru_fraction_of_belady"] <= 1 + 1e-12
    for name in ("on_demand", "lru"):  # no prefetch: every byte moved is a miss
        r = rows[name]
        assert r["prefetch_issued"] == 0
        assert r["bytes_moved"] == r["misses"] * bpe
        assert r["decode_bytes_moved"] == r["decode_misses"] * bpe
    engine = rows["engine"]
    # every miss is copied, except those the CPU computed where they sit (the hybrid, CUDA only)
    assert engine["bytes_moved"] == (engine["misses"] - engine["cpu_computed"] + engine["prefetch_issued"]) * bpe
    assert rows["on_demand"]["cpu_computed"] == rows["lru"]["cpu_computed"] == 0
    if device == "cpu":
        assert engine["cpu_computed"] == 0
    assert rows["on_demand"]["hits"] == 0 and rows["on_demand"]["hit_rate"] == 0.0
    assert rows["on_demand"]["misses"] > rows["lru"]["misses"]
    # LRU without prefetch is exactly the simulated LRU, and never beats Belady
    assert math.isclose(rows["lru"]["hit_rate"], rows["lru"]["lru_hit_rate_simulated"])
    b = result["belady"]
    assert b["belady_hit_rate"] >= b["lru_hit_rate"] and b["lru_hit_rate"] == rows["lru"]["hit_rate"]
    if trace_replayed:
        # same routes in every row: the same recorded steps, so the same Belady figure for the same slots
        assert math.isclose(engine["belady_hit_rate"], rows["lru"]["belady_hit_rate"])


def test_cli_synthetic_smoke(tmp_path):
    proc, _ = run_cli("--synthetic", "mixtral-8x7b", "--layers", "2", "--scale", "0.05", "--tokens", "8",
                            "--device", "cpu", "--threads", "1", "--repeats", "2", "--json", "out.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for label in ("engine (slots 4, prefetch 1)", "all experts resident", "on demand", "LRU cache",
                  "HF accelerate", "ratio", "Belady", "spread"):
        assert label in proc.stdout, label
    assert "note:" not in proc.stdout and "warning:" not in proc.stdout   # logs go to stderr
    assert "note: Slots per layer" in proc.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    check_result(result, trace_replayed=False)
    assert result["model"]["synthetic"] and result["model"]["num_layers"] == 2


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="the demo model is not in offload_moe/demo yet")
def test_cli_demo_smoke(tmp_path):
    args = ["--model", str(DEMO), "--tokens", "8", "--device", "cpu", "--threads", "1", "--repeats", "2",
            "--json", "out.json"]
    if DEMO_TRACE.exists():
        args += ["--trace", str(DEMO_TRACE)]
    proc, _ = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    check_result(result, trace_replayed=DEMO_TRACE.exists())
    assert result["model"]["synthetic"] is False
    assert "CUDA" in {r["name"]: r for r in result["rows"]}["accelerate"]["reason"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


@needs_cuda
def test_cli_synthetic_cuda(tmp_path):
    proc, _ = run_cli("--synthetic", "mixtral-8x7b", "--layers", "2", "--scale", "0.05", "--tokens", "8",
                      "--trace-reuse", "0.6", "--device", "cuda", "--vram-limit", "12GB", "--json", "out.json",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    check_result(result, trace_replayed=True, device="cuda")
    assert result["vram_limit"]["applied"] and 0 < result["vram_limit"]["fraction"] <= 1


@needs_cuda
@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="the demo model is not in offload_moe/demo yet")
def test_cli_demo_cuda_with_accelerate(tmp_path):
    pytest.importorskip("accelerate")
    args = ["--model", str(DEMO), "--tokens", "8", "--device", "cuda", "--json", "out.json"]
    if DEMO_TRACE.exists():
        args += ["--trace", str(DEMO_TRACE)]
    proc, _ = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_result(json.loads((tmp_path / "out.json").read_text()), trace_replayed=DEMO_TRACE.exists(),
                 device="cuda", accelerate=True)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "--synthetic", "mixtral-8x7b", "--layers", "1", "--scale", "0.05",
                 "--trace", str(tmp_path / "missing.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json: trace file not found" in err
    assert main(["bench", "--synthetic", "mixtral-8x7b", "--layers", "1", "--scale", "0.05",
                 "--cache-slots", "9"]) == 1
    assert "cache_slots = 9" in capsys.readouterr().err


def test_replayed_synthetic_trace_with_perfect_guesses():
    """In-process: a synthetic trace with reuse, prefetch guesses emulated at accuracy 1, engine only."""
    result = run_bench(tiny(), BenchOptions(tokens=6, prompt_tokens=4, trace_reuse=0.5, guess_accuracy=1.0,
                                            vram_limit="12GB", baselines=False),
                       Placement(cache_slots=3, prefetch=1), device="cpu")
    assert [r["name"] for r in result["rows"]] == ["engine"]
    engine = result["rows"][0]
    assert result["routing"]["kind"] == "synthetic" and result["routing"]["guess"] == "emulated"
    assert engine["prefetch_issued"] > 0 and engine["prefetch_accuracy"] == 1.0
    assert result["vram_limit"]["requested_bytes"] == 12 * 10**9 and not result["vram_limit"]["applied"]
    assert "not applicable" in result["vram_limit"]["note"]
    # no resident row: the compute time comes from the engine's own fastest step, and the bound still exists
    assert 0 < result["compute_reference"]["step_seconds"] <= engine["decode_step_min_seconds"]
    assert engine["ratio"] is not None and engine["ratio"] >= 1.0 and engine["bound_seconds"] > 0
    # the summary names its figures for what they are: Belady is the best *on demand* (perfect prefetch beats
    # it here), and with no LRU row the LRU figure is simulated on the engine's routing, not a row's
    from offload_moe.cli.bench import summary_lines

    assert engine["hit_rate"] > engine["belady_hit_rate"]
    line = next(x for x in summary_lines(result) if x.startswith("Belady"))
    assert "optimal" not in line and "prefetch hits can beat it" in line
    assert "LRU simulated on the engine's routing:" in line and "the LRU row" not in line


def test_trace_of_other_shape_is_refused():
    wrong = synthesize(2, 4, 2, 10, 0.5)
    with pytest.raises(OffloadMoeError, match="4 experts, top-2; the model has 8 experts"):
        run_bench(tiny(), BenchOptions(tokens=2, trace=wrong, baselines=False), device="cpu")


# ---- trace files ----

def test_trace_round_trip(tmp_path):
    trace = synthesize(3, 8, 2, 50, 0.7, seed=5)
    save_trace(trace, tmp_path / "t.json")
    raw = json.loads((tmp_path / "t.json").read_text())
    assert raw["format"] == FORMAT and len(raw["routes"]) == 50 and len(raw["routes"][0]) == 3
    back = load_trace(tmp_path / "t.json")
    assert back == trace
    assert back.layer(1) == [t[1] for t in trace.routes]


def good() -> dict:
    return {"format": FORMAT, "model": "m", "num_layers": 2, "num_experts": 4, "top_k": 2, "source": "test",
            "routes": [[[0, 1], [2, 3]], [[1, 2], [3, 0]]]}


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="other/1"), "format = 'other/1', expected 'offload-moe-trace/1'"),
    (lambda d: d.pop("routes"), "missing key 'routes'"),
    (lambda d: d.update(num_layers=0), "num_layers = 0, expected an integer >= 1"),
    (lambda d: d.update(top_k=5), "top_k = 5 exceeds num_experts = 4"),
    (lambda d: d.update(routes=[]), "routes must be a non-empty list"),
    (lambda d: d["routes"].append([[0, 1]]), r"routes\[2\] has 1 entries, expected 2 \(one per layer\)"),
    (lambda d: d["routes"][1].__setitem__(0, [1, 1]),
     r"routes\[1\]\[0\] = \[1, 1\], expected 2 distinct expert ids in 0..3"),
    (lambda d: d["routes"][0].__setitem__(1, [2, 4]), r"routes\[0\]\[1\] = \[2, 4\], expected 2 distinct"),
    (lambda d: d["routes"][0].__setitem__(1, [2]), r"routes\[0\]\[1\] = \[2\]"),
    (lambda d: d.update(model=3), "model = 3, expected a string"),
])
def test_trace_validation_names_file_and_fault(tmp_path, edit, message):
    raw = good()
    edit(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(OffloadMoeError, match=message) as e:
        load_trace(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_trace_file_errors(tmp_path):
    with pytest.raises(OffloadMoeError, match="trace file not found"):
        load_trace(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text('{"format": ')
    with pytest.raises(OffloadMoeError, match=r"broken.json: not valid JSON \(.* at line 1"):
        load_trace(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(OffloadMoeError, match="list.json: expected a JSON object, got list"):
        load_trace(tmp_path / "list.json")


# ---- synthesis ----

@pytest.mark.parametrize("reuse", [0.0, 0.3, 0.8, 1.0])
def test_synthesize_reuse_rate(reuse):
    trace = synthesize(4, 8, 2, 3000, reuse, seed=1)
    assert len(trace) == 3000 and trace.num_layers == 4
    for token in trace.routes:
        assert all(len(set(r)) == 2 and all(0 <= e < 8 for e in r) for r in token)
    # measured here independently of trace.reuse_rate: share of (t, expert) pairs used again at t+1
    for layer in range(4):
        routes = trace.layer(layer)
        again = sum(e in routes[t + 1] for t in range(len(routes) - 1) for e in routes[t])
        measured = again / (2 * (len(routes) - 1))
        assert abs(measured - reuse) < 0.02, (layer, measured)
        assert math.isclose(measured, reuse_rate(trace)[layer])
    assert synthesize(4, 8, 2, 3000, reuse, seed=1) == trace          # seeded
    if 0 < reuse < 1:
        assert synthesize(4, 8, 2, 3000, reuse, seed=2) != trace


def test_synthesize_refuses_impossible_arguments():
    with pytest.raises(OffloadMoeError, match="reuse = 1.5"):
        synthesize(1, 8, 2, 10, 1.5)
    with pytest.raises(OffloadMoeError, match="needs num_experts >= 2 \\* top_k"):
        synthesize(1, 3, 2, 10, 0.5)
    assert len(synthesize(1, 3, 2, 10, 1.0)) == 10


# ---- replay ----

def test_trace_router_replays_exactly_what_the_engine_records():
    """Model layer l replays trace layer l % 3; the prefill takes the prompt's rows at once, then one
    row per decode step. The engine records, per call, the sorted experts the layer used."""
    trace = synthesize(3, 8, 2, 40, 0.4, seed=3)
    model = offload_moe.load(tiny(layers=4), Placement(cache_slots=3, prefetch=0, record_trace=True), device="cpu")
    router = TraceRouter(trace, 4)
    router.install(model)
    prompt, new = [5, 9, 11, 40, 7, 3], 10
    model.generate(prompt, max_new_tokens=new, temperature=0, ignore_eos=True)
    recorded = model.experts.trace
    P = len(prompt)
    for layer in range(4):
        rows = trace.layer(layer % 3)
        assert len(recorded[layer]) == new                                   # prefill + new - 1 decode steps
        assert recorded[layer][0] == sorted({e for r in rows[:P] for e in r})
        for j in range(1, new):
            assert recorded[layer][j] == sorted(rows[P + j - 1])
    assert router.position == [P + new - 1] * 4 and not router.wrapped
    assert model.stats["experts"]["hits"] + model.stats["experts"]["misses"] == sum(map(len, sum(recorded, [])))


def test_trace_router_wraps_and_feeds_forced_routes():
    trace = synthesize(2, 8, 2, 5, 0.5, seed=0)
    router = TraceRouter(trace, 2)
    first = router(1, 3)
    assert first.dtype == torch.long and first.tolist() == [list(r) for r in trace.layer(1)[:3]]
    assert router(1, 4).tolist() == [list(r) for r in trace.layer(1)[3:] + trace.layer(1)[:2]]
    assert router.wrapped and router.position == [0, 7]


def test_guess_emulation_accuracy():
    trace = synthesize(2, 8, 2, 30, 0.5, seed=0)
    for accuracy, expect in ((1.0, 1.0), (0.0, 0.0)):
        router = TraceRouter(trace, 2, guess_accuracy=accuracy)
        guess = router.guess(1, 1)
        assert guess.shape == (1, 2) and len(set(guess[0].tolist())) == 2
        right = len(set(guess[0].tolist()) & set(router.peek(1)[0])) / 2
        assert right == expect
    router = TraceRouter(trace, 2, guess_accuracy=0.8, seed=1)
    true = set(router.peek(0)[0])
    kept = [len(set(router.guess(0, 1)[0].tolist()) & true) for _ in range(4000)]
    assert abs(sum(kept) / (2 * len(kept)) - 0.8) < 0.02


def test_guess_emulation_drives_the_prefetch():
    """A perfect emulated guess, given to the model as its routing strategy, makes every prefetch right;
    without the emulation (the routers guess under a replayed trace) they are not all right."""
    trace = synthesize(2, 8, 2, 30, 0.6, seed=0)
    plain = offload_moe.load(tiny(), Placement(cache_slots=3, prefetch=1), device="cpu")
    TraceRouter(trace, 2).install(plain)
    plain.generate([4, 5, 6], max_new_tokens=12, temperature=0, ignore_eos=True)
    assert plain.stats["experts"]["prefetch_accuracy"] < 1.0
    model = offload_moe.load(tiny(), Placement(cache_slots=3, prefetch=1), device="cpu")
    router = TraceRouter(trace, 2, guess_accuracy=1.0)
    router.install(model)
    assert model.transformer.routing is router
    model.generate([4, 5, 6], max_new_tokens=12, temperature=0, ignore_eos=True)
    stats = model.stats["experts"]
    assert stats["prefetch_issued"] > 0 and stats["prefetch_accuracy"] == 1.0


def test_accelerate_offload_replays_the_same_routes(tiny_checkpoint):
    """The accelerate row's generation (run here on the CPU with every weight offloaded to disk; on
    CUDA the bench offloads to RAM): forced to a trace, transformers' Mixtral generates exactly the
    tokens offload_moe generates with the same trace, and the bytes it moves are counted per forward."""
    pytest.importorskip("accelerate")
    from offload_moe.bench import hf_offload_generate
    from offload_moe.bench.hf_offload import Workload
    from offload_moe.generation.generate import Sampling, decode_tokens

    path = tiny_checkpoint[0]
    trace = synthesize(3, 8, 2, 40, 0.5, seed=1)
    prompt = [5, 9, 11, 40, 7, 3]
    out = hf_offload_generate(path, Workload(prompt, 8, trace, seed=0), dtype=torch.float32,
                              max_memory={"cpu": 30_000}, input_device=torch.device("cpu"), report=lambda *a: None)
    ours = offload_moe.load(path, device="cpu", profile=None)
    TraceRouter(trace, 3).install(ours)
    assert out["token_ids"] == list(decode_tokens(ours.transformer, prompt, 8, Sampling(temperature=0.0)))
    assert "disk" in out["device_map"].values() and out["offloaded_bytes_per_forward"] > 0
    assert out["bytes_moved"] == 8 * out["offloaded_bytes_per_forward"]
    assert out["decode_bytes_moved"] == 7 * out["offloaded_bytes_per_forward"]
    assert out["ttft_seconds"] == out["prefill_seconds"] > 0 and out["decode_seconds"] > 0


def test_plot_draws_the_hit_rate_curve_and_the_bounds(tmp_path):
    pytest.importorskip("matplotlib", reason="the optional 'plot' extra (matplotlib) is not installed")
    from offload_moe.bench.plot import plot_bench

    result = run_bench(tiny(), BenchOptions(tokens=6, prompt_tokens=4, trace_reuse=0.5, repeats=2),
                       Placement(cache_slots=3, prefetch=1), device="cpu")
    curve = result["hit_rate_curve"]
    assert curve["slots"][0] == 2 and curve["slots"][-1] == 8
    assert all(b >= lru - 1e-12 for b, lru in zip(curve["belady"], curve["lru"]))   # Belady is optimal
    assert curve["belady"] == sorted(curve["belady"])                              # more slots never hurt it
    out = plot_bench(result, tmp_path / "bench.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refusals_are_one_line(tmp_path, capsys):
    assert main(["bench", "--synthetic", "mixtral-8x7b", "--layers", "1", "--scale", "0.05",
                 "--plot", str(tmp_path / "x.jpg")]) == 1
    assert "expected a .png" in capsys.readouterr().err
    assert main(["bench", "--synthetic", "mixtral-8x7b", "--layers", "1", "--scale", "0.05", "--repeats", "0"]) == 1
    assert "--repeats 0" in capsys.readouterr().err
