"""Which part of the model first produced NaN or Inf, found only after the decode loop saw it.

The loop pays one reduction per token for detection (`logits.sum()`, read with the token in the same
transfer). When it is not finite, `diagnose` re-runs the sequence so far once, statelessly, with a
forward hook on every stage (embeddings; per layer its norms, attention, MLP or MoE block; final
norm; lm_head) and names the first whose output holds a non-finite value, together with the first
of that stage's own weights that does, if one does.
"""

from __future__ import annotations

import torch

from ..model.transformer import Transformer


def _stages(model: Transformer):
    yield "model.embed_tokens", model.embed_tokens
    for i, layer in enumerate(model.layers):
        for name, module in layer.named_children():
            yield f"model.layers.{i}.{name}", module
    yield "model.norm", model.norm
    yield "lm_head", model.lm_head


def _finite(t) -> bool:
    return not isinstance(t, torch.Tensor) or not t.is_floating_point() or bool(torch.isfinite(t).all())


def diagnose(model: Transformer, ids: list[int], token_index: int) -> str:
    """A one-line account of where non-finite values first appear for the sequence `ids`."""
    seen: list[tuple[str, torch.nn.Module]] = []
    hooks = []

    def hook_for(name, module):
        def hook(mod, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if not seen and not _finite(out):
                seen.append((name, module))
        return hook

    for name, module in _stages(model):
        hooks.append(module.register_forward_hook(hook_for(name, module)))
    try:
        tokens = torch.tensor([ids[-model.max_seq_len:]], device=model.device)
        model(tokens, start=0, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    head = f"non-finite logits (NaN or Inf) at generated token {token_index}"
    if not seen:
        return f"{head}; a re-run of the sequence did not reproduce them"
    name, module = seen[0]
    layer = name.split(".")[2] if name.startswith("model.layers.") else None
    where = f"layer {layer} ({name})" if layer is not None else name
    bad = next((f"{name}.{p}" for p, w in list(module.named_parameters()) + list(module.named_buffers())
                if not _finite(w)), None)
    if bad:
        return f"{head}: first produced by {where}, whose weight {bad} holds NaN or Inf values"
    if name.endswith("block_sparse_moe"):
        return f"{head}: first produced by {where}, by one of its experts' weights"
    return f"{head}: first produced by {where} (its inputs were finite)"
