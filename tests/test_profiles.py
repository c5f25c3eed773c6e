"""VRAM profiles: bundled ones load, user ones are found, overrides apply, bad input fails on one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload_moe.placement import profiles
from offload_moe.checkpoints.config import ModelConfig
from offload_moe.base.errors import OffloadMoeError
from offload_moe.base import runtime
from offload_moe.placement.planner import auto_profile
from offload_moe.placement.profiles import list_profiles, load_profile
from offload_moe.base.runtime import parse_bytes

BUNDLED = ["6gb", "8gb", "12gb", "16gb", "24gb", "cpu"]
MIXTRAL = Path(__file__).parent / "data" / "mixtral-8x7b-config.json"


@pytest.fixture(autouse=True)
def empty_user_dir(tmp_path, monkeypatch):
    """Keep the developer's own ~/.config/offload-moe out of the tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "offload-moe" / "profiles"


def write(tmp_path, text: str, name: str = "mine.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD_TOP = {"device": '"cuda"', "vram_budget": '"10GB"', "reserve": '"512MiB"', "context_length": "2048",
            "cache_slots": "2", "prefetch": "1", "offload": '"disk"', "ram_budget": '"28GB"'}
GOOD_BITS = {"experts": '"int3"', "attention": '"int4"', "embeddings": '"fp16"'}


def profile_text(changes: dict[str, str | None] | None = None) -> str:
    """The GOOD profile as TOML, with `changes` applied: 'bits.experts' targets the table, None drops a key."""
    top, bits = dict(GOOD_TOP), dict(GOOD_BITS)
    for key, value in (changes or {}).items():
        table, name = (bits, key[5:]) if key.startswith("bits.") else (top, key)
        if value is None:
            table.pop(name, None)
        else:
            table[name] = value
    lines = [f"{k} = {v}" for k, v in top.items()]
    if "bits" not in top:
        lines += ["[bits]"] + [f"{k} = {v}" for k, v in bits.items()]
    return "\n".join(lines) + "\n"


GOOD = profile_text()


def test_bundled_profiles_are_listed_smallest_first():
    assert list_profiles() == BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_loads(name):
    p = load_profile(name)
    assert p.name == name and p.source.endswith(f"{name}.toml")
    assert p.device == ("cpu" if name == "cpu" else "cuda")
    assert p.vram_budget == (0 if name == "cpu" else int(name[:-2]) * 10**9)


def test_user_file_by_path():
    p = load_profile(Path(__file__).parent.parent / "profiles" / "12gb.toml")
    assert (p.name, p.vram_budget, p.experts_bits) == ("12gb", 12 * 10**9, "int3")
    assert (p.cache_slots, p.ram_budget) == (None, None)  # "auto"


def test_every_key_of_a_user_file(tmp_path):
    p = load_profile(str(write(tmp_path, GOOD)))
    assert p == profiles.Profile(
        name="mine", source=str(tmp_path / "mine.toml"), device="cuda", vram_budget=10 * 10**9,
        reserve=512 * 2**20, context_length=2048, experts_bits="int3", attention_bits="int4",
        embeddings_bits="fp16", cache_slots=2, prefetch=1, offload="disk", ram_budget=28 * 10**9)


def test_named_profiles_in_the_user_config_dir(empty_user_dir):
    empty_user_dir.mkdir(parents=True)
    (empty_user_dir / "mybox.toml").write_text(GOOD)
    (empty_user_dir / "12gb.toml").write_text(GOOD)  # a user profile shadows the bundled one
    assert "mybox" in list_profiles()
    assert load_profile("mybox").vram_budget == 10 * 10**9
    assert load_profile("12gb").source == str(empty_user_dir / "12gb.toml")


