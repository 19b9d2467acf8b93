"""quantize/half.py against an independent FP16 computation: diffusers' own UNet in half precision (which keeps
the timestep sinusoid in FP32 and casts it to the model dtype, as the pass does)."""

import copy

import numpy as np
import torch

from qdc_export.capture import capture
from qdc_export.load.models import load_model
from qdc_export.metrics import error_stats
from qdc_export.quantize.half import to_half_

SNR_DB_MIN = 60.0  # same ops in the same dtype; left: op-order / fused-kernel rounding differences only


def test_half_graph_matches_diffusers_in_fp16():
    model = load_model("tiny-unet2d")
    gm, example = capture(model.unet, model.adapter)
    names = [s.name for s in model.adapter.input_specs(model.unet)]
    result = to_half_(gm, example, names)
    assert result.details["input_casts"] == 1 and result.details["mixed_dtype_casts"] >= 1
    half_unet = copy.deepcopy(model.unet).half().eval()
    torch.manual_seed(0)
    sample = torch.randn(2, *example[0].shape[1:])
    timestep = torch.tensor([999.0, 17.0])  # large t: an FP16 sinusoid would be off by whole radians
    with torch.no_grad():
        ours = gm(sample, timestep)
        ours = ours[0] if isinstance(ours, (tuple, list)) else ours
        reference = model.adapter.wrap(half_unet)(sample.half(), timestep).float()
        fp32 = model.adapter.wrap(model.unet)(sample, timestep)
    assert ours.dtype == torch.float32  # engine I/O stays FP32
    stats = error_stats(reference.numpy(), ours.numpy())
    print("fp16 graph vs diffusers fp16:", stats)
    assert stats["snr_db"] >= SNR_DB_MIN, stats
    # and it is a half-precision network: further from FP32 than from diffusers' FP16
    assert error_stats(fp32.numpy(), ours.numpy())["snr_db"] < stats["snr_db"]
    assert np.isfinite(ours.numpy()).all()
