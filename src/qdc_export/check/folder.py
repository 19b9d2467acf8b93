"""``qdc-export check DIR``: rebuild the parity case from a build folder (manifest, model.onnx,
reference.pt2, and the FP model named by the manifest) and run :func:`qdc_export.check.parity.run_parity`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch

from qdc_export.check.goldens import compare_against, save_goldens
from qdc_export.check.head import check_head
from qdc_export.check.parity import ParityCase, ParityTolerances, run_parity
from qdc_export.engines.runners import backend_runner
from qdc_export.engines.select import open_engine as open_build_engine
from qdc_export.errors import UserError
from qdc_export.infra.memory import log_resident, release_memory
from qdc_export.load.models import LoadedModel, load_model
from qdc_export.load.plugins.base import COMP_STATE
from qdc_export.manifest import read_manifest, verify_artifacts
from qdc_export.precision import PrecisionPlan
from qdc_export.sampling import TorchDenoiser, make_scheduler

PARITY_SEED_OFFSET = 50_000


def load_onnx_checked(path: Path) -> onnx.ModelProto:
    """Load and validate an ONNX file; a corrupt or foreign file is a one-line user error."""
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))
    except Exception as exc:  # protobuf DecodeError, ValidationError, ...
        raise UserError(f"{path} is not a valid ONNX model: {str(exc).splitlines()[0][:200]}") from None
    return model


def check_io_matches(proto: onnx.ModelProto, manifest: dict[str, Any], path: Path) -> None:
    """A valid ONNX model that is not this build's (foreign or swapped in) is a one-line user error."""
    for kind, values in (("inputs", proto.graph.input), ("outputs", proto.graph.output)):
        found = [v.name for v in values]
        expected = [i["name"] for i in manifest["io"][kind]]
        if found != expected:
            raise UserError(f"{path} does not belong to this build: its {kind} are {found}, the manifest's {expected}")


def load_reference(path: Path) -> Any:
    import torchao.quantization.pt2e  # noqa: F401  registers the quantized_decomposed ops used by the graph

    import qdc_export.quantize.int4  # noqa: F401  registers the qdc:: INT4 ops used by INT4 graphs

    try:
        return torch.export.load(str(path)).module()
    except Exception as exc:
        raise UserError(f"cannot load PyTorch reference graph {path}: {str(exc).splitlines()[0][:200]}") from None


def model_source_arg(manifest: dict[str, Any]) -> str:
    source = manifest["model"]["source"]
    return source["path"] if source["kind"] == "folder" else source["name"]


def model_for_build(manifest: dict[str, Any]) -> LoadedModel:
    """The source model with the scheduler config the build recorded (the model's own plus its overrides), so a
    later check or report samples as the build did, even where the config came from ``--scheduler-config``."""
    recorded = manifest["scheduler"]
    model = load_model(model_source_arg(manifest), recorded.get("source_config"))
    model.scheduler_config = {**model.scheduler_config, **recorded.get("overrides", {})}
    return model


def check_build(folder: Path, *, model: LoadedModel | None = None, seeds: list[int] | None = None,
                tolerances: ParityTolerances | None = None, provider: str = "cpu",
                save_goldens_to: Path | None = None, release_model: bool = False) -> dict[str, Any]:
    """Parity of the build's ONNX model (ONNX Runtime, ``provider``) against its PyTorch reference graph;
    optionally saves the step inputs and ONNX Runtime's outputs as goldens for ``check --against``.

    ``release_model``: free the weights of a caller's ``model`` once the FP trajectories are taken (the build
    does, so a full-size FP UNet is not resident next to the reference graph and the engine). A model this
    function loads itself is always released."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_artifacts(folder, manifest)
    check_io_matches(load_onnx_checked(folder / "model.onnx"), manifest, folder / "model.onnx")
    if model is None:
        model, release_model = model_for_build(manifest), True
    build = manifest["build"]
    cond_names = manifest["conditioning"]["names"]

    def release_fp() -> None:
        log_resident("check: FP trajectories taken")
        if release_model:
            model.release_weights()
        release_memory()
        log_resident("check: FP weights released")

    def open_reference() -> Any:
        module = load_reference(folder / "reference.pt2")
        log_resident("check: reference graph loaded")
        return module

    def open_engine() -> Any:
        session = open_build_engine(folder / "model.onnx", provider=provider, cpu_mem_arena=False)
        log_resident("check: ONNX Runtime session created")
        return session

    case = ParityCase(
        fp=lambda: TorchDenoiser(model.adapter.wrap(model.unet).eval(), cond_names),
        release_fp=release_fp,
        open_reference=open_reference,
        open_engine=open_engine,
        cond_names=cond_names,
        stateful=any(i["name"] == COMP_STATE for i in manifest["io"]["inputs"]),
        scheduler=make_scheduler(build["scheduler"], model.scheduler_config),
        steps=int(build["steps"]),
        latent_shape=tuple(manifest["io"]["inputs"][0]["shape"][1:]),
        conditioning=model.conditioning,
        quantized=PrecisionPlan.parse(build["precision"]).quantized,
    )
    seeds = seeds or [PARITY_SEED_OFFSET + i for i in range(int(build["parity_samples"]))]
    run = run_parity(case, seeds, tolerances)
    if manifest.get("compensation", {}).get("folded"):
        # the head is exact arithmetic: elementwise against the build's tables (a statistical check cannot see it)
        head = check_head(folder / "model.onnx", folder / "compensation", case.latent_shape, provider=provider)
        run.report["compensation_head"] = head
        run.report["passed"] = bool(run.report["passed"] and head["passed"])
    if save_goldens_to is not None:
        save_goldens(Path(save_goldens_to), run.feeds, run.results, precision=build["precision"])
    return run.report


def check_against(folder: Path, goldens: Path, *, backend: str = "onnxruntime", provider: str = "cpu",
                  tolerances: ParityTolerances | None = None) -> dict[str, Any]:
    """Run this machine's backend on the goldens' step inputs and compare with the saved outputs."""
    folder = Path(folder)
    verify_artifacts(folder, read_manifest(folder))
    if not Path(goldens).is_file():
        raise UserError(f"goldens file {goldens} does not exist")
    return compare_against(Path(goldens), backend_runner(folder, backend, provider), tolerances)
