"""nnU-Net inference with real models: tiny, barely trained ones (slow: they are trained first) and tiny random
ones (tests/totalseg_models.py, seconds), compared with nnU-Net's own predictor: model folders and task
selection, readers and axis order, part merging, folds, mirroring."""

import json
import os
import shutil
from dataclasses import replace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("nnunetv2", reason="segmentation needs the optional 'segment' dependencies")

from tiny_model import train_tiny_model  # noqa: E402
from totalseg_models import (  # noqa: E402
    RELEASE_FOLDERS,
    nnunet_own_labels,
    release_labels,
    release_model_dir,
    write_model,
    write_release,
)

from ctcohort import phantom  # noqa: E402
from ctcohort.cli import main  # noqa: E402
from ctcohort.measure import measure_and_qc_files, measure_files, read_measurements, write_measurements  # noqa: E402
from ctcohort.nnunet_adapter import network_axes  # noqa: E402
from ctcohort.qc import QCSettings, read_qc  # noqa: E402
from ctcohort.scan_status import ScanStatus  # noqa: E402
from ctcohort.segment import (  # noqa: E402
    TASKS,
    BatchMeasurement,
    ModelFolderError,
    SegmentationSettings,
    Segmenter,
    cpu_bfloat16,
    find_model_parts,
    missing_segmentation_packages,
    model_files,
    recorded_label_names,
    segment_batch,
)
from ctcohort.structures import load_structure_table  # noqa: E402
from ctcohort.train import mirror_model  # noqa: E402

V1 = load_structure_table("total_v1")
V2 = load_structure_table("total_v2")
# the tests segment on one CPU thread, in float32 (bfloat16's labels may differ on a few voxels)
CPU_FLOAT32 = SegmentationSettings(device="cpu", precision="float32", threads=1)
PARTS_TABLE = pd.read_csv(
    os.path.join(os.path.dirname(__file__), "..", "resources", "structures", "total_v2_parts.csv")
)
PART_A = ["liver", "spleen", "kidney_left", "kidney_right"]
PART_B = ["hip_left", "hip_right", "sacrum", "kidney_left"]  # kidney_left claimed by both parts
TWO_PARTS = [998, 999]  # segmentation.task of two_part_model


@pytest.fixture(scope="module")
def two_part_model(tmp_path_factory):
    """Two real nnU-Net models as parts of one model folder (Dataset998_..., Dataset999_...)."""
    root = tmp_path_factory.mktemp("models")
    model_dir = root / "two_parts"
    for dataset_id, structures in ((998, PART_A), (999, PART_B)):
        trained = train_tiny_model(
            root / f"train{dataset_id}", dataset_id=dataset_id, structures=structures, iterations=3
        )
        target = model_dir / f"Dataset{dataset_id:03d}_Part" / "nnUNetTrainer__nnUNetPlans__3d_small"
        target.parent.mkdir(parents=True)
        trained.rename(target)
    return model_dir


@pytest.fixture(scope="module")
def phantom_scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan")
    ct, labels, affine = phantom.render_subject(phantom.draw_subject(seed=11, index=0), spacing=(6.0, 5.0, 8.0))
    path = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct, affine), path)
    return path


@pytest.mark.slow
def test_parts_map_their_labels_to_global_structures(two_part_model):
    parts = find_model_parts(two_part_model, V1, TWO_PARTS)
    assert [p.dataset_id for p in parts] == [998, 999]
    label_of = dict(zip(V1["name"], V1["label"]))
    assert sorted(parts[0].global_labels.values()) == sorted(label_of[s] for s in PART_A)
    assert sorted(parts[1].global_labels.values()) == sorted(label_of[s] for s in PART_B)
    # each part's own dataset.json names its labels
    names = json.loads((parts[1].folder / "dataset.json").read_text())["labels"]
    for name, local in names.items():
        if name != "background":
            assert parts[1].global_labels[local] == label_of[name]


@pytest.mark.slow
def test_merged_map_is_the_parts_merged_later_part_winning(two_part_model, phantom_scan):
    ct = nib.load(phantom_scan)
    merged = Segmenter(two_part_model, V1, task=TWO_PARTS, settings=CPU_FLOAT32).segment(ct)
    assert merged.shape == ct.shape and merged.dtype == np.uint8
    singles = []
    for part_folder in sorted(two_part_model.glob("Dataset*/*")):
        singles.append(Segmenter(part_folder, V1, settings=CPU_FLOAT32).segment(ct))
    expected = singles[0].copy()
    expected[singles[1] != 0] = singles[1][singles[1] != 0]
    np.testing.assert_array_equal(merged, expected)
    allowed = {0} | {int(V1.set_index("name").at[s, "label"]) for s in PART_A + PART_B}
    assert set(np.unique(merged)) <= allowed
    assert len(set(np.unique(merged)) - {0}) >= 2, "the tiny models should label something for this test to bite"


