"""Routing traces: which experts each layer used for each token, saved, synthesized and replayed.

A trace (format ``offload-moe-trace/1``, see docs/trace-format.md) is one JSON object::

    {"format": "offload-moe-trace/1", "model": str, "num_layers": L, "num_experts": E, "top_k": k,
     "source": str, "routes": [[[e, ...k ids] for each of the L layers] for each token]}

so ``routes[t][l]`` lists the k distinct expert ids (0 <= id < E) layer l used for token t,
highest routing weight first. `load_trace` checks every field and route and fails with one line
naming the file and what is wrong; `save_trace` writes the same form back.

`synthesize` makes traces with a chosen amount of temporal locality, and `TraceRouter` replays a
trace through a model as its routing strategy (`Transformer.set_routing`), so every configuration
of a benchmark sees the same expert choices whatever its weights, and optionally emulates a
router-based prefetch guess of known accuracy, because under replay the model's own routers no
longer predict anything.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base.errors import OffloadMoeError, read_user_file

FORMAT = "offload-moe-trace/1"


@dataclass(frozen=True)
class Trace:
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    source: str
    routes: tuple[tuple[tuple[int, ...], ...], ...]   # routes[t][l] = k expert ids

    def __len__(self) -> int:
        return len(self.routes)

    def layer(self, layer: int) -> list[tuple[int, ...]]:
        """One layer's routes, token by token."""
        return [token[layer] for token in self.routes]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "model": self.model, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "top_k": self.top_k, "source": self.source,
                "routes": [[list(r) for r in token] for token in self.routes]}


# ---- reading, checking, writing ----

def validate(raw, where: str = "trace") -> Trace:
    """A parsed JSON document -> `Trace`, or OffloadMoeError naming `where` and the first fault."""
    if not isinstance(raw, dict):
        raise OffloadMoeError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise OffloadMoeError(f"{where}: format = {raw.get('format')!r}, expected {FORMAT!r}")
    for key in ("model", "num_layers", "num_experts", "top_k", "source", "routes"):
        if key not in raw:
            raise OffloadMoeError(f"{where}: missing key {key!r}")
    for key in ("model", "source"):
        if not isinstance(raw[key], str):
            raise OffloadMoeError(f"{where}: {key} = {raw[key]!r}, expected a string")
    for key in ("num_layers", "num_experts", "top_k"):
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OffloadMoeError(f"{where}: {key} = {v!r}, expected an integer >= 1")
    L, E, k = raw["num_layers"], raw["num_experts"], raw["top_k"]
    if k > E:
        raise OffloadMoeError(f"{where}: top_k = {k} exceeds num_experts = {E}")
    routes = raw["routes"]
    if not isinstance(routes, list) or not routes:
        raise OffloadMoeError(f"{where}: routes must be a non-empty list (one entry per token)")
    out = []
    for t, token in enumerate(routes):
        if not isinstance(token, list) or len(token) != L:
            got = f"{len(token)} entries" if isinstance(token, list) else repr(token)
            raise OffloadMoeError(f"{where}: routes[{t}] has {got}, expected {L} (one per layer)")
        row = []
        for l, ids in enumerate(token):
            if (not isinstance(ids, list) or len(ids) != k or len(set(ids)) != k
                    or any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < E for e in ids)):
                raise OffloadMoeError(f"{where}: routes[{t}][{l}] = {ids!r}, expected {k} distinct expert ids "
                                      f"in 0..{E - 1}")
            row.append(tuple(ids))
        out.append(tuple(row))
    return Trace(raw["model"], L, E, k, raw["source"], tuple(out))


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    text = read_user_file(path, "trace file")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise OffloadMoeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    return validate(raw, str(path))


def save_trace(trace: Trace, path: str | Path) -> None:
    path = Path(path)
    try:
        path.write_text(json.dumps(trace.to_dict(), separators=(",", ":")) + "\n", encoding="utf-8")
    except OSError as e:
        raise OffloadMoeError(f"{path}: cannot write trace file ({e.strerror})") from None


