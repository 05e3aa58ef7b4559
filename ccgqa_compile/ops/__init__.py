"""Importing this package registers every ``torch.ops.ccgqa.*`` op."""

from . import rms_norm, rope, swiglu  # noqa: F401
