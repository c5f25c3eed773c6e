"""`run_bench`: measure the offloading engine against its baselines and against a lower bound.

Every configuration ("row") runs the same weights on the same prompt and generates the same number
of tokens greedily; with a routing trace (a file, or `synthesize(reuse=...)`) every row also makes
the same expert choices, because `TraceRouter` replaces the routers' top-k. The rows:

- ``engine``: the offloading engine as configured (cache slots and prefetch depth given, or taken
  from a profile);
- ``resident``: every expert on the compute device (skipped with a reason when it does not fit);
- ``on_demand``: no reuse and no prefetch: each use copies its expert (policy "none", top_k slots);
- ``lru``: the configured slots with LRU eviction, no prefetch;
- ``accelerate``: transformers' MixtralForCausalLM with Hugging Face accelerate ``device_map``
  offload (only for a real checkpoint directory on CUDA with accelerate installed; otherwise the
  row says why it was skipped).

Measured per row: prefill tokens/s, time to first token, decode tokens/s, hits, misses, hit rate,
prefetch accuracy, bytes moved, the time spent copying, the achieved host→device rate, peak VRAM
and peak RSS. Once per run: the memcpy peak (one expert-sized buffer copied repeatedly: pinned
host→device on CUDA, RAM→RAM on the CPU), and the Belady hit rate (the best on demand, without prefetch) of the recorded
routing for the same slots, with LRU's hit rate as a fraction of it.

Rows run `repeats` times (default 3) in rounds, interleaved (engine, resident, ..., then again), so a
burst of load on a shared machine hits every row alike; each row reports its median run, with the
min-max and spread of its runs (`repeat.py`), and `notes` warn when the spread says the figures are
not trustworthy. The memcpy peak is measured every round, after a warm-up.

Lower bound of a row's decode time (the tokens after the first), from this run's own measurements:

    bound = max(decode bytes copied ÷ peak copy rate, (tokens - 1) × fastest decode step)

the peak copy rate being the best memcpy trial or the fastest decode copies of any row, whichever is
higher, and the fastest step that of any run of any row. So the bound is the decode time if every
step were as fast as the fastest seen and every copy ran at the fastest rate seen, overlapping
compute perfectly: no run can be faster, however the load falls. ratio = measured decode time ÷
bound (>= 1); near 1 the row is as fast as this machine allowed at its best moment.

Definitions used in the output (the JSON schema is in docs/trace-format.md):

- ``copy_seconds``: the summed duration of every host→device expert copy the engine made (demand and
  prefetch). On CUDA each copy is bracketed by timing events on the engine's copy stream, from the
  moment its slot is free to the copy's end; on the CPU copies are synchronous and wall-clock timed.
- ``achieved_gbps`` = bytes_moved ÷ copy_seconds ÷ 1e9 (decimal GB/s).
- ``stall_seconds``: the time compute waited for demand copies (the engine's own counter).
- ``ttft_seconds``: from submitting the prompt to the first generated token id read on the host
  (equal to ``prefill_seconds``).

The modules: `run` (the run and its result), `settings` (the engine row's slots, prefetch and VRAM
limit), `rows` (a row with offload_moe's model), `hf_offload` (the Hugging Face accelerate row),
`measure` (timers and memory peaks), `bounds` (Belady and the lower bound). Nothing here prints;
progress goes through the `progress(what, done, total)` callback.
"""

from .hf_offload import hf_offload_generate
from .measure import measure_memcpy
from .rows import ROW_FIELDS
from .run import FORMAT, BenchOptions, run_bench

__all__ = ["run_bench", "BenchOptions", "measure_memcpy", "ROW_FIELDS", "FORMAT", "hf_offload_generate"]
