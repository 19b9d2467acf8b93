"""Cleanup: drop eval-mode dropout calls and dead nodes before export."""

from __future__ import annotations

import torch
import torch.fx

from qdc_export.passes import PassResult

_DROPOUT = (torch.ops.aten.dropout.default,)


def remove_inference_noops_(gm: torch.fx.GraphModule) -> PassResult:
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


def remove_unused_weights_(gm: torch.fx.GraphModule) -> PassResult:
    """Needs: a GraphModule. Guarantees: every parameter and buffer left is read by the graph.

    PT2E's convert (fold_quantize) reads the INT8 weight constants it creates but leaves the float weights
    they replace attached to the module; unused, they would still be exported and saved with the graph
    (a w8a8 SD 1.5 reference.pt2 was 4.3 GB instead of 1.0 GB: 3.4 GB of dead float weights). A re-exported
    graph (the compensation fold) reads every weight through a ``get_attr`` node, also the unused ones: such
    nodes without users are erased first, so that their weights count as unused too."""
    dead = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    for node in dead:
        gm.graph.erase_node(node)
    used = [str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")]
    used_set = set(used)
    removed, freed = [], 0
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if name in used_set or any(name.startswith(u + ".") for u in used):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if attr in owner._parameters or attr in owner._buffers:
            delattr(owner, attr)
            removed.append(name)
            freed += tensor.numel() * tensor.element_size()
    if removed:
        gm.delete_all_unused_submodules()
    if dead or removed:
        gm.recompile()
    return PassResult(gm, bool(removed or dead), {"removed_weights": len(removed), "removed_bytes": freed})


def sink_weight_computations_(gm: torch.fx.GraphModule) -> PassResult:
    """Needs: nothing. Guarantees: every computation on constants only (a weight's DequantizeLinear, INT4
    unpacking, reshapes) runs right before its first user, so one layer's dequantized FP32 weight is alive at a
    time. Why: PT2E places weight dequantization at the top of the graph (next to the weights' get_attr), so a
    forward of the reference graph held every layer's FP32 weight at once (measured on SD 1.5: +3.3 GB, the
    whole FP UNet; SDXL's parity check went past 21 GB on it)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    constant: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and node.all_input_nodes
                                     and all(n in constant for n in node.all_input_nodes)):
            constant.add(node)
    moved = 0
    for node in reversed(list(gm.graph.nodes)):  # users first, so chains of constant ops travel together
        if node.op != "call_function" or node not in constant or not node.users:
            continue
        first_user = min(node.users, key=lambda user: order.get(user, len(order)))
        if node.next is not first_user:
            first_user.prepend(node)
            moved += 1
            order = {n: i for i, n in enumerate(gm.graph.nodes)}  # positions changed
    if moved:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, moved > 0, {"moved": moved})
