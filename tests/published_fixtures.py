"""Pre-quantized checkpoints as their publishers write them, made by the tests from tiny transformers models.

Each quantizer returns the tensors in the format's published layout (written here with explicit
loops over the packing rules, independent of offload_moe's readers) and the float64 dequantization
of the same integers and scales, the oracle the kernels and the model are checked against:
- `fp8_block`: float8 e4m3fn `weight` [O, I] + fp32 `weight_scale_inv` [ceil(O/bn), ceil(I/bk)].
- `pack_quantized`: compressed-tensors' int32 `weight_packed` [O, ceil(I·b/32)] (values + 2^(b-1), low
  bits first), bf16 `weight_scale` [O, G], asymmetric `weight_zero_point` packed along the rows,
  `weight_g_idx` [I] under actorder "group".
- `gptq`: int32 `qweight` [I/(32/b), O], `qzeros` [G, O/(32/b)] (v1: zeros minus one), fp16 `scales`
  [G, O], int32 `g_idx` [I] (a shuffled activation order with desc_act).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """uint [R, C] -> int32 [R, ceil(C·bits/32)]: value c at bits (c % per)·bits of word c // per."""
    per = 32 // bits
    R, C = values.shape
    out = np.zeros((R, math.ceil(C / per)), dtype=np.uint32)
    for c in range(C):
        out[:, c // per] |= values[:, c].astype(np.uint32) << np.uint32((c % per) * bits)
    return out.view(np.int32)


def fp8_block(w: torch.Tensor, block=(128, 128)):
    """w [O, I] -> ({weight, weight_scale_inv}, float64 dequantization [O, I])."""
    O, I = w.shape
    bn, bk = block
    scale = torch.zeros(math.ceil(O / bn), math.ceil(I / bk), dtype=torch.float32)
    q = torch.zeros(O, I, dtype=torch.float8_e4m3fn)
    ref = torch.zeros(O, I, dtype=torch.float64)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].double()
            s = max(blk.abs().max().item(), 1e-8) / 448.0
            scale[i, j] = s
            s = scale[i, j].double()
            qb = (blk / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = qb
            ref[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = qb.double() * s
    return {"weight": q, "weight_scale_inv": scale}, ref


def _groups(I: int, group: int, shuffled: bool, seed: int) -> torch.Tensor:
    """int32 [I]: the group of each input, groups formed in activation order (a shuffle) when `shuffled`."""
    order = torch.randperm(I, generator=torch.Generator().manual_seed(seed)) if shuffled else torch.arange(I)
    g_idx = torch.zeros(I, dtype=torch.int32)
    g_idx[order] = (torch.arange(I) // group).to(torch.int32)
    return g_idx


def pack_quantized(w: torch.Tensor, bits=4, group=16, symmetric=True, actorder=False, seed=0):
    """w [O, I] -> ({weight_packed, weight_scale, weight_zero_point?, weight_g_idx?, weight_shape},
    float64 dequantization)."""
    O, I = w.shape
    G = math.ceil(I / group)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    g_idx = _groups(I, group, actorder, seed)
    wd = w.double()
    q = np.zeros((O, I), dtype=np.int64)
    zp = np.zeros((O, G), dtype=np.int64)
    scale = torch.zeros(O, G, dtype=torch.bfloat16)
    ref = torch.zeros(O, I, dtype=torch.float64)
    for g in range(G):
        ks = (g_idx == g).nonzero().flatten()
        blk = wd[:, ks]
        if symmetric:
            s = (blk.abs().amax(dim=1) / hi).clamp(min=1e-8)
            scale[:, g] = s.to(torch.bfloat16)
            z = torch.zeros(O, dtype=torch.int64)
        else:
            mn, mx = blk.amin(dim=1).clamp(max=0), blk.amax(dim=1).clamp(min=0)
            s = ((mx - mn) / (hi - lo)).clamp(min=1e-8)
            scale[:, g] = s.to(torch.bfloat16)
            z = (lo - torch.round(mn / scale[:, g].double())).clamp(lo, hi).long()
        sd = scale[:, g].double()
        qg = (torch.round(blk / sd[:, None]) + z[:, None]).clamp(lo, hi).long()
        q[:, ks.numpy()] = qg.numpy()
        zp[:, g] = z.numpy()
        ref[:, ks] = (qg - z[:, None]).double() * sd[:, None]
    parts = {"weight_packed": torch.from_numpy(_pack_rows(q - lo, bits)), "weight_scale": scale,
             "weight_shape": torch.tensor([O, I], dtype=torch.int64)}
    if not symmetric:
        parts["weight_zero_point"] = torch.from_numpy(_pack_rows((zp - lo).T.copy(), bits).T.copy())
    if actorder:
        parts["weight_g_idx"] = g_idx
    return parts, ref


def gptq(w: torch.Tensor, bits=4, group=16, desc_act=False, v1=True, seed=0):
    """w [O, I] -> ({qweight, qzeros, scales, g_idx}, float64 dequantization [O, I])."""
    O, I = w.shape
    G = math.ceil(I / group)
    top = (1 << bits) - 1
    g_idx = _groups(I, group, desc_act, seed)
    wd = w.double()
    q = np.zeros((I, O), dtype=np.int64)
    zeros = np.zeros((G, O), dtype=np.int64)
    scales = torch.zeros(G, O, dtype=torch.float16)
    ref = torch.zeros(O, I, dtype=torch.float64)
    for g in range(G):
        ks = (g_idx == g).nonzero().flatten()
        blk = wd[:, ks]                                                   # (O, members)
        mn, mx = blk.amin(dim=1).clamp(max=0), blk.amax(dim=1).clamp(min=0)
        scales[g] = ((mx - mn) / top).clamp(min=1e-6).to(torch.float16)
        s = scales[g].double()
        z = torch.round(-mn / s).clamp(1 if v1 else 0, top).long()       # v1 cannot store a zero of 0
        qg = (torch.round(blk / s[:, None]) + z[:, None]).clamp(0, top).long()
        q[ks.numpy()] = qg.T.numpy()
        zeros[g] = z.numpy()
        ref[:, ks] = (qg - z[:, None]).double() * s[:, None]
    stored = zeros - (1 if v1 else 0)
    return {"qweight": torch.from_numpy(_pack_rows(q.T.copy(), bits).T.copy()),
            "qzeros": torch.from_numpy(_pack_rows(stored, bits)), "scales": scales, "g_idx": g_idx}, ref


FORMATS = {
    "fp8": (lambda w: fp8_block(w, (16, 16)),
            {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}),
    "int4_pack": (lambda w: pack_quantized(w, 4, 16, True),
                  {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                   "ignore": ["lm_head", "re:.*gate$"],
                   "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "format": "pack-quantized",
                                                 "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                             "strategy": "group", "group_size": 16}}}}),
    "int4_pack_asym": (lambda w: pack_quantized(w, 4, 16, False, actorder=True),
                       {"quant_method": "compressed-tensors", "format": "pack-quantized",
                        "config_groups": {"group_0": {"targets": ["Linear"],
                                                      "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                                  "strategy": "group", "group_size": 16}}}}),
    "gptq": (lambda w: gptq(w, 4, 16, desc_act=False),
             {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": False, "sym": True,
              "checkpoint_format": "gptq"}),
    "gptq_desc_act": (lambda w: gptq(w, 4, 16, desc_act=True),
                      {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True, "sym": False}),
    "gptq8_v2": (lambda w: gptq(w, 8, 16, v1=False),
                 {"quant_method": "gptq", "bits": 8, "group_size": 16, "desc_act": False,
                  "checkpoint_format": "gptq_v2"}),
}


def quantizes(name: str, t: torch.Tensor) -> bool:
    """What the publishers quantize: every Linear of the decoder layers, not the routers (nor shared-expert
    gates), norms, embeddings, lm_head; for GPTQ only matrices whose sizes pack by 8."""
    return (t.dim() == 2 and name.startswith("model.layers.") and name.endswith(".weight")
            and not name.endswith(("gate.weight", "router.weight", "norm.weight")))


def write_published(model, directory: Path, fmt: str) -> Path:
    """`directory/quantized`: `model` in format `fmt`; `directory/reference`: the same model dequantized,
    float64, for transformers to load as the oracle."""
    quantize, qconfig = FORMATS[fmt]
    raw = directory / "raw"
    model.save_pretrained(raw)
    state = {}
    for f in sorted(raw.glob("*.safetensors")):
        state.update(load_file(f))
    quantized, reference = {}, {}
    for name, t in state.items():
        if quantizes(name, t) and not (fmt.startswith("gptq") and (t.shape[0] % 8 or t.shape[1] % 8)):
            parts, ref = quantize(t)
            prefix = name.removesuffix(".weight")
            quantized.update({f"{prefix}.{k}": v.contiguous() for k, v in parts.items()})
            reference[name] = ref
        else:
            quantized[name] = t.contiguous()
            reference[name] = t.double()
    config = json.loads((raw / "config.json").read_text())
    for sub, tensors, extra in (("quantized", quantized, {"quantization_config": qconfig}),
                                ("reference", reference, {"dtype": "float64"})):
        d = directory / sub
        d.mkdir()
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**config, **extra}))
    shutil.rmtree(raw)
    return directory / "quantized"