@pytest.mark.slow
def test_output_lies_on_the_input_grid_in_any_orientation(two_part_model, phantom_scan, tmp_path):
    """The same scan stored RAS and LPS (anisotropic spacing) gets the same labels, each on its own grid."""
    ras = nib.load(phantom_scan)
    data = np.asanyarray(ras.dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(ras.shape[:2]) - 1
    lps = nib.Nifti1Image(data[::-1, ::-1, :].copy(), ras.affine @ flip)
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    lps_path = tmp_path / "lps.nii.gz"
    nib.save(lps, lps_path)
    out = tmp_path / "out"
    assert (
        main(
            [
                "segment",
                "--ct",
                str(phantom_scan),
                str(lps_path),
                "--model",
                str(two_part_model),
                "--task",
                *map(str, TWO_PARTS),
                "--structures",
                "total_v1",
                "--device",
                "cpu",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    seg_ras, seg_lps = nib.load(out / "ct.nii.gz"), nib.load(out / "lps.nii.gz")
    assert seg_lps.shape == lps.shape
    np.testing.assert_allclose(seg_lps.affine, lps.affine)
    np.testing.assert_allclose(seg_ras.affine, ras.affine)
    np.testing.assert_array_equal(np.asanyarray(seg_lps.dataobj)[::-1, ::-1, :], np.asanyarray(seg_ras.dataobj))
    assert np.count_nonzero(np.asanyarray(seg_ras.dataobj)) > 100
    names = recorded_label_names(seg_ras)
    label_names = dict(zip(V1["label"], V1["name"]))
    assert all(label_names[k] == v for k, v in names.items())
    assert set(names) == set(np.unique(np.asanyarray(seg_ras.dataobj)).tolist()) - {0}


@pytest.mark.slow
def test_batch_records_a_broken_scan_and_segments_the_rest(two_part_model, phantom_scan, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"no image here")
    # a DICOM series whose import failed: its placeholder CT is not segmented, its failure is passed on
    unimported, import_status = tmp_path / "unimported.nii.gz", tmp_path / "c.import.json"
    nib.save(nib.Nifti1Image(np.zeros((1, 1, 1), np.int16), np.eye(4)), unimported)
    ScanStatus("unimported", "import_ct", ok=False, error="DicomImportError: a single slice").write(import_status)
    outputs = [tmp_path / f"{s}.nii.gz" for s in "abc"]
    statuses = [tmp_path / f"{s}.json" for s in "abc"]
    measurement = BatchMeasurement(
        [tmp_path / f"{s}.tsv" for s in "abc"],
        [tmp_path / f"{s}.measure.json" for s in "abc"],
        qc_tables=[tmp_path / f"{s}.qc.tsv" for s in "abc"],
        previews=[tmp_path / f"{s}.png" for s in "abc"],
        settings=QCSettings(min_voxels=5, preview_width=300),
    )
    segment_batch(
        ["good", "bad", "unimported"],
        [phantom_scan, broken, unimported],
        outputs,
        statuses,
        model=two_part_model,
        structures="total_v1",
        task=TWO_PARTS,
        measurement=measurement,
        settings=SegmentationSettings(device="cpu", threads=1),
        upstream=["", "", import_status],
    )
    good, bad, not_imported = (json.loads(p.read_text()) for p in statuses)
    assert not_imported == json.loads(import_status.read_text())
    assert json.loads(measurement.statuses[2].read_text()) == not_imported
    assert nib.load(outputs[2]).shape == (1, 1, 1) and read_measurements(measurement.outputs[2]).empty
    assert good["ok"] and not bad["ok"]
    assert bad["stage"] == "segment" and "broken.nii.gz" in bad["error"]
    assert nib.load(outputs[0]).shape == nib.load(phantom_scan).shape
    # measured in the job, from memory: the same table as measuring the written files afterwards
    measured_good, measured_bad, _ = (json.loads(p.read_text()) for p in measurement.statuses)
    assert measured_good == {"subject": "good", "stage": "measure", "ok": True, "error": ""}
    assert measured_bad == bad  # the segmentation failure passed on, not a measure failure
    from_files = measure_files(phantom_scan, outputs[0], V1, min_voxels=5)
    assert (from_files["n_voxels"] > 0).any()
    write_measurements(from_files, tmp_path / "from_files.tsv")
    assert measurement.outputs[0].read_bytes() == (tmp_path / "from_files.tsv").read_bytes()
    assert read_measurements(measurement.outputs[1]).empty
    # quality control beside each table: the scan's own, placeholders for the failed ones
    checked = measure_and_qc_files(phantom_scan, outputs[0], V1, qc=QCSettings(3, 5, 300))
    assert measurement.qc_tables[0].read_text() == checked.qc.table.to_csv(sep="\t", index=False)
    assert measurement.previews[0].read_bytes() == checked.qc.preview
    assert Image.open(measurement.previews[0]).size == (300, 100)
    for i in (1, 2):
        assert read_qc(measurement.qc_tables[i]).empty and Image.open(measurement.previews[i]).size == (1, 1)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "expected an nnU-Net v2 trained model folder"),
    ],
)
def test_missing_or_empty_model_folder_says_what_to_provide(tmp_path, make, message):
    folder = tmp_path / "weights"
    make(folder)
    with pytest.raises(ModelFolderError, match=message):
        find_model_parts(folder, V1)


@pytest.mark.slow
def test_model_files_are_each_parts_plans_and_fold_checkpoints(two_part_model):
    files = model_files(find_model_parts(two_part_model, V1, TWO_PARTS), SegmentationSettings())
    assert len(files) == 2 * 3 and all(path.is_file() for path in files)
    assert {path.name for path in files} == {"dataset.json", "plans.json", "checkpoint_final.pth"}


def test_bfloat16_runs_on_the_cpu_only_and_auto_where_it_is_native():
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_bfloat16("auto", cpu) == native
    assert cpu_bfloat16("bfloat16", cpu) and not cpu_bfloat16("float32", cpu)
    assert not cpu_bfloat16("bfloat16", cuda)  # nnU-Net autocasts to float16 on the GPU itself
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        cpu_bfloat16("half", cpu)


def test_missing_segmentation_packages_say_what_to_install():
    assert missing_segmentation_packages(("json",)) is None
    message = missing_segmentation_packages(("json", "no_such_package_here"))
    assert "no_such_package_here" in message and "pip install -e '.[segment]'" in message


@pytest.mark.slow
def test_labels_not_in_the_structure_table_are_named(two_part_model):
    table = pd.DataFrame({"label": [1], "name": ["liver"], "group": ["organ"]})
    with pytest.raises(ModelFolderError, match="spleen"):
        find_model_parts(two_part_model, table, TWO_PARTS)


@pytest.mark.slow
def test_workflow_segments_in_batches_and_passes_failures_on(two_part_model, tmp_path):
    from conftest import run_workflow

    data = tmp_path / "data"
    phantom.write_cohort(data, 5, seed=5, spacing=(6.0, 5.0, 8.0))
    (data / "ct" / "demo003.nii.gz").write_bytes(b"not a scan")
    raw = nib.load(data / "ct" / "demo004.nii.gz")  # stored without its -1024 intercept: not HU
    nib.save(nib.Nifti1Image(np.asanyarray(raw.dataobj).astype(np.int16) + 1024, raw.affine), raw.get_filename())
    config = {
        "cohort": str(data / "cohort.tsv"),
        "segmentation": {
            "method": "nnunet",
            "model": str(two_part_model),
            "task": TWO_PARTS,
            "device": "cpu",
            "threads": 1,
            "scans_per_job": 2,
        },
    }
    # the segmentation and the tables after it, which this test reads (not the cohort's statistics and figures)
    targets = ["results/tables/measurements.tsv", "results/evaluation/dice.tsv"]
    result = run_workflow(tmp_path, config, *targets)
    assert result.stderr.count("rule segment_batch_") == 3  # 5 scans, 2 per job
    failures = pd.read_csv(tmp_path / "results" / "tables" / "failures.tsv", sep="\t")
    assert list(failures["subject"]) == ["demo003", "demo004"] and set(failures["stage"]) == {"segment"}
    assert "not plausibly in HU" in failures.at[1, "error"]  # checked before the model sees it
    measurements = pd.read_csv(tmp_path / "results" / "tables" / "measurements.tsv", sep="\t")
    assert sorted(measurements["subject"].unique()) == ["demo001", "demo002", "demo005"]
    seg = nib.load(tmp_path / "results" / "seg" / "demo001.nii.gz")
    ct = nib.load(data / "ct" / "demo001.nii.gz")
    assert seg.shape == ct.shape and np.allclose(seg.affine, ct.affine)
    dice = pd.read_csv(tmp_path / "results" / "evaluation" / "dice.tsv", sep="\t")
    assert set(dice["subject"]) == {"demo001", "demo002", "demo005"}
    assert dice["dice"].dropna().between(0, 1).all()
    # the weights are inputs of the segmentation jobs: replacing them segments every batch again
    dry = run_workflow(tmp_path, config, "-n", *targets)
    assert "segment_batch_" not in dry.stdout + dry.stderr
    checkpoints = sorted(two_part_model.rglob("fold_0/checkpoint_final.pth"))
    assert len(checkpoints) == 2
    os.utime(checkpoints[1])
    dry = run_workflow(tmp_path, config, "-n", *targets)
    assert (dry.stdout + dry.stderr).count("rule segment_batch_") == 3


@pytest.mark.slow
def test_bundled_model_segments_an_lps_phantom_scan_on_its_grid(tmp_path):
    """The default model, on an unseen demo scan stored LPS with 2.5 x 2.5 x 4 mm voxels: the label map lies
    on exactly that grid and matches the phantom's truth."""
    ct, truth, affine = phantom.render_subject(phantom.draw_subject(seed=1, index=0))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(ct.shape[:2]) - 1
    lps_affine = affine @ flip
    assert nib.aff2axcodes(lps_affine) == ("L", "P", "S")
    path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(ct[::-1, ::-1, :].copy(), lps_affine), path)
    assert main(["segment", "--ct", str(path), "--device", "cpu", "--threads", "2", "-o", str(tmp_path / "out")]) == 0
    seg = nib.load(tmp_path / "out" / "lps.nii.gz")
    assert seg.shape == ct.shape
    np.testing.assert_allclose(seg.affine, lps_affine)
    predicted = np.asanyarray(seg.dataobj)[::-1, ::-1, :]  # back to the truth's RAS voxel order
    names = dict(zip(V1["label"], V1["name"]))
    present = [label for label in np.unique(truth) if label]
    assert len(present) >= 30
    for label in present:
        p, t = predicted == label, truth == label
        dice = 2 * np.count_nonzero(p & t) / (np.count_nonzero(p) + np.count_nonzero(t))
        assert dice >= 0.9, f"{names[label]}: Dice {dice:.3f}"
    assert set(np.unique(predicted)) <= set(np.unique(truth))  # nothing that is not there