# ---- synthetic traces ----

def synthesize(num_layers: int, num_experts: int, top_k: int, tokens: int, reuse: float, seed: int = 0) -> Trace:
    """A random trace whose per-layer probability that an expert used at token t is used again at
    token t+1 is exactly `reuse`.

    Generative rule, for each layer independently (seeded, so the same arguments give the same trace):
    token 0 uses top_k distinct experts drawn uniformly. For token t+1, each of token t's experts is
    kept independently with probability `reuse` (a Bernoulli draw per expert); the places left are
    filled with experts drawn uniformly without replacement from those token t did *not* use. So an
    expert of token t reappears at t+1 exactly when its own draw keeps it: P = reuse, and the number
    of experts shared by consecutive tokens is Binomial(top_k, reuse). Kept experts come first in a
    route, new ones after (there are no routing weights to order by). Needs num_experts >= 2*top_k
    unless reuse == 1, so that a token can replace all of its predecessor's experts.
    """
    for name, v, lo in (("num_layers", num_layers, 1), ("num_experts", num_experts, 1), ("top_k", top_k, 1),
                        ("tokens", tokens, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise OffloadMoeError(f"synthesize: {name} = {v!r}, expected an integer >= {lo}")
    if top_k > num_experts:
        raise OffloadMoeError(f"synthesize: top_k = {top_k} exceeds num_experts = {num_experts}")
    if not isinstance(reuse, (int, float)) or isinstance(reuse, bool) or not 0 <= reuse <= 1:
        raise OffloadMoeError(f"synthesize: reuse = {reuse!r}, expected a probability from 0 to 1")
    if reuse < 1 and num_experts < 2 * top_k:
        raise OffloadMoeError(f"synthesize: reuse = {reuse} needs num_experts >= 2 * top_k "
                              f"({num_experts} < {2 * top_k}): a token must be able to replace all of its "
                              "predecessor's experts")
    rng = random.Random(seed)
    per_layer = []
    for _ in range(num_layers):
        current = rng.sample(range(num_experts), top_k)
        layer = [tuple(current)]
        for _ in range(tokens - 1):
            kept = [e for e in current if rng.random() < reuse]
            others = [e for e in range(num_experts) if e not in current]
            current = kept + rng.sample(others, top_k - len(kept))
            layer.append(tuple(current))
        per_layer.append(layer)
    routes = tuple(tuple(per_layer[l][t] for l in range(num_layers)) for t in range(tokens))
    return Trace(f"synthetic-{num_layers}x{num_experts}-top{top_k}", num_layers, num_experts, top_k,
                 f"synthesize(reuse={reuse}, seed={seed}, tokens={tokens})", routes)


def reuse_rate(trace: Trace) -> list[float]:
    """Measured per layer: the share of experts used at token t that are used again at token t+1."""
    out = []
    for l in range(trace.num_layers):
        routes = trace.layer(l)
        again = sum(len(set(a) & set(b)) for a, b in zip(routes, routes[1:]))
        out.append(again / (trace.top_k * (len(routes) - 1)) if len(routes) > 1 else 0.0)
    return out


# ---- replay ----

class TraceRouter:
    """Replays a trace as a model's routing decisions.

    MoE layer l (the expert engine's numbering: dense layers are skipped) reads trace layer
    ``l % trace.num_layers`` (so a 4-layer trace drives a 32-layer model). Each model layer has its own position in the trace: every call for that layer with n
    tokens (a prefill of n prompt tokens, or one decode token) takes the next n routes and advances
    by n; past the end of the trace it wraps around to the start (`wrapped` says it happened).

    It is a routing strategy (`model.Routing`): `install(model)` gives it to the model
    (`Transformer.set_routing`); nothing is patched. Prefetch guesses: while replaying, the model's
    routers no longer decide anything, so their guesses of the next layer's experts are useless.
    With `guess_accuracy` given to the constructor, `guess` is an *emulation* of a predictor with
    that accuracy: it returns the route the layer will really take next, each of its k ids
    independently kept with probability `guess_accuracy` and otherwise replaced by a uniformly
    drawn expert outside the true route (distinct ids, seeded). Without it, the routers guess.
    """

    def __init__(self, trace: Trace, model_layers: int, *, guess_accuracy: float | None = None, seed: int = 0):
        if isinstance(model_layers, bool) or not isinstance(model_layers, int) or model_layers < 1:
            raise OffloadMoeError(f"TraceRouter: model_layers = {model_layers!r}, expected an integer >= 1")
        if guess_accuracy is not None and not 0 <= guess_accuracy <= 1:
            raise OffloadMoeError(f"guess accuracy = {guess_accuracy!r}, expected a probability from 0 to 1")
        self.trace, self.model_layers = trace, model_layers
        self.guess_accuracy = guess_accuracy
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.position = [0] * self.model_layers
        self.wrapped = False
        self.rng = random.Random(self.seed)

    def _row(self, layer: int, t: int) -> tuple[int, ...]:
        n = len(self.trace.routes)
        if t >= n:
            self.wrapped = True
        return self.trace.routes[t % n][layer % self.trace.num_layers]

    def routes(self, layer: int, n_tokens: int) -> torch.Tensor:
        """The next n_tokens routes of `layer`: LongTensor (n_tokens, k); advances the layer."""
        start = self.position[layer]
        self.position[layer] = start + n_tokens
        return torch.tensor([self._row(layer, start + i) for i in range(n_tokens)], dtype=torch.long)

    __call__ = routes

    def forced(self, layer: int, tokens: int) -> torch.Tensor:
        """`Routing.forced`: the trace's next routes replace the router's top-k."""
        return self.routes(layer, tokens)

    def peek(self, layer: int, n_tokens: int = 1) -> list[tuple[int, ...]]:
        """The routes `layer` will take next, without advancing."""
        start = self.position[layer]
        return [self._row(layer, start + i) for i in range(n_tokens)]

    def guess(self, layer: int, n: int) -> torch.Tensor | None:
        """`Routing.guess`: emulated prefetch guess for `layer`'s next call of n tokens, (n, k) ids;
        None without `guess_accuracy` (the routers guess)."""
        if self.guess_accuracy is None:
            return None
        E, acc = self.trace.num_experts, self.guess_accuracy if self.guess_accuracy is not None else 1.0
        out = []
        for true in self.peek(layer, n):
            wrong = [e for e in range(E) if e not in true]
            row = []
            for e in true:
                if self.rng.random() < acc or not wrong:
                    row.append(e)
                else:
                    row.append(wrong.pop(self.rng.randrange(len(wrong))))
            out.append(row)
        return torch.tensor(out, dtype=torch.long)

    def install(self, model) -> None:
        """Route `model` (an `offload_moe.Model`) by this trace, with the guess emulation when
        `guess_accuracy` is set. Checks that the trace fits the model (experts, top-k, layers)."""
        cfg = model.config
        blocks = model.transformer.moe_blocks
        if (self.trace.num_experts, self.trace.top_k) != (cfg.num_experts, cfg.top_k):
            t = self.trace
            raise OffloadMoeError(f"trace {t.model!r} has {t.num_experts} experts, top-{t.top_k}; "
                                  f"the model has {cfg.num_experts} experts, top-{cfg.top_k}")
        if self.model_layers != len(blocks):
            raise OffloadMoeError(f"TraceRouter built for {self.model_layers} MoE layers, the model has {len(blocks)}")
        model.transformer.set_routing(self)


__all__ = ["FORMAT", "Trace", "validate", "load_trace", "save_trace", "synthesize", "reuse_rate",
           "TraceRouter"]
