"""einops calls Dynamo keeps whole, written out as the torch ops they run.

Where Dynamo does not trace into einops (torch before 2.12 with einops 0.8, whose
``_torch_specific`` registers nothing for torch >= 2.8, so Dynamo's fallback marks
``rearrange``/``repeat``/``reduce``/``einsum`` ``allow_in_graph``), each call is one opaque
node: a CCGQA block written with ``rearrange`` then hides its conv layout and head views
from the recognizers, which read layout ops. Each such call is replayed on its example
values under a ``TorchFunctionMode`` that records the torch calls einops makes
(``reshape``, ``permute``, ``unsqueeze``, ``expand``, ``sum``...), and the node is replaced
by those calls: the same ops Dynamo records when it traces einops itself. Calls whose
recording holds symbolic sizes, or ops that are neither tensor methods nor ``torch``
functions, are left as they are.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node
from torch.overrides import TorchFunctionMode

from .common import GraphContext
from .fx_util import graph_changed, value


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


class _Opaque(Exception):
    """A recorded call that cannot be written back as a graph node."""


def _is_einops_call(node: Node) -> bool:
    module = getattr(node.target, "__module__", None) or ""
    return node.op == "call_function" and (module == "einops" or module.startswith("einops."))


def _plain(x: Any, env: dict[int, Node]) -> Any:
    """A recorded argument as a graph argument: tensors by their nodes, constants as is."""
    if isinstance(x, torch.Tensor):
        if id(x) not in env:
            raise _Opaque("a tensor made outside the recording")
        return env[id(x)]
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise _Opaque("a symbolic size")
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(i, env) for i in x)
    if isinstance(x, dict):
        return {k: _plain(v, env) for k, v in x.items()}
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device)):
        return x
    raise _Opaque(f"an argument of type {type(x).__name__}")


def _write_out(graph: torch.fx.Graph, node: Node) -> bool:
    env = {id(value(n)): n for n in node.all_input_nodes if isinstance(value(n), torch.Tensor)}
    args = torch.fx.node.map_arg(node.args, value)
    kwargs = torch.fx.node.map_arg(node.kwargs, value)
    try:
        with _Recorder() as recorder:
            out = node.target(*args, **kwargs)
    except Exception:
        return False
    if not isinstance(out, torch.Tensor):
        return False
    new: list[Node] = []
    try:
        with graph.inserting_before(node):
            for func, a, k, result in recorder.calls:
                if not isinstance(result, torch.Tensor):
                    if isinstance(result, (list, tuple)) and any(isinstance(r, torch.Tensor) for r in result):
                        raise _Opaque("a call returning several tensors")
                    continue  # a size or a dtype read: already in the recorded arguments
                name = getattr(func, "__name__", "")
                a, k = _plain(a, env), _plain(k, env)
                if func in (torch.Tensor.__getitem__, torch._C.TensorBase.__getitem__):
                    made = graph.call_function(operator.getitem, a, k)
                elif func in (getattr(torch.Tensor, name, None), getattr(torch._C.TensorBase, name, None)):
                    made = graph.call_method(name, a, k)
                elif getattr(torch, name, None) is func:
                    made = graph.call_function(func, a, k)
                else:
                    raise _Opaque(f"{func} is neither a tensor method nor a torch function")
                made.meta["example_value"] = result
                new.append(made)
                env[id(result)] = made
            if id(out) not in env:
                raise _Opaque("the result is not one of the recorded calls'")
    except _Opaque:
        for n in reversed(new):
            graph.erase_node(n)
        return False
    node.replace_all_uses_with(env[id(out)])
    graph.erase_node(node)
    return True


def run(ctx: GraphContext) -> None:
    changed = False
    for node in list(ctx.graph.nodes):
        if _is_einops_call(node) and _write_out(ctx.graph, node):
            changed = True
    if changed:
        graph_changed()
