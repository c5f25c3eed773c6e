"""Mixtral (8x7B, 8x22B): the reference family; softmax router, top-k renormalised, no extras."""

from .family import Family
from .reader import ConfigReader, common_fields


def parse(r: ConfigReader) -> dict:
    return dict(**common_fields(r, experts="num_local_experts"),
                sliding_window=r.int("sliding_window", None))


FAMILY = Family(
    model_type="mixtral",
    parse=parse,
    router="block_sparse_moe.gate",
    experts="block_sparse_moe.experts.{e}.",
    matrices=("w1", "w3", "w2"),
)
