"""From logits to text: the decode loop, sampling and penalties, batching, constrained decoding,
the tokenizer and chat template, generation defaults."""
