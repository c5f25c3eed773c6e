"""One saved `CostModel` per machine, in the user config directory: `tune` writes it
(`save_costs`), `load()` reads it (`saved_costs`) instead of measuring at load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .costs import CostModel

COSTS_FILE = "cpu-costs.json"


def machine_key(device: torch.device) -> str:
    """What a saved cost model must match: the device, and the CPU threads compute will use."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def costs_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "offload-moe" / COSTS_FILE


def save_costs(model: CostModel, device: torch.device, path: Path | None = None) -> Path:
    """Store `model` for this machine (merged into the file's other machines); returns the path."""
    path = path or costs_path()
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    saved[machine_key(torch.device(device))] = model.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1))
    return path


def saved_costs(device: torch.device, formats: tuple[str, str] | None = None,
                path: Path | None = None) -> CostModel | None:
    """The saved model for this machine, if there is one that knows `formats` = (cpu, device)."""
    path = path or costs_path()
    try:
        d = json.loads(path.read_text()).get(machine_key(torch.device(device)))
        model = CostModel.from_dict({**d, "source": str(path)}) if d else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if model is None or (formats and (formats[0] not in model.cpu or formats[1] not in model.device)):
        return None
    return model
