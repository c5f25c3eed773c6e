"""What a checkpoint directory says about itself, checked before any of it is believed.

`index_weight_map` reads `model.safetensors.index.json`: UTF-8 JSON whose `weight_map` maps tensor
names to shard names that are plain file names in the checkpoint directory (no `/`, no `..`, not
absolute), so nothing outside the directory is ever opened. `check_layers_present` compares the
layer and expert counts of `config.json` with the tensors the headers list, before anything sized
from the config is built: a `num_hidden_layers` of 10**9 is one line, not an allocation spree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..base.errors import OffloadMoeError
from ..base.user_files import regular_file

LAYER = re.compile(r"model\.layers\.(\d+)\.")
EXPERT = re.compile(r"\.experts\.(\d+)\.")


def plain_file_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and Path(name).name == name)


def index_weight_map(index: Path) -> dict[str, str]:
    regular_file(index, "shard index")
    try:
        raw = json.loads(index.read_bytes().decode("utf-8"))
    except OSError as e:
        raise OffloadMoeError(f"{index}: cannot read the shard index ({e.strerror})") from None
    except (ValueError, RecursionError):
        raise OffloadMoeError(f"{index}: not UTF-8 JSON (expected an object with a 'weight_map')") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise OffloadMoeError(f"{index}: expected JSON with a 'weight_map' object of tensor name -> shard file")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise OffloadMoeError(f"{index}: weight_map[{tensor!r}] = {shard!r}, expected a shard file name")
        if not plain_file_name(shard):
            raise OffloadMoeError(f"{index}: weight_map[{tensor!r}] = {shard!r}, expected a plain file name "
                                  "inside the checkpoint directory")
    return weight_map


def check_layers_present(config, tensors: dict, path: Path) -> None:
    """config.json's layer and expert counts against the tensor names in the shard headers."""
    layers, experts = set(), set()
    for name in tensors:
        m = LAYER.match(name)
        if m:
            layers.add(int(m.group(1)))
            e = EXPERT.search(name)
            if e:
                experts.add(int(e.group(1)))
    source = path / "config.json"
    have = max(layers) + 1 if layers else 0
    if config.num_layers > have:
        raise OffloadMoeError(f"{source}: num_hidden_layers = {config.num_layers}, but the checkpoint's tensors "
                              f"have {have} layers" + (f" (model.layers.0..{have - 1})" if have else ""))
    if experts and config.num_experts > max(experts) + 1:
        raise OffloadMoeError(f"{source}: {config.num_experts} experts per layer, but the checkpoint's tensors "
                              f"have {max(experts) + 1} (experts.0..{max(experts)})")
