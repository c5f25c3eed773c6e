"""Who picks the experts: the router rules (gate logits (N, E) -> weights (N, k), expert ids (N, k), one
per family's scoring) and the `Routing` strategy a benchmark gives the model to replay a trace
instead (`Transformer.set_routing`)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..checkpoints.config import ModelConfig


# ---- router rules: gate logits (N, E) -> weights (N, k) fp32, expert ids (N, k) ----
# `bias` (E,): the selection bias of the sigmoid rule (`e_score_correction_bias`); None for the others.
def softmax_topk(logits: torch.Tensor, cfg: ModelConfig, forced: torch.Tensor | None, bias=None):
    """Softmax over all experts, top-k (within the best topk_group of n_group groups), then
    renormalise (norm_topk_prob) or scale by routed_scaling_factor. Mixtral, Qwen, OLMoE, DeepSeek."""
    probs = F.softmax(logits.float(), dim=-1)                         # (N, E)
    if forced is not None:
        ids = forced.to(probs.device)
        weights = probs.gather(-1, ids)
    else:
        eligible = probs
        if cfg.n_group > 1:
            groups = probs.view(probs.shape[0], cfg.n_group, -1)      # (N, groups, E/groups)
            best = groups.amax(dim=-1).topk(cfg.topk_group, dim=-1).indices
            keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            eligible = groups.masked_fill(~keep[..., None], 0.0).view_as(probs)
        weights, ids = torch.topk(eligible, cfg.top_k, dim=-1)        # (N, k)
    if cfg.norm_topk_prob:
        return weights / weights.sum(dim=-1, keepdim=True), ids
    return weights * cfg.routed_scaling_factor, ids


def _top(logits: torch.Tensor, cfg: ModelConfig, forced: torch.Tensor | None):
    """The k largest logits and their ids, or the forced ids' logits."""
    if forced is not None:
        ids = forced.to(logits.device)
        return logits.gather(-1, ids), ids
    return torch.topk(logits, cfg.top_k, dim=-1)                      # (N, k), (N, k)


def topk_softmax(logits: torch.Tensor, cfg: ModelConfig, forced: torch.Tensor | None, bias=None):
    """Top-k of the logits, then a softmax over those k (gpt-oss)."""
    top, ids = _top(logits, cfg, forced)
    return F.softmax(top.float(), dim=-1), ids


def sigmoid_topk(logits: torch.Tensor, cfg: ModelConfig, forced: torch.Tensor | None, bias=None):
    """DeepSeek-V3's "noaux_tc" (GLM-4.5, Kimi-K2, MiniMax-M2 alike): sigmoid scores; the bias is added
    for the choice only; with n_group > 1 only the topk_group groups with the best sums of their two
    best biased scores are eligible; the chosen unbiased scores are renormalised (norm_topk_prob),
    then scaled by routed_scaling_factor."""
    scores = torch.sigmoid(logits.float())                            # (N, E)
    if forced is not None:
        ids = forced.to(scores.device)
    else:
        choice = scores + bias.float() if bias is not None else scores
        if cfg.n_group > 1:
            groups = choice.view(choice.shape[0], cfg.n_group, -1)    # (N, groups, E/groups)
            best = groups.topk(2, dim=-1).values.sum(dim=-1).topk(cfg.topk_group, dim=-1).indices
            keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = groups.masked_fill(~keep[..., None], float("-inf")).view_as(scores)
        ids = torch.topk(choice, cfg.top_k, dim=-1).indices           # (N, k)
    weights = scores.gather(-1, ids)                                  # (N, k)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids


def topk_sigmoid(logits: torch.Tensor, cfg: ModelConfig, forced: torch.Tensor | None, bias=None):
    """Top-k of the logits, each through a sigmoid on its own (Llama 4, top-1)."""
    top, ids = _top(logits, cfg, forced)
    return torch.sigmoid(top.float()), ids


ROUTER_RULES = {"softmax_topk": softmax_topk, "topk_softmax": topk_softmax, "sigmoid_topk": sigmoid_topk,
                "topk_sigmoid": topk_sigmoid}


class Routing(Protocol):
    """A routing strategy the model can be given in place of its own routers' choices (benchmarks
    replay recorded traces through it). Layers are MoE layers (the engine's numbering)."""

    def forced(self, layer: int, tokens: int) -> torch.Tensor | None:
        """(tokens, k) expert ids that replace the router's top-k for this call, or None."""
        ...

    def guess(self, layer: int, tokens: int) -> torch.Tensor | None:
        """(tokens, k) prefetch guesses for `layer`'s next call, or None: the routers guess."""
        ...


