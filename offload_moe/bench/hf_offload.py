"""The ``accelerate`` row: transformers' MixtralForCausalLM offloaded by Hugging Face accelerate's
``device_map``, routed by the same trace as the other rows, or skipped with the reason it cannot run."""

from __future__ import annotations

from dataclasses import dataclass

import gc
import importlib.util
import shutil
import tempfile
import time

import torch

from ..base.runtime import Progress, available_ram
from ..tools.trace import Trace, TraceRouter
from .measure import decode_steps, free_memory, peak_rss, reset_peaks
from .rows import Run, new_row, skipped_row


def run_accelerate(run: Run, name: str, label: str, gpu_budget: int | None) -> dict:
    settings = {"experts": "accelerate device_map offload", "gpu_max_memory": gpu_budget}
    if run.synthetic:
        return skipped_row(name, label, "needs a checkpoint directory (synthetic weights exist only inside "
                           "offload_moe)", settings)
    if run.cfg.model_type != "mixtral":
        return skipped_row(name, label, f"transformers' MixtralForCausalLM runs Mixtral checkpoints; this is "
                           f"{run.cfg.model_type!r}", settings)
    if run.device.type != "cuda":
        return skipped_row(name, label, f"needs CUDA (device is {run.device.type}): accelerate's device_map "
                           "offload streams weights to a GPU", settings)
    if importlib.util.find_spec("accelerate") is None:
        return skipped_row(name, label, "accelerate is not installed (pip install 'offload-moe[bench]')", settings)
    if run.cfg.quantization:
        return skipped_row(name, label, "quantized checkpoint: transformers cannot read offload_moe's packed "
                           "format", settings)
    row = new_row(name, label, settings)
    rss_reset = reset_peaks(run.device)
    index = run.device.index if run.device.index is not None else torch.cuda.current_device()
    max_memory = {"cpu": int(0.9 * available_ram())} if available_ram() else {}
    if gpu_budget:
        max_memory[index] = int(gpu_budget)
    settings["max_memory"] = {str(k): v for k, v in max_memory.items()}
    try:
        measured = hf_offload_generate(run.ckpt.path, Workload(run.prompt, run.tokens, run.trace, run.seed),
                                       dtype=run.dtype, max_memory=max_memory or None,
                                       input_device=torch.device("cuda", index), report=run.report)
    except torch.cuda.OutOfMemoryError as e:
        return skipped_row(name, label, f"out of memory on {run.device}: {str(e).splitlines()[0]}", settings)
    finally:
        free_memory(run.device)
    settings.update(device_map=measured.pop("device_map"),
                    offloaded_bytes_per_forward=measured.pop("offloaded_bytes_per_forward"),
                    peak_rss_scope="this row" if rss_reset else "process lifetime",
                    bytes_moved_note="counted, not timed: accelerate copies every offloaded weight to the GPU on "
                                     "each forward pass, so bytes moved = forward passes x offloaded bytes")
    row["_wrapped"] = measured.pop("wrapped")
    row.update(measured, peak_vram_bytes=torch.cuda.max_memory_allocated(run.device), peak_rss_bytes=peak_rss())
    return row


@dataclass(frozen=True)
class Workload:
    """What a baseline generates: greedy `tokens` tokens after `prompt`, routes forced to `trace` (seeded
    guesses) when given."""
    prompt: list[int]
    tokens: int
    trace: Trace | None = None
    seed: int = 0


def hf_offload_generate(path, work: Workload, *, dtype, max_memory, input_device: torch.device,
                        report: Progress) -> dict:
    """Greedy generation with transformers' MixtralForCausalLM dispatched by accelerate
    (`device_map="auto"` under `max_memory`, the rest offloaded to CPU RAM or a temporary disk folder),
    routes forced to `work.trace` when given. Returns the row's timing and transfer fields plus
    `device_map`, `offloaded_bytes_per_forward` and `wrapped`."""
    prompt, tokens, trace, seed = work.prompt, work.tokens, work.trace, work.seed
    from transformers import MixtralForCausalLM
    from transformers.utils import logging as hf_logging

    folder = tempfile.mkdtemp(prefix="offload-moe-bench-accelerate-")
    model = None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # its bars would fight the caller's progress display on stderr
    try:
        t0 = time.perf_counter()
        model = MixtralForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory,
                                                   offload_folder=folder).eval()
        load_seconds = time.perf_counter() - t0
        placement = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
        offloaded = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                        if _placed(n, placement) in ("cpu", "disk"))
        router = None
        if trace is not None:
            router = TraceRouter(trace, model.config.num_hidden_layers, seed=seed)
            for i, layer in enumerate(model.model.layers):
                layer.mlp.gate.register_forward_hook(_forced_hook(router, i))
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([prompt], device=input_device), use_cache=True, logits_to_keep=1)
            token = out.logits[0, -1].argmax()
            token_ids = [int(token)]
            stamps = [time.perf_counter()]
            prefill = stamps[0] - t0
            report("tokens", 1, tokens)
            past = out.past_key_values
            t1 = time.perf_counter()
            for i in range(1, tokens):
                out = model(input_ids=token.view(1, 1).to(input_device), past_key_values=past, use_cache=True,
                            logits_to_keep=1)
                past = out.past_key_values
                token = out.logits[0, -1].argmax()
                token_ids.append(int(token))
                stamps.append(time.perf_counter())
                report("tokens", i + 1, tokens)
            decode = time.perf_counter() - t1
        steps = tokens - 1
        return dict(load_seconds=load_seconds, prompt_tokens=len(prompt), new_tokens=tokens, prefill_seconds=prefill,
                    ttft_seconds=prefill, prefill_tokens_per_second=len(prompt) / prefill if prefill > 0 else 0.0,
                    decode_seconds=decode, decode_tokens_per_second=steps / decode if decode > 0 else 0.0,
                    **decode_steps(stamps),
                    bytes_moved=offloaded * tokens, decode_bytes_moved=offloaded * steps, token_ids=token_ids,
                    device_map=placement, offloaded_bytes_per_forward=offloaded,
                    wrapped=bool(router and router.wrapped))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        del model
        gc.collect()
        shutil.rmtree(folder, ignore_errors=True)


def _placed(param: str, placement: dict[str, str]) -> str | None:
    """Where accelerate put a parameter: the device of the longest module prefix in hf_device_map."""
    best, where = -1, None
    for module, device in placement.items():
        if (module == "" or param == module or param.startswith(module + ".")) and len(module) > best:
            best, where = len(module), device
    return where


def _forced_hook(router: TraceRouter, layer: int):
    """A forward hook on transformers' MixtralTopKRouter: replace its top-k with the trace's routes
    (weights: the router's probabilities of those experts, renormalised, as in MoEBlock.route)."""

    def hook(module, args, output):
        logits, scores, ids = output
        forced = router(layer, ids.shape[0]).to(ids.device)
        probs = torch.softmax(logits.float(), dim=-1)
        weights = probs.gather(-1, forced)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(scores.dtype), forced.to(ids.dtype)

    return hook
