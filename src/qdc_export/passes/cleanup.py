"""Cleanup: drop eval-mode dropout calls and dead nodes before export."""

from __future__ import annotations

import torch
import torch.fx

from .base import PassResult

_DROPOUT = (torch.ops.aten.dropout.default,)


def remove_inference_noops(gm: torch.fx.GraphModule) -> PassResult:
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _DROPOUT:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
            if not train:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
    dead = gm.graph.eliminate_dead_code()
    if removed or dead:
        gm.recompile()
    return PassResult(gm, bool(removed or dead), {"removed_dropout": removed})