def _nnunet_own_labels(segmenter, ct):
    """nnU-Net's own preprocessing and export (predict_single_npy_array) for a single-part model, (x, y, z)."""
    hu = np.asanyarray(ct.dataobj).astype(np.float32)
    spacing = [float(s) for s in ct.header.get_zooms()[:3]]
    local = segmenter.predictors[0].predict_single_npy_array(
        hu.transpose(2, 1, 0)[None], {"spacing": spacing[::-1]}, None, None, False
    )
    lookup = np.zeros(max(segmenter.parts[0].global_labels) + 1, np.uint8)
    for part_label, label in segmenter.parts[0].global_labels.items():
        lookup[part_label] = label
    return lookup[np.asarray(local).transpose(2, 1, 0)]


@pytest.mark.slow
def test_device_side_processing_matches_nnunets_own(tmp_path):
    """On the model's spacing the device-side pre/postprocessing gives nnU-Net's labels; on another spacing
    (resampled both ways, trilinear here, nnU-Net's spline/linear there) nearly the same."""
    segmenter = Segmenter(None, V1, settings=replace(CPU_FLOAT32, threads=2))
    ct_data, _, affine = phantom.render_subject(phantom.draw_subject(seed=1, index=1))
    native = nib.Nifti1Image(ct_data, affine)
    ours = segmenter.segment(native)
    np.testing.assert_array_equal(ours, _nnunet_own_labels(segmenter, native))
    np.testing.assert_array_equal(segmenter.segment(native), ours)  # repeatable: same scan, same labels

    # bfloat16 (segmentation.precision: auto on CPUs that compute it natively): the same labels but for a few
    # voxels at structure borders
    in_bfloat16 = Segmenter(None, V1, settings=replace(CPU_FLOAT32, threads=2, precision="bfloat16")).segment(native)
    assert np.mean(in_bfloat16 == ours) > 0.9999

    coarse_data, _, coarse_affine = phantom.render_subject(
        phantom.draw_subject(seed=1, index=1), spacing=(3.0, 3.0, 5.0)
    )
    coarse = nib.Nifti1Image(coarse_data, coarse_affine)
    ours, theirs = segmenter.segment(coarse), _nnunet_own_labels(segmenter, coarse)
    assert ours.shape == coarse.shape
    foreground = (ours != 0) | (theirs != 0)
    assert np.mean(ours[foreground] == theirs[foreground]) > 0.95


