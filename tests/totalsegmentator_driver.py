"""Segments scans with TotalSegmentator's own code (``totalsegmentator.nnunet.nnUNet_predict_image``, the function
its ``totalsegmentator`` command calls per task), from a weights folder in its release layout, nothing downloaded.

Run as a script in a process of its own (``totalsegmentator_labels`` in totalseg_models.py does): importing
totalsegmentator patches nnU-Net's trainer lookup and export, which must not leak into other tests. The
environment must name the weights folder (``nnUNet_results``) before nnU-Net is imported.

    python totalsegmentator_driver.py --task-id 297 --trainer nnUNetTrainer_4000epochs_NoMirroring \
        --resample 3 3 3 --task-name total --device cpu \
        --timings out.json in1.nii.gz out1.nii.gz [in2 out2 ...]

Writes each label map (TotalSegmentator's labels, uint8) and, with ``--timings``, seconds per scan: total,
load (predictor set-up and weights), resampling (the CT to the task spacing and the labels back),
nnunet (TotalSegmentator's nnUNetv2_predict: the load, then nnU-Net's predict_from_files with its file
reading, cropping, normalisation, sliding window and export).
"""

import argparse
import json
import sys
import time


def _timed(totals: dict, key: str, function):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - started

    return wrapper


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task-id", type=int, action="append", required=True)
    parser.add_argument("--resample", type=float, nargs=3, required=True, help="spacing x y z (mm)")
    parser.add_argument("--trainer", default="nnUNetTrainerNoMirroring", help="the trainer in the model folders' names")
    parser.add_argument("--task-name", default="total")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timings", help="JSON file for the seconds per scan")
    parser.add_argument("files", nargs="+", help="input and output NIfTI paths, alternating")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    import nibabel as nib
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from totalseg_models import trainer_class
    from totalsegmentator import nnunet

    # the trainers checkpoints name, found without nnU-Net's lookup that imports every trainer module (see
    # trainer_class); the classes are nnU-Net's own
    for name in ("nnUNetTrainer", "nnUNetTrainerNoMirroring", "nnUNetTrainer_4000epochs_NoMirroring"):
        nnunet.custom_trainers.setdefault(name, trainer_class(name))
    import_s = time.perf_counter() - started
    totals: dict[str, float] = {}
    nnunet.change_spacing = _timed(totals, "resampling", nnunet.change_spacing)
    nnUNetPredictor.initialize_from_trained_model_folder = _timed(
        totals, "load", nnUNetPredictor.initialize_from_trained_model_folder
    )
    nnunet.nnUNetv2_predict = _timed(totals, "nnunet", nnunet.nnUNetv2_predict)
    task_id = args.task_id[0] if len(args.task_id) == 1 else args.task_id
    scans = []
    for ct_path, out_path in zip(args.files[::2], args.files[1::2]):
        totals.clear()
        started = time.perf_counter()
        labels, _, _ = nnunet.nnUNet_predict_image(
            ct_path,
            None,
            task_id,
            model="3d_fullres",
            folds=[0],
            trainer=args.trainer,
            tta=False,
            resample=list(args.resample),
            task_name=args.task_name,
            quiet=True,
            device=args.device,
            plans="nnUNetPlans",
        )
        nib.save(nib.Nifti1Image(labels.get_fdata().astype("uint8"), labels.affine), out_path)
        scans.append({"total": time.perf_counter() - started, **totals})
    if args.timings:
        with open(args.timings, "w") as handle:
            json.dump({"import_s": import_s, "scans": scans}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
