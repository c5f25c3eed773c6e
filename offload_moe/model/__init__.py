"""The transformer: attention, norms, the KV cache and its slots, the MoE block; it sees experts only
through `expert_interface`."""
