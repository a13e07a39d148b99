"""TotalSegmentator's own contrast phase of CTs with a given segmentation: its statistics
(``totalsegmentator.statistics.get_basic_statistics``, median, structures at the border included, as its
``totalseg_get_phase`` asks for them) and its ``get_ct_contrast_phase`` on those statistics.

Run as a script in a process of its own (test_contrast_phase.py does): importing totalsegmentator patches
nnU-Net, which must not leak into other tests.

    python totalseg_phase_driver.py seg.nii.gz ct1.nii.gz [ct2.nii.gz ...]

Prints a JSON list, per CT: TotalSegmentator's result (pi_time, phase, probability, stddev, ...).
"""

import json
import sys


def main(argv=None) -> int:
    seg_path, *ct_paths = sys.argv[1:] if argv is None else argv
    import nibabel as nib
    import numpy as np
    import xgboost  # noqa: F401  (before torch, as TotalSegmentator's script does)
    from totalsegmentator.bin.totalseg_get_phase import get_ct_contrast_phase
    from totalsegmentator.statistics import get_basic_statistics

    labels = np.asanyarray(nib.load(seg_path).dataobj)
    results = []
    for ct_path in ct_paths:
        ct = nib.load(ct_path)
        stats = get_basic_statistics(labels, ct, quiet=True, exclude_masks_at_border=False, metric="median")
        *_, done = get_ct_contrast_phase(ct, quiet=True, existing_stats=stats)
        results.append(done["result"])
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
