"""`generation_config.json`: the authors' stop ids and recommended sampling, as transformers and vLLM apply them.

Read once at load. Its `eos_token_id` (an id or a list: Qwen3 stops on two, gpt-oss on three) joins
config.json's and the tokenizer's; `bos_token_id` and `pad_token_id` are kept for reference. Its
`temperature`, `top_p` and `top_k` become the defaults of every generation that does not set them
(the CLI, the API, the server), as vLLM does; `do_sample: false` means greedy, as in transformers.
What the user sets explicitly always wins.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import OffloadMoeError
from .generate import DEFAULT_SAMPLING  # the library's own defaults, for what generation_config.json leaves out

FILE = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    temperature: float = DEFAULT_SAMPLING.temperature
    top_p: float = DEFAULT_SAMPLING.top_p
    top_k: int = DEFAULT_SAMPLING.top_k
    source: str | None = None      # the file the sampling values came from; None: the library's defaults
    from_file: tuple[str, ...] = ()  # which of temperature, top_p, top_k it set

    @classmethod
    def load(cls, directory: str | Path | None) -> "GenerationDefaults":
        """The defaults a checkpoint directory's generation_config.json gives (the library's when absent)."""
        file = Path(directory) / FILE if directory is not None else None
        if file is None or not file.is_file():
            return cls()
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OffloadMoeError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise OffloadMoeError(f"{file}: expected a JSON object at the top level")
        return cls.from_dict(raw, str(file))

    @classmethod
    def from_dict(cls, raw: dict, source: str = FILE) -> "GenerationDefaults":
        def token_id(key):
            v = raw.get(key)
            if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                return v
            raise OffloadMoeError(f"{source}: {key} = {v!r}, expected a token id (an integer >= 0)")

        eos = raw.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in eos_ids):
            raise OffloadMoeError(f"{source}: eos_token_id = {eos!r}, expected a token id or a list of them")
        sampling = {}
        if raw.get("do_sample") is False:     # transformers: greedy, whatever the sampling keys say
            sampling["temperature"] = 0.0
        else:
            for key, check in (("temperature", lambda v: v >= 0), ("top_p", lambda v: 0 < v <= 1),
                               ("top_k", lambda v: v >= 0)):
                v = raw.get(key)
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not check(v):
                    raise OffloadMoeError(f"{source}: {key} = {v!r} is out of range "
                                          "(expected temperature >= 0, 0 < top_p <= 1, top_k >= 0)")
                if key == "top_k" and v != int(v):
                    raise OffloadMoeError(f"{source}: top_k = {v!r}, expected an integer")
                sampling[key] = int(v) if key == "top_k" else float(v)
        return cls(eos_token_ids=tuple(eos_ids), bos_token_id=token_id("bos_token_id"),
                   pad_token_id=token_id("pad_token_id"), source=source if sampling else None,
                   from_file=tuple(sampling), **sampling)

    def sampling(self, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None) -> tuple[float, float, int]:
        """(temperature, top_p, top_k): each value the caller gave, else this checkpoint's default."""
        return (self.temperature if temperature is None else temperature,
                self.top_p if top_p is None else top_p,
                self.top_k if top_k is None else top_k)

    def describe(self, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None) -> str:
        """For the load summary: the sampling in effect and where each value came from, e.g.
        "temperature 0.6, top-p 0.95, top-k 20 (generation_config.json)"."""
        given = {"temperature": temperature, "top-p": top_p, "top-k": top_k}
        values = dict(zip(given, self.sampling(temperature, top_p, top_k)))
        origin = {n: ("as given" if given[n] is not None else
                      Path(self.source).name if self.source and n.replace("-", "_") in self.from_file else
                      "offload-moe default") for n in given}
        if values["temperature"] == 0:  # greedy: top-p and top-k do not matter
            return f"greedy ({origin['temperature']})"
        groups: dict[str, list[str]] = {}
        for n, v in values.items():
            groups.setdefault(origin[n], []).append(f"{n} {v:g}")
        return "; ".join(f"{', '.join(names)} ({where})" for where, names in groups.items())
