"""Each pass on a real captured diffusers UNet: what it changes, and that it says so honestly."""

import pytest
import torch

from qdc_export.capture import capture
from qdc_export.config import BuildConfig
from qdc_export.load.models import load_model
from qdc_export.metrics import error_stats
from qdc_export.passes import count_targets
from qdc_export.quantize.cleanup import remove_inference_noops_
from qdc_export.quantize.graph import quantization_plan
from qdc_export.quantize.qdq import insert_observers_, materialize_qdq_


@pytest.fixture
def captured():  # fresh per test: prepare_pt2e may mutate its input graph
    model = load_model("tiny-sd")
    gm, example = capture(model.unet, model.adapter)
    return model, gm, example


def test_capture_matches_eager_and_keeps_batch_dynamic(captured):
    model, gm, _ = captured
    wrapped = model.adapter.wrap(model.unet)
    for batch in (1, 3):
        inputs = model.adapter.example_inputs(model.unet, batch=batch, seed=batch)
        with torch.no_grad():
            assert torch.equal(gm(*inputs), wrapped(*inputs))


def test_cleanup_reports_honestly():
    """Judged from the graph, not from the pass's own details: the captured UNet has eval-mode dropouts (counted
    here), the pass removes exactly those, the outputs stay bit-identical, and ``modified`` is True exactly when
    the graph's nodes changed (first run) and False when they did not (second run)."""
    model = load_model("tiny-unet2d")
    gm, example = capture(model.unet, model.adapter)
    with torch.no_grad():
        before_out = gm(*example)
    before = [(n.op, str(n.target)) for n in gm.graph.nodes]
    dropouts = before.count(("call_function", "aten.dropout.default"))
    assert dropouts > 0, "tiny-unet2d's captured graph should carry eval-mode dropout calls"
    first = remove_inference_noops_(gm)
    after = [(n.op, str(n.target)) for n in first.module.graph.nodes]
    assert ("call_function", "aten.dropout.default") not in after
    assert len(before) - len(after) >= dropouts and first.modified == (after != before) and first.modified
    with torch.no_grad():
        assert torch.equal(first.module(*example), before_out)  # eval-mode dropout is the identity
    second = remove_inference_noops_(first.module)
    again = [(n.op, str(n.target)) for n in second.module.graph.nodes]
    assert again == after and second.modified is False


def test_observers_follow_tensorrt_placement_and_skip_float_layers(captured):
    model, gm, example = captured
    plan = quantization_plan(BuildConfig(), model)
    result = insert_observers_(gm, plan)
    assert result.modified and result.details["observers"] > 0
    layers = result.products["quantized_layers"]
    assert layers and all("time_emb" not in name and name not in ("conv_in", "conv_out") for name in layers)
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= set(result.products["float_layers"])
    result.module(*example)
    converted = materialize_qdq_(result.module)
    assert converted.modified
    counts = count_targets(converted.module)
    # One per-channel INT8 weight DQ per quantized layer; activations per-tensor.
    assert counts["quantized_decomposed.dequantize_per_channel.default"] == len(layers)
    assert counts["quantized_decomposed.quantize_per_tensor.default"] >= 1
    with torch.no_grad():
        stats = error_stats(gm(*example).numpy(), converted.module(*example).numpy())
    assert stats["snr_db"] > 15.0, f"INT8 Q/DQ graph vs float: {stats}"


def test_timestep_path_is_never_quantized(captured):
    model, gm, example = captured
    result = insert_observers_(gm, quantization_plan(BuildConfig(), model))
    timestep = [n for n in result.module.graph.nodes if n.op == "placeholder"][1]
    frontier, seen = [timestep], set()
    while frontier:  # walk forward from the timestep until the first Conv/Linear consumer
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            assert not (user.op == "call_module" and "activation_post_process" in str(user.target)), \
                f"observer on the timestep path at {user}"
            if user.op == "call_function" and user.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default):
                continue
            frontier.append(user)


def test_include_and_exclude_globs_change_the_plan(captured):
    model, gm, _ = captured
    plan = quantization_plan(BuildConfig(exclude=("down_blocks.*",), include=("conv_in",)), model)
    result = insert_observers_(gm, plan)
    layers = result.products["quantized_layers"]
    assert "conv_in" in layers and not any(n.startswith("down_blocks.") for n in layers)


def test_sampler_scales_the_starting_noise_of_the_set_schedule():
    """Euler's init_noise_sigma is only right after set_timesteps (else the largest training sigma)."""
    from qdc_export.load.models import load_model
    from qdc_export.sampling import TorchDenoiser, initial_latents, make_scheduler, run_sampler

    model = load_model("tiny-unet2d")
    # The reference model's schedule (cosine, "leading" spacing) is where the two values differ.
    scheduler = make_scheduler("euler", load_model("digits-uncond").scheduler_config)
    denoiser = TorchDenoiser(model.adapter.wrap(model.unet), [])
    noise = initial_latents((3, 16, 16), [0])
    traj = run_sampler(denoiser, scheduler, 3, noise, {}, None)
    import copy

    expected = copy.deepcopy(scheduler)
    expected.set_timesteps(3)
    ratio = float(traj.latents[0].std() / noise.std())
    assert abs(ratio - float(expected.init_noise_sigma)) < 1e-3 * ratio, (ratio, float(expected.init_noise_sigma))
    assert float(expected.init_noise_sigma) < float(scheduler.init_noise_sigma)  # the bug this guards against


@pytest.mark.parametrize("precision", ["w8a8", "w4a16"])
def test_sink_weight_computations_puts_each_weight_op_next_to_its_user_and_keeps_outputs(precision):
    from qdc_export.quantize.cleanup import remove_unused_weights_, sink_weight_computations_
    from qdc_export.quantize.graph import build_graph

    model = load_model("tiny-sd")
    gm, example, _ = build_graph(model, BuildConfig(precision=precision, steps=2, calib_samples=1))
    remove_unused_weights_(gm)
    with torch.no_grad():
        before = gm(*example)
    result = sink_weight_computations_(gm)
    with torch.no_grad():
        after = gm(*example)
    assert torch.equal(before, after)  # a reordering: bit-identical
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    weight_ops = [n for n in nodes if n.op == "call_function" and n.all_input_nodes
                  and all(i.op == "get_attr" for i in n.all_input_nodes)]
    assert weight_ops, "the quantized graph has weight computations"
    for node in weight_ops:  # its first user follows, possibly after the rest of its constant chain
        first_user = min(node.users, key=position.__getitem__)
        between = nodes[position[node] + 1:position[first_user]]
        assert all(b.op == "get_attr" or b in weight_ops or all(i.op != "placeholder" for i in b.all_input_nodes)
                   for b in between), (node.name, [b.name for b in between])
        assert len(between) <= 8, (node.name, [b.name for b in between])
    assert sink_weight_computations_(gm).modified is False  # idempotent
    # PT2E puts every weight dequantization at the top of the graph; the INT4 pass already inserts its own
    # right before the layer, so there is nothing to move
    assert result.modified == (precision == "w8a8") == (result.details["moved"] > 0), result.details
