"""/metrics in Prometheus' text exposition format (version 0.0.4): the same numbers as the JSON
answer, flattened. `GET /metrics?format=prometheus`, or an `Accept` header naming `text/plain` or
`application/openmetrics-text` (what a Prometheus scraper sends) gets this; anything else gets JSON.

Names: `offload_moe_` + the JSON path joined by `_` (`requests.served` -> `offload_moe_requests_served`),
every sample labelled with the served model's name; booleans are 0/1, strings and lists are left out.
"""

from __future__ import annotations

import math
import re

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BAD = re.compile(r"[^a-zA-Z0-9_]")


def wants_prometheus(query: dict, accept: str) -> bool:
    if query.get("format") is not None:
        return query["format"] == "prometheus"
    accept = accept.lower()
    return "text/plain" in accept or "openmetrics" in accept


def _samples(prefix: str, value, out: list):
    if isinstance(value, bool):
        out.append((prefix, float(value)))
    elif isinstance(value, (int, float)):
        out.append((prefix, float(value)))
    elif isinstance(value, dict):
        for key, v in value.items():
            _samples(f"{prefix}_{_BAD.sub('_', str(key))}", v, out)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(metrics: dict, model_name: str) -> str:
    """The metrics dict as Prometheus text: one gauge per numeric leaf."""
    samples: list[tuple[str, float]] = []
    _samples("offload_moe", {k: v for k, v in metrics.items() if k != "model"}, samples)
    label = f'{{model="{_label(model_name)}"}}'
    lines = []
    for name, value in samples:
        shown = "NaN" if math.isnan(value) else "+Inf" if value == math.inf else "-Inf" if value == -math.inf \
            else repr(value) if not value.is_integer() else str(int(value))
        lines += [f"# TYPE {name} gauge", f"{name}{label} {shown}"]
    return "\n".join(lines) + "\n"
