"""Importing this package registers every ``torch.ops.ccgqa.*`` op."""

from . import (  # noqa: F401
    ccgqa_prologue,
    gqa_attention,
    gqa_decode,
    rms_norm,
    rope,
    swiglu,
)
