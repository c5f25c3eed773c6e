"""The sparse MoE block: route each token, bring the routing ids (and the next layers' guesses) to the
host in one copy (`HostIds`), ask the injected expert provider for the chosen experts, and weight and
sum their outputs on the device; plus the dense SwiGLU `MLP` of dense layers and shared experts.
Routed experts are not part of this module: the provider (`model.expert_interface.ExpertProvider`)
hands them over, so offloading, caching and prefetch live elsewhere and never call back here.

Shapes as in transformer.py: N = B*T tokens, H hidden, E experts, k per token, D guessed layers ahead.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints.config import ModelConfig
from ..kernels.decode_step import ExpertRows, RouteStep
from .routing import ROUTER_RULES
from .expert_interface import ExpertProvider
from ..kernels.ggml import experts_one_token


class MLP(nn.Module):
    """A dense SwiGLU MLP that stays on the device: a dense layer's, or a shared expert."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HostIds:
    """The one device->host transfer of a MoE layer: its routing ids and the guesses for the next
    layers, gathered on the device into one preallocated buffer and copied back in one go into a
    preallocated host buffer (pinned on CUDA). Steps larger than the buffers (prefill) copy once too.
    The routing weights stay on the device: the block weights the experts' outputs there."""

    def __init__(self, size: int, device: torch.device):
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.host = torch.empty(size, dtype=torch.long, pin_memory=on_cuda)               # (size,)
        self.staged = torch.empty(size, dtype=torch.long, device=self.device) if on_cuda else self.host

    def read(self, *parts: torch.Tensor) -> torch.Tensor:
        """The parts (long tensors on the device), flattened one after another, on the host."""
        if self.staged is self.host and len(parts) == 1:
            return parts[0].flatten().cpu()   # a CPU model: already in host memory (`.cpu()` copies nothing)
        total = sum(p.numel() for p in parts)
        if total > self.host.numel():
            return torch.cat([p.flatten() for p in parts]).cpu()
        staged = torch.cat([p.flatten() for p in parts], out=self.staged[:total])   # (total,) one gather
        if self.staged is self.host:
            return staged
        return self.host[:total].copy_(staged)                         # blocking: the layer's one sync


