"""Plain ``torch.distributions.Transform``s (the math): monotone 1-D families, the triangular
layer, affine maps, composition and displacement interpolation. All maps go ``z -> x``."""

from krflows.transforms.autoregressive import AutoregressiveTransform
from krflows.transforms.base import ComposeTriangular, Permutation, TriangularTransform
from krflows.transforms.interpolate import Interpolated, interpolate_affine
from krflows.transforms.linear import AffineMatrixTransform, LowerAffineTransform, affine_parts
from krflows.transforms.monotone import (
    FAMILIES,
    Affine,
    Bernstein,
    Integrated,
    MonotoneFamily,
    Spline,
)
from krflows.transforms.sparse import PlateLayout, SparseAffineTransform, SparseAutoregressiveTransform

__all__ = [
    "TriangularTransform", "ComposeTriangular", "Permutation", "AutoregressiveTransform",
    "LowerAffineTransform", "AffineMatrixTransform", "affine_parts", "Interpolated", "interpolate_affine",
    "MonotoneFamily", "Affine", "Spline",
    "Bernstein", "Integrated", "FAMILIES",
    "PlateLayout", "SparseAutoregressiveTransform", "SparseAffineTransform",
]
