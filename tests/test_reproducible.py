"""Reproducible builds: the same model, options and seed give byte-identical artifacts (model.onnx,
reference.pt2, parity.json, compensation tables) and the same manifest ``content_sha256``; only the
unhashed keys (creation time, stage timings) may differ. The twin builds carry TCEC tables (fitted, folded,
saved): the held-out check is off so that the tiny random-weight model keeps them."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from qdc_export.build import build
from qdc_export.config import BuildConfig
from qdc_export.infra.reproducible import save_program
from qdc_export.manifest import MANIFEST, UNHASHED_KEYS, sha256_file

FAST = {"steps": 4, "calib_samples": 2, "parity_samples": 1}  # as tests/conftest.py


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


@pytest.fixture(scope="module")
def twin_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    config = BuildConfig(precision="w8a8", compensation="tcec", comp_validate=False, **FAST)
    return [build("tiny-unet2d", config, root / name, write_report=False).out for name in ("a", "b")]


def test_same_inputs_give_identical_artifacts_and_manifest(twin_builds):
    a, b = twin_builds
    files_a, files_b = _files(a), _files(b)
    tables = {"compensation/compensation.json", "compensation/compensation.safetensors"}
    assert {"model.onnx", "reference.pt2", "parity.json"} | tables <= set(files_a)
    differing = sorted(k for k in files_a.keys() | files_b.keys() if files_a.get(k) != files_b.get(k))
    assert not differing, f"artifacts differ between identical builds: {differing}"
    man_a, man_b = (json.loads((d / MANIFEST).read_text()) for d in (a, b))
    assert man_a["content_sha256"] == man_b["content_sha256"]
    strip = lambda m: {k: v for k, v in m.items() if k not in UNHASHED_KEYS}
    assert strip(man_a) == strip(man_b)
    assert man_a["artifacts"] == files_a  # the manifest hashes what is on disk
    assert man_a["compensation"]["folded"] and man_a["compensation"]["method"] == "tcec-m0"


def test_reference_archive_has_no_run_specific_records(twin_builds):
    with zipfile.ZipFile(twin_builds[0] / "reference.pt2") as archive:
        assert archive.testzip() is None  # CRCs valid after the serialization id rewrite
        model_json = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        assert "graph_id" not in archive.read(model_json).decode()


def test_serialization_id_rewrite_depends_on_content(tmp_path):
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full((3,), scale))

        def forward(self, x):
            return x * self.weight

    ids = []
    for scale, name in ((1.0, "a"), (1.0, "b"), (2.0, "c")):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "reference.pt2"  # the archive's record names start with the file's stem
        save_program(torch.export.export(Tiny(scale), (torch.ones(3),)), path)
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None
            ids.append(archive.read(next(n for n in archive.namelist() if n.endswith(".data/serialization_id"))))
        assert torch.allclose(torch.export.load(str(path)).module()(torch.ones(3)), torch.full((3,), scale))
    assert ids[0] == ids[1] != ids[2]


def test_reference_holds_only_weights_the_graph_reads(twin_builds):
    """PT2E's convert leaves the float weights it replaced by INT8 constants on the module; the build drops
    them (passes.cleanup.remove_unused_weights), so reference.pt2 is not a second copy of the FP weights."""
    import torch

    from qdc_export.check.folder import load_reference

    load_reference(twin_builds[0] / "reference.pt2")  # registers the quantized ops needed to deserialize
    program = torch.export.load(str(twin_builds[0] / "reference.pt2"))
    lifted = set(program.graph_signature.inputs_to_parameters) | set(program.graph_signature.inputs_to_buffers)
    unused = [n.name for n in program.graph.nodes if n.op == "placeholder" and n.name in lifted and not n.users]
    assert lifted and not unused, f"{len(unused)} weights saved but never read: {unused[:5]}"
    assert not any(p.dtype == torch.float32 and p.dim() == 4 and p.shape[0] > 8 and name.endswith("resnets.0.conv1.weight")
                   for name, p in program.state_dict.items())


def test_reference_archive_names_no_machine_path(twin_builds):
    """Stack traces in reference.pt2 name files relative to the checkout or site-packages, so a build from another
    folder gives the same bytes (before this, /work/a/src/... and /work/b/src/... made the archives differ)."""
    checkout = str(Path(__file__).resolve().parents[1])
    with zipfile.ZipFile(twin_builds[0] / "reference.pt2") as archive:
        model_json = archive.read(next(n for n in archive.namelist() if n.endswith("models/model.json"))).decode()
    assert "qdc_export/compensation/fold.py" in model_json  # the traces are kept, only their prefix goes
    assert checkout not in model_json and "site-packages/" not in model_json
