"""EngineUNet on its own (state per row, reset per generation, the schedule guard, running without compensation)
and the Triton model repository, every config.pbtxt parsed with Triton's own ModelConfig protobuf."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from qdc_export.cli import main
from qdc_export.engines.onnxruntime import OrtDenoiser
from qdc_export.manifest import MANIFEST, read_manifest, sha256_file, write_manifest
from qdc_export.sampling import make_scheduler
from qdc_export.serving import EngineUNet, ScheduleMismatchError, schedule_mismatch
from qdc_export.serving.triton import write_repository

STATEFUL = dict(compensation="tcec", tcec_variant="m1-fitted", comp_validate=False)


@pytest.fixture(scope="module")
def stateful(build_factory):
    result = build_factory("tiny-unet2d", "w8a8", **STATEFUL)
    assert result.manifest["compensation"]["stateful"]
    return result


def _inputs(result, batch: int, seed: int = 0) -> list[torch.Tensor]:
    shape = tuple(result.manifest["io"]["inputs"][0]["shape"][1:])
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, *shape), generator=gen) for _ in result.manifest["scheduler"]["timesteps"]]


def _errors(a, b) -> str:
    d = (a.double() - b.double()).abs().flatten()
    return f"max {float(d.max()):.3g} mean {float(d.mean()):.3g} p99 {float(d.quantile(0.99)):.3g}"


def test_state_is_fed_back_per_row_and_reset_per_generation(stateful):
    timesteps = stateful.manifest["scheduler"]["timesteps"]
    unet = EngineUNet.from_build(stateful.out)
    samples = _inputs(stateful, 2)
    reference = OrtDenoiser.from_path(stateful.out / "model.onnx")  # the project's loop: it feeds state back
    reference.reset(2)
    for _ in range(2):  # the second generation must start from zero state again
        for x, t in zip(samples, timesteps):
            got = unet(x, torch.tensor(int(t)), return_dict=False)[0]
            want = reference(x, torch.full((2,), float(t)), {})
            assert torch.equal(got, want), _errors(got, want)
        reference.reset(2)
    # each row carries its own state: changing row 0's inputs for a whole generation leaves row 1's outputs
    # unchanged, bit for bit (same batch size, so the same kernels; comparing a batch of one with a row of a batch
    # of two instead measured ONNX Runtime's batch-dependent rounding on this machine: max 0.047 at W8A8, at
    # 21f7422 as well)
    other = [torch.cat([torch.randn(x[:1].shape, generator=torch.Generator().manual_seed(7)), x[1:]]) for x in samples]
    unet.reset()
    first = [unet(x, torch.tensor(float(t))).sample for x, t in zip(samples, timesteps)]
    unet.reset()
    second = [unet(x, torch.tensor(float(t))).sample for x, t in zip(other, timesteps)]
    for a, b in zip(first, second):
        assert not torch.equal(a[:1], b[:1])  # row 0 did change
        assert torch.equal(a[1:], b[1:]), _errors(a[1:], b[1:])


def test_schedule_guard_names_the_mismatch(stateful):
    recorded = read_manifest(stateful.out)["scheduler"]
    steps = recorded["steps"]
    built = make_scheduler(recorded["name"], recorded["config"])
    built.set_timesteps(steps)
    assert schedule_mismatch(recorded, built) is None
    other = DDIMScheduler.from_config(recorded["config"], clip_sample=not recorded["config"]["clip_sample"])
    other.set_timesteps(steps)
    assert "clip_sample" in schedule_mismatch(recorded, other)
    euler = EulerDiscreteScheduler.from_config(recorded["config"])
    euler.set_timesteps(steps)
    assert "class EulerDiscreteScheduler" in schedule_mismatch(recorded, euler)
    built.set_timesteps(steps * 2)
    assert f"{steps * 2} sampling steps, the build was made for {steps}" in schedule_mismatch(recorded, built)

    unet = EngineUNet.from_build(stateful.out, scheduler=other)
    x = _inputs(stateful, 1)[0]
    with pytest.raises(ScheduleMismatchError) as err:
        unet(x, torch.tensor(recorded["timesteps"][0]))
    assert "\n" not in str(err.value) and "clip_sample" in str(err.value)
    bare = EngineUNet.from_build(stateful.out)  # no scheduler known: the timestep sequence is still checked
    with pytest.raises(ScheduleMismatchError, match="schedule starts at"):
        bare(x, torch.tensor(recorded["timesteps"][1]))


def test_schedule_guard_compares_every_timestep_value(stateful):
    """Same scheduler, same step count, one timestep value moved: named with its step (the per-value branch)."""
    recorded = read_manifest(stateful.out)["scheduler"]
    values = [float(t) for t in recorded["timesteps"]]
    built = make_scheduler(recorded["name"], recorded["config"])
    built.set_timesteps(recorded["steps"])
    for step in (0, len(values) // 2, len(values) - 1):
        moved = list(values)
        moved[step] += 1.0
        why = schedule_mismatch(recorded, built, timesteps=moved)
        assert why == f"timestep {moved[step]:g} at step {step}, the build's schedule has {values[step]:g} there"
    assert schedule_mismatch(recorded, built, timesteps=[v + 1e-4 for v in values]) is None  # within TIMESTEP_ATOL


def test_drop_in_refuses_a_generation_that_leaves_the_schedule(stateful):
    """Mid-generation: a timestep that is not the schedule's next one, or a batch that changes between steps, is
    refused with the step it happened at (no pipeline on the stack: the call sequence alone is checked)."""
    values = [float(t) for t in read_manifest(stateful.out)["scheduler"]["timesteps"]]
    x2 = _inputs(stateful, 2)[0]
    unet = EngineUNet.from_build(stateful.out)
    unet(x2, torch.tensor(values[0]))
    unet(x2, torch.tensor(values[1]))  # the schedule's next step: accepted
    with pytest.raises(ScheduleMismatchError, match=f"timestep {values[3]:g} after step 1, the build's schedule "
                                                    f"has {values[2]:g} there"):
        unet(x2, torch.tensor(values[3]))
    unet = EngineUNet.from_build(stateful.out)
    unet(x2, torch.tensor(values[0]))
    with pytest.raises(ScheduleMismatchError, match="batch 1 at step 1, the generation started with batch 2"):
        unet(x2[:1], torch.tensor(values[1]))


def test_allowed_mismatch_runs_the_uncompensated_engine(build_factory, stateful):
    """With allow_schedule_mismatch the drop-in gives the raw quantized output: the same as an engine built
    with the same settings and no compensation (independently built, same calibration)."""
    plain = build_factory("tiny-unet2d", "w8a8")
    assert not plain.manifest["compensation"].get("folded")
    recorded = stateful.manifest["scheduler"]
    foreign = make_scheduler(recorded["name"], recorded["config"])
    foreign.set_timesteps(recorded["steps"] + 3)
    unet = EngineUNet.from_build(stateful.out, scheduler=foreign, allow_schedule_mismatch=True)
    engine = OrtDenoiser.from_path(plain.out / "model.onnx")
    x = _inputs(stateful, 2)[0]
    with pytest.warns(UserWarning, match="without compensation"):
        got = unet(x, torch.tensor(recorded["timesteps"][0])).sample
    want = engine(x, torch.full((2,), recorded["timesteps"][0]), {})
    assert torch.allclose(got, want, atol=1e-5), _errors(got, want)
    compensated = EngineUNet.from_build(stateful.out)(x, torch.tensor(recorded["timesteps"][0])).sample
    assert not torch.allclose(compensated, want, atol=1e-5)  # the tables do change the first step


def _parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _check_config(config: model_config_pb2.ModelConfig, manifest: dict, backend: str) -> None:
    assert config.max_batch_size >= 1 and config.HasField("dynamic_batching")
    for tensors, entries in ((config.input, manifest["io"]["inputs"]), (config.output, manifest["io"]["outputs"])):
        assert [t.name for t in tensors] == [e["name"] for e in entries]
        for t, e in zip(tensors, entries):
            assert t.data_type == model_config_pb2.TYPE_FP32
            dims = [int(d) for d in e["shape"][1:]]
            assert list(t.dims) == (dims or [1]) and (dims or list(t.reshape.shape) == [])
    assert (config.backend == "onnxruntime") if backend == "onnxruntime" else (config.platform == "tensorrt_plan")


def test_triton_repository_configs_parse_into_model_config(build_factory, stateful, tmp_path):
    written = []
    for result in (stateful, build_factory("tiny-unet2d", "w8a8")):
        manifest = read_manifest(result.out)
        configs = write_repository(result.out, tmp_path / "repo", name=f"m{len(written)}")
        for path in configs:
            config = _parse(path)
            assert config.name == path.parent.name
            _check_config(config, manifest, "onnxruntime")
            assert sha256_file(path.parent / "1" / "model.onnx") == manifest["artifacts"]["model.onnx"]
            assert read_manifest(path.parent) == manifest
        written += configs
    names = [[t.name for t in _parse(p).input] for p in written]
    assert names[0][-1] == "comp_state" and "comp_state" not in names[1]  # client-fed state where the build has it


def test_triton_tensorrt_plan_layout(stateful, tmp_path):
    """Where --target tensorrt built a plan, the repository gets a tensorrt_plan model beside the ONNX one."""
    folder = tmp_path / "build"
    shutil.copytree(stateful.out, folder)
    (folder / "model.engine").write_bytes(b"plan bytes")  # the layout only; Triton itself loads the plan
    manifest = read_manifest(folder)
    content = {k: v for k, v in manifest.items() if k not in ("artifacts", "content_sha256", "format_version")}
    content["target"] = {"name": "tensorrt", "engine": "model.engine", "batch_range": [1, 2, 4]}
    write_manifest(folder, content)
    configs = write_repository(folder, tmp_path / "repo")
    assert [p.parent.name for p in configs] == ["tiny-unet2d-w8a8", "tiny-unet2d-w8a8_trt"]
    for path, backend in zip(configs, ("onnxruntime", "tensorrt")):
        config = _parse(path)
        _check_config(config, read_manifest(folder), backend)
        assert config.max_batch_size == 4  # the TensorRT profile's max
    assert (configs[1].parent / "1" / "model.plan").read_bytes() == b"plan bytes"


@pytest.mark.parametrize("old, new", [
    ("data_type: TYPE_FP32", "data_type: TYPE_FLOAT32"),  # no such enum value
    ("max_batch_size:", "max_batch_sizes:"),  # no such field
    ("dims: [ 1 ]", "dims: [ one ]"),  # not an integer
])
def test_malformed_config_fails_the_parse(stateful, tmp_path, old, new):
    path = write_repository(stateful.out, tmp_path / "repo")[0]
    text = path.read_text()
    assert old in text
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text.replace(old, new, 1), model_config_pb2.ModelConfig())


def test_triton_cli(stateful, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["triton", str(stateful.out), "--out", str(tmp_path / "repo")])
    assert ok.exit_code == 0 and "config.pbtxt" in ok.output, ok.output
    again = runner.invoke(main, ["triton", str(stateful.out), "--out", str(tmp_path / "repo")])
    assert again.exit_code == 1 and "--force" in again.output and len(again.output.strip().splitlines()) == 1
    assert (tmp_path / "repo" / "tiny-unet2d-w8a8" / MANIFEST).is_file()
