"""The nnU-Net adapter: the version check (on use, never on import, and at the workflow's start-up), and its
changes to nnU-Net's trainer."""

import os
import subprocess
import sys

import pytest

from ctcohort import nnunet_adapter as adapter

try:
    import nnunetv2  # noqa: F401

    NNUNET_MISSING = None
except Exception as err:  # a broken install fails in many ways
    NNUNET_MISSING = f"nnunetv2 cannot be imported ({err}); pip install 'ctcohort[segment]'"
needs_nnunet = pytest.mark.skipif(NNUNET_MISSING is not None, reason=NNUNET_MISSING or "")


def test_version_check_names_installed_and_supported_version():
    adapter.check_nnunet_version(adapter.SUPPORTED_NNUNET_VERSION)
    adapter.check_nnunet_version(adapter.SUPPORTED_NNUNET_VERSION + "+cu124")  # a local build of it
    for installed in ("2.9.0", "2.8.0", "2.8.1.post1", "2.8"):
        with pytest.raises(
            adapter.UnsupportedNnunetError, match=rf"nnunetv2 {installed} is installed.*supports nnunetv2 2\.8\.1 only"
        ):
            adapter.check_nnunet_version(installed, "2.8.1")
    with pytest.raises(adapter.UnsupportedNnunetError, match=r"not installed.*supports nnunetv2 2\.8\.1"):
        adapter.check_nnunet_version(None, "2.8.1")
    assert adapter.nnunet_version_problem("2.8.1", "2.8.1") is None


@needs_nnunet
def test_the_installed_version_is_the_supported_one():
    """The pinned dependency (pyproject: nnunetv2==...) and the adapter agree."""
    assert adapter.installed_nnunet_version() == adapter.SUPPORTED_NNUNET_VERSION
    adapter.require_supported_nnunet()


def test_another_version_is_an_error_when_the_adapter_is_used(monkeypatch, tmp_path):
    from ctcohort import train

    monkeypatch.setattr(adapter, "installed_nnunet_version", lambda: "2.9.0")
    env_before = os.environ.get("nnUNet_raw")
    with pytest.raises(adapter.UnsupportedNnunetError, match="nnunetv2 2.9.0 is installed.*2.8.1"):
        train.plan_and_preprocess(1, tmp_path)
    assert os.environ.get("nnUNet_raw") == env_before and not any(tmp_path.iterdir())  # nothing was touched
    with pytest.raises(adapter.UnsupportedNnunetError, match="2.9.0"):
        train.make_small_configuration(
            {
                "configurations": {
                    "3d_fullres": {"spacing": [1, 1, 1], "median_image_size_in_voxels": [8, 8, 8], "architecture": {}}
                }
            }
        )
    with pytest.raises(adapter.UnsupportedNnunetError, match="2.9.0"):
        with adapter.bfloat16_autocast_on_cpu():
            pass
    with pytest.raises(adapter.UnsupportedNnunetError, match="2.9.0"):
        adapter.load_predictor(
            tmp_path / "no_model", [tmp_path / "no_model" / "fold_0" / "checkpoint_final.pth"], None, 0.5, False
        )
    with pytest.raises(adapter.UnsupportedNnunetError, match="2.9.0"):
        adapter.predict_labels(None, None, (1.0, 1.0, 1.0))


@needs_nnunet
def test_the_workflow_start_up_check_stops_at_another_version(monkeypatch):
    """``missing_segmentation_packages`` (the workflow's start-up check) returns the version problem when
    nnunetv2 is there but of another version, and nothing for the supported one."""
    from ctcohort.segment import missing_segmentation_packages

    monkeypatch.setattr(adapter, "installed_nnunet_version", lambda: adapter.SUPPORTED_NNUNET_VERSION)
    assert missing_segmentation_packages() is None
    monkeypatch.setattr(adapter, "installed_nnunet_version", lambda: "2.9.0")
    assert missing_segmentation_packages() == adapter.nnunet_version_problem("2.9.0")
    assert "nnunetv2 2.9.0 is installed" in missing_segmentation_packages()
    assert missing_segmentation_packages(("torch",)) is None  # nnunetv2 not asked for: no version check


def test_segment_raises_the_adapters_model_folder_error():
    from ctcohort import segment

    assert segment.ModelFolderError is adapter.ModelFolderError
    assert segment.READER_AXES is adapter.READER_AXES


def test_importing_ctcohort_needs_neither_nnunet_nor_a_supported_version():
    """Importing the package, the training and segmentation modules and the command line imports neither
    nnunetv2 nor torch and does not check the version: with a wrong one, the error comes when the adapter is used."""
    code = (
        "import importlib.metadata, sys\n"
        "version = importlib.metadata.version\n"
        "importlib.metadata.version = lambda name: '0.0.1' if name == 'nnunetv2' else version(name)\n"
        "import ctcohort, ctcohort.train, ctcohort.release, ctcohort.nnunet_adapter, ctcohort.segment, ctcohort.cli\n"
        "ctcohort.cli.build_parser().parse_args(['train', '-o', 'm', '--work', 'w'])\n"
        "print(sorted(m for m in ('nnunetv2', 'torch') if m in sys.modules))\n"
        "try:\n"
        "    ctcohort.nnunet_adapter.require_supported_nnunet()\n"
        "except ctcohort.nnunet_adapter.UnsupportedNnunetError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported, message = result.stdout.splitlines()
    assert imported == "[]"
    assert "nnunetv2 0.0.1 is installed" in message and adapter.SUPPORTED_NNUNET_VERSION in message


@needs_nnunet
def test_bfloat16_autocast_applies_to_nnunets_cpu_steps_only_within():
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    import torch

    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 5, 5, 5)
    with adapter.bfloat16_autocast_on_cpu():
        with trainer_module.dummy_context():  # what nnU-Net's train_step enters on the CPU
            assert conv(x).dtype == torch.bfloat16
    with trainer_module.dummy_context():
        assert conv(x).dtype == torch.float32


def test_unknown_optimizer_or_loss_is_an_error():
    with pytest.raises(ValueError, match="optimizer 'rmsprop'"):
        adapter.use_optimizer(object(), "rmsprop")
    with pytest.raises(ValueError, match="loss 'focal'"):
        adapter.use_loss(object(), "focal")
