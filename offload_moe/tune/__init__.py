"""`tune`: measure what this machine can do, try a few engine settings on the real model, keep the best.

Two parts. `measure_machine` times the three things an offloaded expert costs: the host → device
copy of one expert (pinned RAM → GPU; on the CPU a RAM → RAM copy of the same size), a disk read
(a temporary file dropped from the page cache with `posix_fadvise(DONTNEED)` where the filesystem
allows it), and one expert's SwiGLU at batch 1 per bit width (bf16 weights, and int8/int4/int3/int2
through `qlinear`, on the device, at the model's expert shape). Then `tune` loads the model under a
few settings (slots per layer, prefetch depth, RAM or disk tier), decodes a fixed number of tokens
greedily from a fixed prompt under each, and measures decode tokens/s and the expert hit rate.
`write_profile` saves the fastest setting (ties: fewer slots) as a profile TOML, the measurements
in its comment header, where `load(profile="tuned")` finds it.

The default settings are a coordinate search, so a run stays short: slots per layer first (top_k,
2·top_k and all that fit), then prefetch depth 0/1/2 at the best slots, then the disk tier at the
best of those. When the best holds every expert in a slot, nothing is copied while decoding and
prefetch or tier cannot change its speed, so those two stages explore from the best setting with
fewer slots instead (where they matter); the fastest row overall is still the one chosen. Every setting is time-boxed (decoding stops at its deadline; tokens/s counts what
was decoded) and the whole workload has a budget, after which remaining settings are skipped.
Decode statistics exclude the prompt: expert counters are read after the first token, when the
prefill is done, and again at the end.

The link timing is `timing.measure_copy_rate` and the compute `experts/cost_timing.py`'s, so
the figures tune reports are the ones the hybrid CPU/GPU engine's cost model uses; `cost_model`
turns them into that model (per width: the slot form on the device, and the CPU form the hybrid
computes from), which the CLI saves with `experts.cost_file.save_costs` so `load()` need not measure.

The modules: `machine` (link and expert compute, the cost model), `disk` (the disk read), `search`
(the settings tried on the model), `settings` (a setting, its row, the result, the best row),
`profile_file` (the profile TOML and writing it). Nothing here prints; progress goes through a
`(what, done, total)` callback.
"""

from ..base.runtime import Progress
from .disk import DISK_TEST_BYTES, filesystem_type, measure_disk_read
from .machine import (EXPERT_BITS, FLOAT_WIDTHS, ExpertSpec, cost_model, measure_expert_compute, measure_expert_throughput,
                      measure_link_bandwidth, measure_machine, pick_group_size, random_expert)
from .profile_file import check_name, measurement_lines, profile_path, profile_text, write_profile
from .search import PROMPT_TEXT, TuneOptions, prompt_ids, tune
from .settings import TIERS, Row, Setting, TuneResult, parse_settings, pick_best

__all__ = ["ExpertSpec", "TuneOptions", "measure_machine", "measure_link_bandwidth", "measure_disk_read", "measure_expert_compute",
           "measure_expert_throughput", "cost_model", "tune", "write_profile", "profile_text", "pick_best", "parse_settings",
           "Setting", "Row", "TuneResult", "EXPERT_BITS",
           # also public: what the CLI and the other modules use
           "Progress", "DISK_TEST_BYTES", "FLOAT_WIDTHS", "PROMPT_TEXT", "TIERS", "filesystem_type", "pick_group_size",
           "random_expert", "prompt_ids", "measurement_lines", "check_name", "profile_path"]
