"""qdc-export: a deployment compiler for quantized diffusion UNets.

Pipeline (one module per stage, imports flow left to right):
    plugins (model adapters) -> capture (torch.export) -> passes (pure graph transforms)
    -> calibrate (sampler trajectories) -> export (ONNX opset 21 Q/DQ) -> engines -> check -> report
"""

__version__ = "0.1.0"
