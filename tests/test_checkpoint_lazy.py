"""Opening a checkpoint reads headers only: a multi-GB file opens with little resident memory."""

import json
import struct

import torch

from offload_moe.checkpoints.checkpoint import Checkpoint


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def write_sparse_checkpoint(directory, hidden=1024, intermediate=4096, layers=8, experts=16, vocab=1000):
    """A bf16 Mixtral-shaped checkpoint of several GB whose data is a hole in a sparse file."""
    cfg = dict(model_type="mixtral", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=8, num_key_value_heads=8, num_local_experts=experts, num_experts_per_tok=2,
               vocab_size=vocab, torch_dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden],
              "lm_head.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = [hidden, hidden]
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = [hidden]
        shapes[p + "block_sparse_moe.gate.weight"] = [experts, hidden]
        for e in range(experts):
            q = p + f"block_sparse_moe.experts.{e}."
            shapes[q + "w1.weight"] = shapes[q + "w3.weight"] = [intermediate, hidden]
            shapes[q + "w2.weight"] = [hidden, intermediate]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return 8 + len(blob) + offset


def test_open_reads_headers_only(tmp_path):
    size = write_sparse_checkpoint(tmp_path)
    assert size > 3e9
    before = rss_bytes()
    ckpt = Checkpoint(tmp_path)
    opened = rss_bytes()
    expert = ckpt.expert(2, 5)  # one expert: 3 x 8 MB
    after_one = rss_bytes()
    assert opened - before < 50e6, f"opening {size / 1e9:.1f} GB grew RSS by {(opened - before) / 1e6:.0f} MB"
    assert after_one - opened < 100e6
    assert expert["w1"].shape == (4096, 1024) and expert["w1"].dtype == torch.bfloat16
