"""Importing this package registers every ``torch.ops.ccgqa.*`` op."""

from . import ccgqa_prologue, ccgqa_seed_prologue, gqa_attention, rms_norm, rope, swiglu  # noqa: F401