# ---------------------------------------------------------------------------------------------------------
# Tiny random models (tests/totalseg_models.py): seconds each, compared with nnU-Net's own predictor
# ---------------------------------------------------------------------------------------------------------

SCAN_SHAPE = (24, 20, 16)  # RAS voxel axes (x, y, z)
SCAN_SPACING = (4.0, 1.5, 2.0)  # mm along them: anisotropic, the largest along x
ORGANS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5}


def _write_scan(path, orientation="RAS", spacing=SCAN_SPACING, shape=SCAN_SHAPE, seed=0):
    """A smooth random CT (HU, int16) whose RAS form has ``shape`` and ``spacing``, stored in ``orientation``
    (axis codes); no voxel is exactly 0, where nnU-Net's preprocessing would crop a border. Returns the
    stored image."""
    from scipy.ndimage import gaussian_filter

    data = gaussian_filter(np.random.default_rng(seed).normal(0.0, 2400.0, shape), 1.5)
    data = np.round(data).astype(np.int16)
    data[data == 0] = 1
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-30.0, 12.0, 40.0]
    ras = nib.Nifti1Image(data, affine)
    stored = ras.as_reoriented(
        nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(tuple(orientation))
        )
    )
    assert nib.aff2axcodes(stored.affine) == tuple(orientation)
    stored.set_qform(stored.affine, code=1)
    stored.set_sform(stored.affine, code=1)
    nib.save(stored, path)
    return nib.load(path)


