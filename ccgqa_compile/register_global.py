"""``import ccgqa_compile.register_global`` opts plain ``torch.compile(model)`` into our passes.

Undo with ``ccgqa_compile.unregister_global()``.
"""

from .backend import register_global

register_global()
