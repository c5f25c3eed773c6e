"""Offline tools beside the runtime: the quantize command's converter (`convert`) and routing
traces for the benchmarks (`trace`). Nothing in the runtime imports them."""
