"""Mixtral (8x7B, 8x22B): the reference family; softmax router, top-k renormalised, no extras."""

from .family import Family

FAMILY = Family(
    model_type="mixtral",
    router="block_sparse_moe.gate",
    experts="block_sparse_moe.experts.{e}.",
    matrices=("w1", "w3", "w2"),
)
