"""Fold the compensation head into the captured graph: the model's raw output eps~ goes through
Gather(table, row(timestep)) -> Mul/Sub, so the PyTorch reference and the ONNX model share one graph.

    noise_pred = scale[r] * eps~ - prev[r] * comp_state - bias[r],   comp_state_out = eps~
    r = row(timestep): nearest schedule timestep within tolerance, else the identity row N

Tables are indexed by step row; rows are reached through the timestep *value* (what diffusers feeds).
When the tables use state (m=1 variants) the graph gains the input ``comp_state`` (last) and the output
``comp_state_out``; otherwise its interface is unchanged. The head is inlined by re-capturing the
composition with torch.export, so the result is one flat graph (no submodule calls). The formula itself is
:func:`qdc_export.compensation.tables.compensate_rows`, the same code the tables' own head runs."""

from __future__ import annotations

import torch
import torch.fx

from qdc_export.compensation import CompensationTables
from qdc_export.compensation.tables import compensate_rows
from qdc_export.load.plugins.base import HEAD_PREFIX  # noqa: F401  (the head's module name: self.head below)
from qdc_export.passes import PassResult, require

_TIMESTEP_INPUT = 1  # engine inputs: sample, timestep, conditioning...


class _Compensated(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, tables: CompensationTables) -> None:
        super().__init__()
        self.model, self.head = model, tables.head()
        self.stateful = tables.uses_state

    def forward(self, *inputs: torch.Tensor):
        if self.stateful:
            *model_inputs, state = inputs
        else:
            model_inputs, state = list(inputs), None
        eps_q = self.model(*model_inputs)
        timestep = model_inputs[_TIMESTEP_INPUT]
        if self.stateful:
            return self.head(eps_q, timestep, state)
        # Stateless tables (prev == 0): skip the state term rather than multiply a zero tensor.
        return compensate_rows(self.head.scale, None, self.head.bias, self.head.rows(timestep), eps_q, None)


def fold_compensation(gm: torch.fx.GraphModule, tables: CompensationTables,
                      example: tuple[torch.Tensor, ...]) -> PassResult:
    """Needs: a graph with positional engine inputs and one output eps~ of C channels matching the tables.
    Guarantees: a new module (``gm`` is left as it was) with the lookup-plus-add subgraph on the output;
    ``products["example"]``: the example inputs, extended by a zero comp_state when the tables use state."""
    with torch.no_grad():
        out = gm(*example)
    require(isinstance(out, torch.Tensor) and out.shape[1] == tables.scale.shape[1], "fold_compensation",
            f"model output {tuple(getattr(out, 'shape', ()))} does not match tables with {tables.scale.shape[1]} channels")
    if tables.is_identity:
        return PassResult(gm, False, {"stateful": False}, {"example": example})
    wrapper = _Compensated(gm, tables)  # no .eval(): exported graphs refuse train/eval switches
    new_example = (*example, torch.zeros_like(out)) if wrapper.stateful else example
    dims = tuple({0: torch.export.Dim.AUTO} for _ in new_example)  # forward(*inputs): one varargs entry
    with torch.no_grad():
        folded = torch.export.export(wrapper, new_example, dynamic_shapes=(dims,), strict=False).module()
    return PassResult(folded, True, {"stateful": wrapper.stateful, "method": tables.method}, {"example": new_example})
