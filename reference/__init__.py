"""The golden naive NSA (PyTorch + einops, float32). Every kernel is validated against it."""
from .naive import (
    compress_kv,
    compressed_attention,
    compressed_cu_seqlens,
    low_precision,
    masked_attention,
    naive_nsa,
    naive_nsa_branches,
    naive_nsa_full,
    num_compressed,
    overlap_matrix,
    select_blocks,
    selection_scores,
    token_positions,
)

__all__ = [
    "compress_kv",
    "compressed_attention",
    "compressed_cu_seqlens",
    "low_precision",
    "masked_attention",
    "naive_nsa",
    "naive_nsa_branches",
    "naive_nsa_full",
    "num_compressed",
    "overlap_matrix",
    "select_blocks",
    "selection_scores",
    "token_positions",
]
