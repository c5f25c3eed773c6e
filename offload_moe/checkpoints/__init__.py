"""Files to tensors and configs: safetensors and GGUF checkpoints, the families' config readers and
tensor names, Hugging Face repo ids, synthetic checkpoints of real shapes."""
