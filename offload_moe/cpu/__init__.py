"""CPU kernels for expert matrices (`kernels`): the forms the CPU multiplies fastest. The CPU tier
that decides which experts the CPU computes lives with the engine (`experts/cpu_tier.py`)."""
