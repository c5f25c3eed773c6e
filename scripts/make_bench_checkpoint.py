"""Build the Mixtral-shaped benchmark checkpoint of issue 15 with transformers (random weights).

8 layers, 8 experts top-2, hidden 1024, intermediate 2816, 8 query / 2 key-value heads, vocab 4096
(the demo's tokenizer), bf16, ~583 M parameters. Used by scripts/llamacpp_side_by_side.sh.

    python scripts/make_bench_checkpoint.py OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

DEMO = Path(__file__).resolve().parent.parent / "offload_moe" / "demo"


def main(out: Path) -> None:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        rope_theta=1e6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = MixtralForCausalLM(cfg).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, out / name)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_bench_checkpoint.py OUT_DIR")
    main(Path(sys.argv[1]))