class MoEBlock(nn.Module):
    """Router (the family's rule) and the weighted sum of the chosen experts, plus the shared
    expert (sigmoid-gated in Qwen2-MoE) where the family has one."""

    def __init__(self, cfg: ModelConfig, layer: int, experts: ExpertProvider):
        super().__init__()
        fam = cfg.family
        self.cfg, self.layer, self.top_k, self.num_experts = cfg, layer, cfg.top_k, cfg.num_experts
        self.rule, self.router_fp32 = ROUTER_RULES[fam.router_rule], fam.router_fp32
        self.scales_input = fam.router_scales_input  # Llama 4: the weight multiplies the expert's input
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=fam.router_bias)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts)) if fam.score_bias else None  # (E,)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_size) if cfg.shared_expert_size else None
        self.shared_expert_gate = (nn.Linear(cfg.hidden_size, 1, bias=False)
                                   if cfg.shared_expert_size and fam.shared_expert_gate else None)
        self.experts = experts  # the provider (`experts.interface`): not a submodule, owns no parameters here
        self.decode_route: RouteStep | None = None  # a decode step's tokens on the CPU in one C call
        self.decode_experts: ExpertRows | None = None   # and its experts in one C call each (`prepare_cpu_decode`)

    def route(self, x: torch.Tensor, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> weights (N, k) in x's dtype, expert ids (N, k); `forced` ids replace top-k."""
        if self.decode_route is not None and forced is None:
            routed = self.decode_route(x)
            if routed is not None:
                return routed
        half_on_cpu = x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
        if self.router_fp32 or half_on_cpu:
            # (on the CPU, torch's product of a half-precision row with a [E, H] matrix costs ~4x the fp32 one)
            bias = self.gate.bias.float() if self.gate.bias is not None else None
            logits = F.linear(x.float(), self.gate.weight.float(), bias)                 # (N, E)
            if not self.router_fp32:
                logits = logits.to(x.dtype)
        else:
            logits = self.gate(x)
        weights, ids = self.rule(logits, self.cfg, forced, self.e_score_correction_bias)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor, ids_to_host: HostIds, forced: torch.Tensor | None = None,
                guesses: torch.Tensor | None = None, routed: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H). `guesses` (D, N, k): the next D layers' likely experts, handed
        to the provider for prefetch; they come to the host in the same copy as the routing ids.
        `routed`: (weights, ids) the router already gave for x (a decode step's C layer call)."""
        B, T, H = x.shape
        N, k = B * T, self.top_k
        h = x.reshape(-1, H)                                          # (N, H)
        weights, ids = routed if routed is not None else self.route(h, forced)   # (N, k), (N, k)
        flat = ids.flatten()                                          # (N*k,)
        parts = (flat,) if guesses is None else (flat, guesses)
        host = ids_to_host.read(*parts)                               # the one host sync of the layer
        ahead = ([sorted(set(g)) for g in host[N * k:].view(guesses.shape[0], -1).tolist()]
                 if guesses is not None else ())
        # Each (token, choice) gets its own row, weighted on the device and summed over choices in a
        # fixed order, so the result does not depend on the order the provider hands experts out.
        if self.decode_experts is not None and not self.scales_input and self.decode_experts.takes(h):  # CPU decode: C
            used = sorted(set(host[:N * k].tolist()))
            y = self.decode_experts(h, weights, host[:N * k], self.experts.fetch(self.layer, used, N, ahead),
                                    stable=getattr(self.experts, "stable", False))
        elif N == 1:  # decode: k distinct experts, one row each; no grouping needed
            choice = {e: j for j, e in enumerate(host[:k].tolist())}
            fetched = self.experts.fetch(self.layer, sorted(choice), N, ahead)
            if self.scales_input:  # Llama 4: the router's weight scales each expert's input, outputs summed
                outs: list[torch.Tensor | None] = [None] * k
                for e, expert in fetched:
                    j = choice[e]
                    outs[j] = expert(h * weights[:, j:j + 1], None)     # (1, H)
                y = torch.cat(outs).sum(dim=0, keepdim=True)          # (k, H) -> (1, H)
            else:
                stacked = None
                if getattr(self.experts, "stable_experts", False):   # experts stay valid after the fetch
                    fetched = list(fetched)
                    fused = [None] * k
                    for e, expert in fetched:
                        fused[choice[e]] = expert.fused
                    stacked = experts_one_token(h, fused)             # (k, H) in one kernel call, or None
                if stacked is None:
                    outs = [None] * k
                    for e, expert in fetched:
                        outs[choice[e]] = expert(h, None)             # (1, H)
                    stacked = torch.cat(outs)                         # (k, H)
                y = (stacked * weights.view(k, 1)).sum(dim=0, keepdim=True)   # (k, H) -> (1, H)
        else:
            row_weights = weights.flatten()                           # (N*k,)
            out = h.new_zeros(N * k, H)                               # (N*k, H)
            order = torch.argsort(flat, stable=True)                  # rows grouped by expert, on the device
            token_of = order // k                                     # (N*k,) the token of each grouped row
            counts = torch.bincount(host[:N * k], minlength=self.num_experts).tolist()
            ends = list(accumulate(counts))                           # expert e's rows end here
            used = [e for e, c in enumerate(counts) if c]
            for e, expert in self.experts.fetch(self.layer, used, N, ahead):
                start, end = ends[e] - counts[e], ends[e]
                rows = order[start:end]                               # flat (token, choice) indices
                if self.scales_input:
                    out[rows] = expert(h[token_of[start:end]] * row_weights[rows, None], None)  # (n_e, H)
                else:
                    out[rows] = expert(h, token_of[start:end]) * row_weights[rows, None]  # (n_e, H)
            y = out.view(N, k, H).sum(dim=1)                          # (N, H)
        if self.shared_expert is not None:
            shared = self.shared_expert(h)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            y = y + shared
        return y.view(B, T, H)


