"""The memory planner against a hand calculation for the published Mixtral-8x7B config.

Hand calculation (H = 4096, I = 14336, 32 layers, 32 heads, 8 KV heads, head_dim 128, 8 experts,
top-2, vocab 32000, group size 64; a quantized [out, in] weight at b bits is out·in·b/8 packed
bytes + 4·out·in/64 bytes of fp16 scales and zeros):

  one expert          3·4096·14336 = 176,160,768 params
    int4              176,160,768·4/8 + 176,160,768·4/64 = 88,080,384 + 11,010,048 = 99,090,432 B
    int3              176,160,768·3/8 + 11,010,048       = 66,060,288 + 11,010,048 = 77,070,336 B
  attention           32·(4096·4096·2 + 4096·1024·2) = 32·41,943,040 = 1,342,177,280 params
    int4              1,342,177,280·(1/2 + 4/64) = 754,974,720 B
    int8              1,342,177,280·(1 + 4/64)   = 1,426,063,360 B
  embeddings+lm_head  2·32000·4096 = 262,144,000 params, fp16: 524,288,000 B
  norms + routers     65·4096 + 32·8·4096 = 266,240 + 1,048,576 = 1,314,816 params, 16-bit: 2,629,632 B
  KV cache            2·32·8·128·2 = 131,072 B per token: 4096 -> 536,870,912 B; 8192 -> 1,073,741,824 B
  total params        1,342,177,280 + 262,144,000 + 1,314,816 + 256·176,160,768 = 46,702,792,704
  active params       1,605,636,096 + 64·176,160,768 = 12,879,925,248

12gb (12e9 budget, reserve 1e9, context 4096, attention int4, embeddings fp16):
  fixed = 754,974,720 + 524,288,000 + 2,629,632 + 536,870,912 + 1e9 = 2,818,763,264
  int4: (12e9 - 2,818,763,264) / (32·99,090,432 = 3,170,893,824) = 2.90 -> 2 slots per layer
  int3: (12e9 - 2,818,763,264) / (32·77,070,336 = 2,466,250,752) = 3.72 -> 3 slots per layer
24gb (24e9 budget, reserve 1.5e9, context 8192, attention int8, embeddings fp16):
  fixed = 1,426,063,360 + 524,288,000 + 2,629,632 + 1,073,741,824 + 1.5e9 = 4,526,722,816
  int4: (24e9 - 4,526,722,816) / 3,170,893,824 = 6.14 -> 6 slots per layer
  int3: (24e9 - 4,526,722,816) / 2,466,250,752 = 7.90 -> 7 slots per layer
Bytes per token = 32 layers · 2 experts · (1 - hit rate) · bytes per expert; estimated hit = slots/8.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from offload_moe.checkpoints.config import ModelConfig
from offload_moe.base.errors import OffloadMoeError
from offload_moe.placement.planner import plan, weight_bytes
from offload_moe.placement.profiles import bundled_profiles, load_profile

MIXTRAL = Path(__file__).parent / "data" / "mixtral-8x7b-config.json"
RAM = 64 * 10**9   # host RAM the tests pretend to have: "auto" budgets become 57.6 GB


@pytest.fixture(autouse=True)
def empty_user_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@pytest.fixture(scope="module")
def mixtral() -> ModelConfig:
    return ModelConfig.load(MIXTRAL)


def test_parameter_counts(mixtral):
    assert mixtral.params_per_expert == 176_160_768
    assert mixtral.total_params == 46_702_792_704     # 46.70 B
    assert mixtral.active_params == 12_879_925_248    # 12.88 B


def test_weight_bytes_formula():
    assert weight_bytes(14336, 4096, "int4") == 14336 * 2048 + 4 * 14336 * 64 == 33_030_144
    assert weight_bytes(4096, 14336, "int3") == 4096 * 5376 + 4 * 4096 * 224 == 25_690_112
    assert weight_bytes(10, 100, "int3") == 10 * 38 + 4 * 10 * 2   # ceil(300/8) = 38, ceil(100/64) = 2
    assert weight_bytes(10, 100, "bf16") == weight_bytes(10, 100, "fp16") == 2000


@pytest.mark.parametrize("bits", ["int2", "int3", "int4", "int8"])
def test_weight_bytes_agree_with_the_quantized_format(bits):
    quant = pytest.importorskip("offload_moe.kernels")
    for shape in [(14336, 4096), (4096, 14336), (1024, 4096)]:
        assert weight_bytes(*shape, bits) == quant.nbytes_for(shape, int(bits[3:]))


# profile, expert bits, shared bytes, KV bytes, bytes per expert, slots, bytes per token (estimated hit)
HAND = [
    ("12gb", "int4", 1_281_892_352, 536_870_912, 99_090_432, 2, 4_756_340_736),   # 64 · 0.75 · 99,090,432
    ("12gb", "int3", 1_281_892_352, 536_870_912, 77_070_336, 3, 3_082_813_440),   # 64 · 0.625 · 77,070,336
    ("24gb", "int4", 1_952_980_992, 1_073_741_824, 99_090_432, 6, 1_585_446_912),  # 64 · 0.25 · 99,090,432
    ("24gb", "int3", 1_952_980_992, 1_073_741_824, 77_070_336, 7, 616_562_688),    # 64 · 0.125 · 77,070,336
]


@pytest.mark.parametrize("name, bits, shared, kv, per_expert, slots, per_token", HAND)
def test_figures_match_the_hand_calculation(mixtral, name, bits, shared, kv, per_expert, slots, per_token):
    p = plan(mixtral, load_profile(name, experts_bits=bits, ram_budget="64GB"))
    assert (p.shared_bytes, p.kv_bytes, p.bytes_per_expert) == (shared, kv, per_expert)
    assert p.slots_per_layer == slots
    assert p.hit_rate == slots / 8 and p.hit_rate_estimated
    assert p.bytes_per_token == per_token
    assert (p.experts_in_ram, p.experts_on_disk) == (256, 0)
    assert p.vram_bytes == shared + kv + p.profile.reserve + slots * 32 * per_expert <= p.profile.vram_budget


@pytest.mark.parametrize("bits, per_token", [("int4", 3_170_893_824), ("int3", 2_466_250_752)])  # 32 · bytes/expert
def test_given_hit_rate(mixtral, bits, per_token):
    p = plan(mixtral, load_profile("12gb", experts_bits=bits), hit_rate=0.5, ram_available=RAM)
    assert p.bytes_per_token == per_token and not p.hit_rate_estimated


@pytest.mark.parametrize("profile", [p.name for p in bundled_profiles()])
@pytest.mark.parametrize("ram", [RAM, 16 * 10**9])
def test_every_bundled_profile_fits_its_budget(mixtral, profile, ram):
    p = plan(mixtral, load_profile(profile), ram_available=ram)
    assert p.vram_bytes <= p.profile.vram_budget
    assert p.ram_bytes <= p.ram_budget == int(0.9 * ram)
    assert p.experts_in_ram + p.experts_on_disk == (256 if p.slots_per_layer < 8 else 0)
    assert p.experts_in_ram % 8 == 0  # whole layers
    if p.on_gpu:
        assert p.slots_per_layer >= mixtral.top_k   # the bundled budgets are chosen to give top_k slots or more
    assert "\n" not in p.explain() and len(p.rows()) > 10


def test_cpu_plan_splits_ram_and_disk_by_layer(mixtral):
    # 27e9 RAM budget - (1,952,980,992 shared + 536,870,912 KV + 2e9 reserve) = 22,510,148,096 B for experts;
    # one layer of int4 experts is 8 · 99,090,432 = 792,723,456 B -> 28 layers in RAM (22,196,256,768 B), 4 on disk
    p = plan(mixtral, load_profile("cpu", ram_budget="27GB"))
    assert (p.slots_per_layer, p.experts_in_ram, p.experts_on_disk) == (0, 28 * 8, 4 * 8)
    assert p.hit_rate == 28 / 32
    assert p.vram_bytes == 0 and "disk → RAM" in p.explain()


def test_vram_budget_too_small_says_by_how_much_and_what_fits(mixtral):
    # 6gb with bf16 experts: 1,036,132,352 shared + 268,435,456 KV + 1e9 reserve + 32 · 352,321,536 for one
    # slot per layer = 13,578,856,960 B, 7.58 GB over 6e9. int8 would need 2,304,567,808 + 32 · 187,170,816
    # = 8.29 GB; int4 needs 2,304,567,808 + 32 · 99,090,432 = 5.48 GB: fits. The 8gb profile fits with its own bits.
    with pytest.raises(OffloadMoeError) as e:
        plan(mixtral, load_profile("6gb", experts_bits="bf16"), ram_available=RAM)
    message = str(e.value)
    assert "\n" not in message and "6gb.toml" in message and "vram_budget" in message
    assert "7.58 GB too small" in message and "experts at int4 would fit" in message and "profile 8gb" in message


def test_ram_budget_below_one_layer_with_offload_ram(mixtral):
    # one layer of int3 experts = 8 · 77,070,336 = 616,562,688 B, 0.12 GB over 5e8; int2: 440,401,920 B fits
    with pytest.raises(OffloadMoeError) as e:
        plan(mixtral, load_profile("12gb", offload="ram", ram_budget="0.5GB"))
    message = str(e.value)
    assert "12gb.toml" in message and "ram_budget 0.50 GB is 0.12 GB too small" in message
    assert "experts at int2 would fit" in message and "offload = 'disk' would fit" in message


def test_cpu_ram_too_small_for_the_shared_weights(mixtral):
    with pytest.raises(OffloadMoeError, match=r"cpu.toml: ram_budget 3.00 GB is 1.49 GB too small"):
        plan(mixtral, load_profile("cpu", ram_budget="3GB"))


def test_explicit_cache_slots(mixtral):
    assert plan(mixtral, load_profile("12gb", cache_slots=2), ram_available=RAM).slots_per_layer == 2
    with pytest.raises(OffloadMoeError, match=r"12gb.toml: vram_budget 12.00 GB is .* \(3 slots per layer fit\)"):
        plan(mixtral, load_profile("12gb", cache_slots=4), ram_available=RAM)


def test_fewer_slots_than_top_k_works_but_says_it_thrashes(mixtral):
    p = plan(mixtral, load_profile("12gb", cache_slots=1), ram_available=RAM)
    assert p.slots_per_layer == 1 and "thrashes" in p.explain()


def test_offload_disk_puts_every_layer_on_disk(mixtral):
    p = plan(mixtral, load_profile("12gb", offload="disk"), ram_available=RAM)
    assert (p.experts_in_ram, p.experts_on_disk) == (0, 256)


def test_everything_resident_moves_nothing(mixtral):
    p = plan(mixtral, load_profile("24gb", vram_budget="40GB", experts_bits="int2"), ram_available=RAM)
    assert (p.slots_per_layer, p.experts_in_ram, p.experts_on_disk, p.bytes_per_token) == (8, 0, 0, 0)


def test_a_quantized_checkpoint_overrides_the_profile_bits(mixtral):
    quant = {"quant_method": "offload_moe", "format_version": 1, "group_size": 64, "method": "hqq",
             "experts": "int4", "attention": "int4", "embeddings": "bf16"}
    raw = json.loads(MIXTRAL.read_text()) | {"quantization_config": quant}
    p = plan(ModelConfig.from_dict(raw), load_profile("12gb"), ram_available=RAM)  # the profile says int3
    assert (p.experts_bits, p.attention_bits, p.bytes_per_expert) == ("int4", "int4", 99_090_432)
    assert "already quantized" in p.explain()


def test_context_is_capped_by_the_model(mixtral):
    p = plan(replace(mixtral, max_position_embeddings=2048), load_profile("24gb"), ram_available=RAM)
    assert p.kv_tokens == 2048 and p.kv_bytes == 2048 * 131_072


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_bad_hit_rate(mixtral, rate):
    with pytest.raises(OffloadMoeError, match="hit rate"):
        plan(mixtral, load_profile("12gb"), hit_rate=rate, ram_available=RAM)


# ---- the `offload-moe plan` command ----

def test_cli_prints_the_table_and_the_explanation(capsys):
    from offload_moe.cli.main import main

    assert main(["plan", str(MIXTRAL), "--profile", "12gb", "--hit-rate", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "slots per layer" in out and "3 of 8" in out
    assert "2.47 GB host → GPU" in out   # 32 · 0.5 · 2 · 77,070,336 B at the given hit rate


def test_cli_bad_profile_is_one_line_on_stderr(capsys):
    from offload_moe.cli.main import main

    assert main(["plan", str(MIXTRAL), "--profile", "11gb"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown profile '11gb'" in err and "12gb" in err


def test_cli_run_picks_a_profile_for_this_machine(capsys, monkeypatch):
    import argparse

    from offload_moe.cli.plan import run

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert run(argparse.Namespace(path=str(MIXTRAL.parent / MIXTRAL.name), profile=None, hit_rate=None)) == 0
    assert "under profile cpu (picked for this machine)" in " ".join(capsys.readouterr().out.split())


def test_a_mapped_cpu_plan_counts_weights_as_file_pages(mixtral):
    """A CPU run computing from the file (a GGUF): weights are file pages, anonymous memory is the KV
    cache and reserve; when the experts do not fit beside them, a RAM expert cache of as many slots as
    fit (at least top-2) stands before the file, and each token reads its misses from it."""
    cpu = replace(load_profile("cpu"), experts_bits="int4", attention_bits="int4", embeddings_bits="fp16",
                  ram_budget=None)
    big = plan(mixtral, cpu, ram_available=RAM, mapped=True)              # 57.6 GB budget: all of it fits
    assert big.mapped and big.slots_per_layer == 0 and big.experts_in_ram == 256 and big.bytes_per_token == 0
    assert big.anonymous_bytes == big.kv_bytes + cpu.reserve
    assert big.file_page_bytes == big.shared_bytes + 256 * big.bytes_per_expert
    small = plan(mixtral, cpu, ram_available=20 * 10**9, mapped=True, disk_rate=2e9)  # 18 GB budget
    room = small.ram_budget - small.kv_bytes - cpu.reserve - small.shared_bytes
    assert small.slots_per_layer == max(2, room // (32 * small.bytes_per_expert)) < 8
    assert small.experts_in_ram == 0 and small.experts_on_disk == 256
    assert small.anonymous_bytes == small.kv_bytes + cpu.reserve + small.slots_per_layer * 32 * small.bytes_per_expert
    assert small.bytes_per_token == round(32 * 2 * (1 - small.slots_per_layer / 8) * small.bytes_per_expert)
    assert small.seconds_per_token == small.bytes_per_token / 2e9
    assert "read from disk per token" in dict(small.rows())
