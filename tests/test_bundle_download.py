"""Bundle download for inference: package -> serve (127.0.0.1) -> monai.bundle download --url ->
download_large_files (hash checked) -> inference from the downloaded bundle with a reference-format
SITReg checkpoint as its weights file (converted on load)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow, download, download_large_files

from conftest import fixture_path
from http_server import serve
from monai_ext.checkpoints import convert_sitreg_state_dict
from monai_ext.data.synthesis import write_synthetic_oasis

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("package_bundle", REPO / "scripts" / "package_bundle.py")
package_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(package_bundle)

NAME = "sitreg_oasis"
# the architecture of the reference fixture small_even (model.json): 4 levels, GroupNorm(2), no affine
SMALL_EVEN = {
    "network_def#features": [4, 8, 8, 8],
    "network_def#feature_convolutions": [2, 2, 2, 2],
    "network_def#deformation_features": [8, 16, 16, 16],
    "network_def#deformation_convolutions": [2, 2, 2, 2],
}


def _source_bundle(root: Path, weights_url: str, sha256: str) -> Path:
    bundle = root / NAME
    shutil.copytree(REPO / "bundles" / NAME, bundle, ignore=shutil.ignore_patterns("eval", "models"))
    (bundle / "models").mkdir()
    (bundle / "large_files.yml").write_text(
        f'large_files:\n  - path: "models/model.pt"\n    url: "{weights_url}"\n'
        f'    hash_val: "{sha256}"\n    hash_type: "sha256"\n'
    )
    return bundle


def test_package_download_and_infer(tmp_path):
    weights = fixture_path("sitreg", "small_even", "state_dict.pt").read_bytes()
    model_json = json.loads(fixture_path("sitreg", "small_even", "model.json").read_text())
    assert model_json["model_config"]["n_features_per_resolution"] == SMALL_EVEN["network_def#features"]
    with serve({"/weights/model.pt": weights}) as server:
        source = _source_bundle(tmp_path / "src", server.url + "/weights/model.pt", hashlib.sha256(weights).hexdigest())
        (source / "models" / "model.pt").write_bytes(weights)  # a local copy must not be packed
        archive = package_bundle.package_bundle(source, tmp_path / "dist")
        version = json.loads((source / "configs" / "metadata.json").read_text())["version"]
        assert archive.name == f"{NAME}_v{version}.zip"
        server.files["/" + archive.name] = archive.read_bytes()
        bundle_dir = tmp_path / "hub"
        download(name=NAME, url=f"{server.url}/{archive.name}", bundle_dir=str(bundle_dir), progress=False)
        bundle = bundle_dir / NAME
        assert (bundle / "configs" / "inference.json").is_file() and not (bundle / "models" / "model.pt").exists()
        download_large_files(bundle_path=str(bundle))
    assert (bundle / "models" / "model.pt").read_bytes() == weights
    assert [p for p, _ in server.requests] == [f"/{archive.name}", "/weights/model.pt"]

    data = write_synthetic_oasis(tmp_path / "data", num_subjects=2, shape=(16, 16, 16), num_labels=3)
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type="inference",
        bundle_root=str(bundle),
        dataset_dir=str(data),
        divisions={"test": [0, 2]},
        crop=None,
        outputs=["forward_ddf"],
        device="$torch.device('cpu')",
        # reference-format weights: built and converted by monai_ext.checkpoints (see the report)
        network="$monai_ext.checkpoints.load_sitreg_checkpoint(@network_def, @ckpt_path).to(@device)",
        load_pretrained=False,
        **{"imports": ["$import torch", "$import monai_ext", "$import monai_ext.checkpoints",
                       "$import monai_ext.data.oasis", "$import monai_ext.io.outputs"]},
        **SMALL_EVEN,
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    network = workflow.parser.get_parsed_content("network")
    expected = convert_sitreg_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    loaded = network.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    written = sorted(p.relative_to(bundle / "inference") for p in (bundle / "inference").rglob("*") if p.is_file())
    assert written, "inference wrote nothing"


def test_wrong_hash_fails_and_leaves_no_file(tmp_path):
    from monai.apps.utils import HashCheckError

    weights = b"not the published weights"
    with serve({"/model.pt": weights}) as server:
        bundle = _source_bundle(tmp_path, server.url + "/model.pt", "0" * 64)
        with pytest.raises(HashCheckError, match="sha256"):
            download_large_files(bundle_path=str(bundle))
    assert not (bundle / "models" / "model.pt").exists()
    assert list((bundle / "models").iterdir()) == []


def test_package_excludes_outputs_and_requires_metadata(tmp_path):
    bundle = _source_bundle(tmp_path / "src", "http://127.0.0.1:9/model.pt", "0" * 64)
    for extra in ("eval/mlruns.db", "inference/x.nii.gz", "models/model.pt.part", "models/model.pt"):
        (bundle / extra).parent.mkdir(parents=True, exist_ok=True)
        (bundle / extra).write_bytes(b"x")
    import zipfile

    names = zipfile.ZipFile(package_bundle.package_bundle(bundle, tmp_path / "dist")).namelist()
    assert all(n.startswith(f"{NAME}/") for n in names) and f"{NAME}/configs/metadata.json" in names
    assert not any(part in n for n in names for part in ("eval/", "inference/", ".part", "model.pt"))
    with_weights = zipfile.ZipFile(package_bundle.package_bundle(bundle, tmp_path / "w", include_weights=True))
    assert f"{NAME}/models/model.pt" in with_weights.namelist()
    (bundle / "configs" / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="metadata"):
        package_bundle.package_bundle(bundle, tmp_path / "dist")
