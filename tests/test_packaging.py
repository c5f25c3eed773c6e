"""The wheel ships every subpackage and the data files (a non-editable install is what users get)."""

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "offload_moe").rglob("__init__.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_installed_package_has_demo_and_profiles():
    import offload_moe
    from offload_moe.base.runtime import DEMO_DIR
    from offload_moe.placement.profiles import list_profiles

    assert (DEMO_DIR / "model.safetensors").exists() and (DEMO_DIR / "tokenizer.json").exists()
    assert {"cpu", "6gb", "8gb", "12gb", "16gb", "24gb"} <= set(list_profiles())
    assert offload_moe.__version__