def _network_spacing(transpose_forward, spacing=SCAN_SPACING):
    """The scan's spacing in nnU-Net's order (z, y, x) after ``transpose_forward``: a model on it resamples nothing."""
    zyx = spacing[::-1]
    return tuple(zyx[i] for i in transpose_forward)


def _model_on_scan_spacing(folder, *, seed: int, transpose_forward=(0, 1, 2), **options):
    """A random model of ORGANS on the test scan's spacing (it resamples nothing) that predicts labels 0, 1, 3 and 5
    only; ``options``: more ``write_model`` arguments."""
    return write_model(
        folder,
        ORGANS,
        dataset_name="Dataset501_Organs",
        spacing=_network_spacing(transpose_forward),
        transpose_forward=transpose_forward,
        active_labels=(0, 1, 3, 5),
        seed=seed,
        **options,
    )


def _several_labels(labels, at_least=3):
    assert len(np.unique(labels)) >= at_least, "the random model should predict several labels for this test to bite"


@pytest.mark.parametrize(
    "reader, orientation, transpose_forward",
    [
        ("SimpleITKIO", "RAS", (0, 1, 2)),
        ("NibabelIO", "RAS", (0, 1, 2)),
        ("SimpleITKIO", "RAS", (2, 0, 1)),  # planned with the largest spacing first, as nnU-Net's planner does
        ("NibabelIOWithReorient", "LPS", (0, 1, 2)),
        ("NibabelIOWithReorient", "SLP", (2, 0, 1)),
        ("SimpleITKIOWithReorient", "PSL", (1, 2, 0)),
    ],
)
def test_each_reader_gets_the_array_its_nnunet_reader_gives(tmp_path, reader, orientation, transpose_forward):
    """ctcohort's labels equal nnU-Net's own (the plans' reader class reads the file and writes the labels,
    nnU-Net preprocesses, predicts and exports) on an anisotropic, non-cubic scan, on the model's spacing."""
    ct = _write_scan(tmp_path / "ct.nii.gz", orientation)
    model = _model_on_scan_spacing(
        tmp_path / "model", seed=3, transpose_forward=transpose_forward, reader=reader, patch=(8, 12, 16)
    )
    ours = Segmenter(model, V2, settings=CPU_FLOAT32).segment(ct)
    theirs = nnunet_own_labels(model, tmp_path / "ct.nii.gz", tmp_path)
    assert ours.shape == ct.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    _several_labels(ours)


def test_a_non_reorienting_reader_gets_the_scan_in_ras_as_totalsegmentator_feeds_it(tmp_path):
    """ctcohort reorients every scan to RAS first, also for SimpleITKIO models (nnU-Net itself would feed the
    stored LPS order): the labels of an LPS scan are nnU-Net's labels of its RAS copy."""
    lps = _write_scan(tmp_path / "lps.nii.gz", "LPS")
    nib.save(nib.as_closest_canonical(lps), tmp_path / "ras.nii.gz")
    model = _model_on_scan_spacing(tmp_path / "model", seed=3, reader="SimpleITKIO")
    ours = Segmenter(model, V2, settings=CPU_FLOAT32).segment(lps)
    theirs_ras = nnunet_own_labels(model, tmp_path / "ras.nii.gz", tmp_path)
    np.testing.assert_array_equal(ours[::-1, ::-1, :], theirs_ras)
    assert not np.array_equal(ours, nnunet_own_labels(model, tmp_path / "lps.nii.gz", tmp_path))
    _several_labels(ours)


@pytest.mark.parametrize("reader", ["Tiff3DIO", "NaturalImage2DIO", "MyOwnReader", None])
def test_a_reader_ctcohort_cannot_honour_is_refused(tmp_path, reader):
    model = write_model(tmp_path / "Dataset501_Organs", ORGANS, dataset_name="Dataset501_Organs")
    plans = json.loads((model / "plans.json").read_text())
    plans["image_reader_writer"] = reader
    if reader is None:
        del plans["image_reader_writer"]
    (model / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelFolderError, match=f"{model}.*image_reader_writer {reader!r}"):
        find_model_parts(model, V2)


