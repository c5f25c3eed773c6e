"""The bottom layer: errors, the runtime's devices, sizes and free memory, threads, timing, user files.
Imports nothing of offload_moe above it."""