def test_overrides_replace_single_keys():
    p = load_profile("12gb", experts_bits="int4", cache_slots=2, vram_budget="10GB", ram_budget=None)
    base = load_profile("12gb")
    assert (p.experts_bits, p.cache_slots, p.vram_budget) == ("int4", 2, 10 * 10**9)
    assert (p.attention_bits, p.context_length, p.ram_budget) == (base.attention_bits, base.context_length, None)
    assert load_profile("12gb", cache_slots="auto").cache_slots is None


@pytest.mark.parametrize("value, expected", [
    ("12GB", 12_000_000_000), ("512MiB", 536_870_912), (1024, 1024), ("1.5 GB", 1_500_000_000),
    ("2GiB", 2_147_483_648), ("0", 0), ("64kb", 64_000)])
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["12G", "twelve", "-1GB", True, 1.5, ""])
def test_parse_bytes_rejects(value):
    with pytest.raises(OffloadMoeError, match="expected"):
        parse_bytes(value)


def one_line_error(call) -> str:
    with pytest.raises(OffloadMoeError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("key, value", [
    ("colour", '"blue"'),            # unknown key
    ("context_length", '"4096"'),    # wrong type
    ("prefetch", "true"),            # a bool is not a depth
    ("reserve", '"-1GB"'),           # negative
    ("vram_budget", '"5TB"'),        # absurd
    ("ram_budget", "5000000000000"),  # absurd, as a byte count
    ("offload", '"tape"'),
    ("device", '"rocm"'),
    ("cache_slots", "0"),
    ("vram_budget", "0"),            # cuda needs a budget
    ("bits.experts", '"int5"'),      # unknown bit width
    ("bits.router", '"int4"'),       # unknown [bits] key
    ("bits", '"int4"'),              # not a table
])
def test_bad_key_names_file_and_key(tmp_path, key, value):
    path = write(tmp_path, profile_text({key: value}))
    message = one_line_error(lambda: load_profile(str(path)))
    assert str(path) in message and f"'{key}'" in message


def test_missing_device_names_the_key(tmp_path):
    path = write(tmp_path, profile_text({"device": None}))
    assert "missing key 'device'" in one_line_error(lambda: load_profile(str(path)))


def test_cpu_profile_with_a_vram_budget(tmp_path):
    path = write(tmp_path, 'device = "cpu"\nvram_budget = "8GB"\n')
    message = one_line_error(lambda: load_profile(str(path)))
    assert str(path) in message and "'vram_budget'" in message


def test_malformed_toml(tmp_path):
    path = write(tmp_path, 'device = "cuda"\nvram_budget = \n')
    message = one_line_error(lambda: load_profile(str(path)))
    assert str(path) in message and "not valid TOML" in message


def test_missing_file(tmp_path):
    message = one_line_error(lambda: load_profile(str(tmp_path / "nope.toml")))
    assert str(tmp_path / "nope.toml") in message and "not found" in message


def test_unknown_name_lists_known_ones():
    message = one_line_error(lambda: load_profile("11gb"))
    assert "'11gb'" in message and "6gb, 8gb, 12gb, 16gb, 24gb, cpu" in message


def test_bad_override_names_it():
    message = one_line_error(lambda: load_profile("12gb", experts_bits="int5"))
    assert "12gb.toml" in message and "experts_bits" in message and "int5" in message
    assert "'colour'" in one_line_error(lambda: load_profile("12gb", colour="blue"))


def test_auto_profile_without_cuda_is_cpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert runtime.free_vram() == 0
    assert auto_profile().name == "cpu"
    assert auto_profile(ModelConfig.load(MIXTRAL), ram=64 * 10**9).name == "cpu"


def test_auto_profile_picks_the_largest_that_fits():
    # a 12 GiB card with 0.5 GiB taken by the driver: 12.35 GB free
    assert auto_profile(vram=12_348_030_976).name == "12gb"
    assert auto_profile(vram=5 * 10**9).name == "cpu"
    assert auto_profile(ModelConfig.load(MIXTRAL), vram=30 * 10**9, ram=16 * 10**9).name == "24gb"


def test_available_ram_is_measured():
    assert runtime.available_ram() > 0