def test_folds_are_ensembled_as_nnunet_does(tmp_path):
    ct = _write_scan(tmp_path / "ct.nii.gz")
    model = _model_on_scan_spacing(tmp_path / "model", seed=5, folds=(0, 1))
    ours = Segmenter(model, V2, settings=replace(CPU_FLOAT32, folds=[0, 1])).segment(ct)
    theirs = nnunet_own_labels(model, tmp_path / "ct.nii.gz", tmp_path, folds=(0, 1))
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(theirs, nnunet_own_labels(model, tmp_path / "ct.nii.gz", tmp_path, folds=(0,)))
    _several_labels(ours)


def test_a_missing_fold_or_an_unsupported_configuration_is_a_model_folder_error(tmp_path):
    """Checked before any weights are loaded (missing fold) and when the predictor is built (configuration)."""
    model = write_model(tmp_path / "model", ORGANS, dataset_name="Dataset501_Organs", folds=(0, 1))
    with pytest.raises(
        ModelFolderError, match=r"model .*model: no fold_2/checkpoint_final\.pth \(segmentation\.folds\)"
    ):
        Segmenter(model, V2, settings=replace(CPU_FLOAT32, folds=[0, 2]))
    plans = json.loads((model / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["RescaleTo01Normalization"]
    (model / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelFolderError, match="one CT channel with CTNormalization or ZScoreNormalization"):
        Segmenter(model, V2, settings=CPU_FLOAT32)


def test_mirroring_is_nnunets_own(tmp_path):
    ct = _write_scan(tmp_path / "ct.nii.gz")
    model = _model_on_scan_spacing(tmp_path / "model", seed=7, mirror_axes=(0, 1, 2))
    ours = Segmenter(model, V2, settings=replace(CPU_FLOAT32, mirroring=True)).segment(ct)
    theirs = nnunet_own_labels(model, tmp_path / "ct.nii.gz", tmp_path, mirroring=True)
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(theirs, nnunet_own_labels(model, tmp_path / "ct.nii.gz", tmp_path, mirroring=False))
    _several_labels(ours)


@pytest.mark.parametrize(
    "transpose_forward, strides",
    [
        ((0, 1, 2), [[1, 1, 1], [2, 2, 1], [2, 2, 1]]),  # RAS x on the network's last axis, as the demo model's plan
        ((2, 0, 1), [[1, 1, 1], [1, 2, 2], [1, 2, 2]]),  # RAS x on its first
    ],
)
def test_a_mirrored_model_segments_the_mirrored_scan_as_the_model_the_scan(tmp_path, transpose_forward, strides):
    """mirror_model along RAS x: its labels of the scan flipped left-right are the model's labels of the scan,
    flipped. The networks are exact mirrors here (stride 1 along x; a strided conv on an even size makes them
    nearly so), the scan is one tile, and nnU-Net sums its tiles' logits in float16 weighted by a Gaussian centred
    off the middle of an even-sized patch: ties of the random model's logits break apart in a few voxels. The
    model itself, on the flipped scan, gives other labels in many."""
    ct = _write_scan(tmp_path / "ct.nii.gz")
    patch = [SCAN_SHAPE[axis] for axis in network_axes("SimpleITKIO", transpose_forward)]
    model = _model_on_scan_spacing(
        tmp_path / "model", seed=3, transpose_forward=transpose_forward, strides=strides, patch=patch
    )
    mirrored = mirror_model(model, tmp_path / "mirrored", ras_axis=0)
    flipped_ct = nib.Nifti1Image(np.asanyarray(ct.dataobj)[::-1].copy(), ct.affine)
    labels = Segmenter(model, V2, settings=CPU_FLOAT32).segment(ct)
    mirrored_labels = Segmenter(mirrored, V2, settings=CPU_FLOAT32).segment(flipped_ct)
    unmirrored_labels = Segmenter(model, V2, settings=CPU_FLOAT32).segment(flipped_ct)
    assert np.mean(mirrored_labels == labels[::-1]) > 0.99
    assert np.mean(unmirrored_labels == labels[::-1]) < 0.9
    _several_labels(labels)
    # the weights nnU-Net stores under two names stay one tensor
    assert _shared_names(mirrored) == _shared_names(model) and len(_shared_names(model)) > 5


def _shared_names(model):
    """The sets of names in a model's checkpoint that hold one tensor."""
    import torch

    weights = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    names = {}
    for key, value in weights.items():
        names.setdefault(value.data_ptr(), set()).add(key)
    return sorted(sorted(group) for group in names.values() if len(group) > 1)


# TotalSegmentator's release layout: 291 random over a few labels, 292 one label everywhere (local 4,
# vertebrae_L4, global 28), 293 and 295 random over a few labels (background among them), 294 background
# everywhere, 297 random over a few of the 117 classes.
RELEASE_SETTINGS = {
    291: {"active_labels": (0, 2, 5, 7)},
    292: {"force_label": 4},
    293: {"active_labels": (0, 1, 3, 6)},
    294: {"force_label": 0},
    295: {"active_labels": (0, 2, 9, 14)},
    297: {"active_labels": (0, 5, 28, 51, 80)},
}
TOTAL = TASKS["total"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A weights folder like TotalSegmentator's: the 5 parts of total (1.5 mm) and total_fast (297, 3 mm)."""
    return write_release(tmp_path_factory.mktemp("weights"), settings=RELEASE_SETTINGS, patch=(16, 16, 16))


def _global_labels(dataset_id):
    """A part's label -> global total_v2 label, from the part table (297: its labels are the v2 ids)."""
    part = PARTS_TABLE[PARTS_TABLE["task_id"] == dataset_id]
    if not len(part):
        return {label: label for label in release_labels(dataset_id).values()}
    return dict(zip(part["part_label"].astype(int), part["global_label"].astype(int)))


def _copy_release(release, target, dataset_ids):
    for dataset_id in dataset_ids:
        shutil.copytree(release / RELEASE_FOLDERS[dataset_id], target / RELEASE_FOLDERS[dataset_id])
    return target


@pytest.mark.parametrize("task", ["total", ["total"], list(TOTAL), [str(i) for i in TOTAL]])
def test_task_total_selects_the_five_parts_in_order(release, task):
    parts = find_model_parts(release, V2, task)
    assert [part.dataset_id for part in parts] == [291, 292, 293, 294, 295]
    assert [part.folder for part in parts] == [release_model_dir(release, i) for i in TOTAL]
    assert {part.reader for part in parts} == {"NibabelIOWithReorient"}


@pytest.mark.parametrize("task", ["total_fast", 297, [297], ["297"]])
def test_task_total_fast_selects_the_3mm_model(release, task):
    parts = find_model_parts(release, V2, task)
    assert [(part.dataset_id, part.folder) for part in parts] == [(297, release_model_dir(release, 297))]


def test_a_folder_of_several_tasks_without_a_task_is_refused_with_what_it_holds(release, tmp_path, capsys):
    with pytest.raises(ModelFolderError) as error:
        find_model_parts(release, V2)
    message = str(error.value)
    assert str(release) in message and "segmentation.task" in message
    for dataset_id in TOTAL:
        assert (
            f"{RELEASE_FOLDERS[dataset_id]}/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres: "
            f"dataset {dataset_id}, part of task total"
        ) in message
    assert (
        f"{RELEASE_FOLDERS[297]}/nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres: dataset 297, "
        "task total_fast"
    ) in message
    assert "total (datasets 291-295) or total_fast (dataset 297)" in message
    # the command line says the same and stops
    scan = tmp_path / "ct.nii.gz"
    _write_scan(scan, spacing=(1.5, 1.5, 1.5))

    def segment(*task):
        options = ["--structures", "total_v2", "--device", "cpu", "-o", str(tmp_path / "out")]
        return main(["segment", "--ct", str(scan), "--model", str(release), *task, *options])

    assert segment() == 1
    assert "total_fast (dataset 297)" in capsys.readouterr().err
    assert segment("--task", "total_fast") == 0
    assert nib.load(tmp_path / "out" / "ct.nii.gz").shape == SCAN_SHAPE


def test_a_folder_of_one_task_needs_no_task(release, tmp_path):
    only_total = _copy_release(release, tmp_path / "total", TOTAL)
    assert [part.dataset_id for part in find_model_parts(only_total, V2)] == list(TOTAL)
    only_fast = _copy_release(release, tmp_path / "fast", [297])
    assert [part.dataset_id for part in find_model_parts(only_fast, V2)] == [297]
    # and a single model's own folder
    assert [part.dataset_id for part in find_model_parts(release_model_dir(release, 297), V2)] == [297]


def test_an_incomplete_task_names_the_missing_datasets(release, tmp_path):
    weights = _copy_release(release, tmp_path / "weights", [291, 292, 293, 295, 297])
    with pytest.raises(ModelFolderError, match=r"task total needs datasets 291, 292, 293, 294, 295; missing 294 "):
        find_model_parts(weights, V2, "total")
    alone = _copy_release(release, tmp_path / "total_only", [291, 292, 293, 295])
    with pytest.raises(ModelFolderError, match=r"task total \(the only task found.*missing 294 "):
        find_model_parts(alone, V2)
    with pytest.raises(ModelFolderError, match=r"task \[297, 298\] needs datasets 297, 298; missing 298 "):
        find_model_parts(weights, V2, [297, 298])
    with pytest.raises(ModelFolderError, match="not a known task"):
        find_model_parts(weights, V2, "total_v2")


def test_models_of_no_known_task_are_chosen_by_dataset_id(tmp_path):
    for dataset_id in (601, 602):
        write_model(
            tmp_path / f"Dataset{dataset_id}_Mine" / "nnUNetTrainer__nnUNetPlans__3d_fullres",
            ORGANS,
            dataset_name=f"Dataset{dataset_id}_Mine",
        )
    with pytest.raises(ModelFolderError, match=r"(?s)dataset 601, no known task.*dataset ids, e.g. \[601, 602\]"):
        find_model_parts(tmp_path, V2)
    assert [part.dataset_id for part in find_model_parts(tmp_path, V2, [601, 602])] == [601, 602]
    assert [part.dataset_id for part in find_model_parts(tmp_path, V2, 602)] == [602]
    # two models of one dataset (e.g. two trainers) are ambiguous however selected
    write_model(
        tmp_path / "Dataset602_Mine" / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres",
        ORGANS,
        dataset_name="Dataset602_Mine",
    )
    with pytest.raises(ModelFolderError, match="several models of dataset 602"):
        find_model_parts(tmp_path, V2, [601, 602])


def test_part_labels_map_to_total_v2_through_the_part_table(release, tmp_path):
    for part in find_model_parts(release, V2, "total") + find_model_parts(release, V2, "total_fast"):
        assert part.global_labels == _global_labels(part.dataset_id)
    assert find_model_parts(release, V2, [292])[0].global_labels[4] == 28  # vertebrae_L4
    # a dataset numbered like a part whose dataset.json disagrees with the published labels is not that part
    weights = _copy_release(release, tmp_path / "weights", [292])
    dataset_json = release_model_dir(weights, 292) / "dataset.json"
    dataset = json.loads(dataset_json.read_text())
    dataset["labels"]["vertebrae_L4"], dataset["labels"]["vertebrae_L5"] = 3, 4
    dataset_json.write_text(json.dumps(dataset))
    with pytest.raises(ModelFolderError, match=r"dataset 292 .*3: vertebrae_L4 \(published: vertebrae_L5\)"):
        find_model_parts(weights, V2)


def test_total_merges_its_parts_later_dataset_winning(release, tmp_path):
    """ctcohort's merged map equals the parts as nnU-Net predicts them, each mapped through the part table and
    laid over the earlier ones where it claims a voxel."""
    ct = _write_scan(tmp_path / "ct.nii.gz", "LPS", spacing=(1.5, 1.5, 1.5))
    ours = Segmenter(release, V2, task="total", settings=CPU_FLOAT32).segment(ct)
    expected = np.zeros(ct.shape, np.int64)
    claims = {}
    for dataset_id in TOTAL:
        local = nnunet_own_labels(release_model_dir(release, dataset_id), tmp_path / "ct.nii.gz", tmp_path)
        lookup = np.zeros(local.max() + 1, np.int64)
        for part_label, label in _global_labels(dataset_id).items():
            if part_label <= local.max():
                lookup[part_label] = label
        claims[dataset_id] = lookup[local]
        expected = np.where(claims[dataset_id] != 0, claims[dataset_id], expected)
    np.testing.assert_array_equal(ours, expected)
    # the construction bites: 292 claims every voxel, hiding 291; 293 and 295 claim some, overlapping; 294 none
    assert (claims[291] != 0).any() and (claims[292] == 28).all() and not claims[294].any()
    both = (claims[293] != 0) & (claims[295] != 0)
    assert both.any() and (ours[both] == claims[295][both]).all()
    assert ((claims[293] != 0) & (claims[295] == 0)).any()
    assert (ours == 28).any() and not np.isin(ours, list(range(1, 25))).any()


def test_total_fast_segments_as_nnunet_does(release, tmp_path):
    ct = _write_scan(tmp_path / "ct.nii.gz", "LPS", spacing=(3.0, 3.0, 3.0))
    ours = Segmenter(release, V2, task="total_fast", settings=CPU_FLOAT32).segment(ct)
    theirs = nnunet_own_labels(release_model_dir(release, 297), tmp_path / "ct.nii.gz", tmp_path)
    np.testing.assert_array_equal(ours, theirs)
    _several_labels(ours, 4)


@pytest.mark.parametrize(
    "task, valid",
    [
        (None, True),
        ("", True),
        ("total", True),
        ("total_fast", True),
        ("total_fastest", True),
        (297, True),
        ([291, 292, 293], True),
        ("totl", False),
        ([], False),
        (0, False),
        ([291, 291], False),
        (["total"], False),
    ],
)
def test_the_config_schema_takes_the_tasks_the_code_knows(task, valid):
    import jsonschema
    import yaml

    schema = yaml.safe_load(
        open(os.path.join(os.path.dirname(__file__), "..", "workflow", "schemas", "config.schema.yaml")).read()
    )
    assert schema["properties"]["segmentation"]["properties"]["task"]["$ref"] == "#/definitions/task"
    task_schema = schema["definitions"]["task"]  # shared with a task per model of segmentation.model
    names = {name for option in task_schema["anyOf"] for name in option.get("enum", [])} - {""}
    assert names == set(TASKS)
    if valid:
        jsonschema.validate(task, task_schema)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(task, task_schema)
