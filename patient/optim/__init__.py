"""Optimizers: Shampoo as optax transformations, and the matrix inverse roots it needs."""

from .roots import dot_hi_lo, matrix_inverse_pth_root
from .shampoo import GRAFTS, ScaleByShampooState, merge_small_dims, scale_by_shampoo, shampoo

__all__ = [
    "GRAFTS",
    "ScaleByShampooState",
    "dot_hi_lo",
    "matrix_inverse_pth_root",
    "merge_small_dims",
    "scale_by_shampoo",
    "shampoo",
]
