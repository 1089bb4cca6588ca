"""Inversion solvers: the final layer's anchored lasso (FISTA, interior point) and the full-generator latent search."""

from .lasso import InversionResult, LassoOptions, solve_lasso

__all__ = ["InversionResult", "LassoOptions", "solve_lasso"]
