"""How long CT age takes at 10,000 scans x 104 structures, and its peak memory.

The cohort is tests/test_ct_age.py's synthetic one (every structure of total_v1 with volume and mean HU, a third
following age, 5% missing, 20% of the patients ageing 10 years ahead, 30% of the patients with a second scan).
Timed: ``ctcohort.ct_age.ct_age`` with the shipped config's settings (5 outer x 3 inner folds, ridge and
gradient boosting, the whole-body model and the four group models), from the measurement table in memory to
both tables. Printed: wall time, peak memory of the process, the recovered gap and the error.

Measured on 2 shared x86_64 cores (load about 4): 65 s and 0.52 GB for 10,000 scans (7,692 patients); the
planted gap came back as 10.0 years, MAE 2.3 years in the others. Most of the time is the boosted trees (a
third of a second to 3 s a fit, 20 fits per model); OpenMP on two busy cores ran them ten times slower, hence
``ct_age.threads: 1``.

Run:  python benchmarks/ct_age_speed.py [--scans 10000]
"""

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_ct_age import REPO, selection_of, synthetic_cohort  # noqa: E402

from ctcohort.ct_age import ALL, CtAgeSettings, ct_age  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=10000)
    args = parser.parse_args()
    measurements, planted = synthetic_cohort(n=args.scans, repeats_share=0.3)
    selection = selection_of(measurements)
    settings = CtAgeSettings.from_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text())["ct_age"])
    start = time.perf_counter()
    result = ct_age(measurements, selection, settings)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux
    table = result.table.set_index("subject")
    trained = table[table["trained"]]
    accelerated = planted.reindex(trained.index) > 0
    gap = trained["age_gap_corrected"]
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(
        f"{args.scans} scans ({int(table['trained'].sum())} patients) x 104 structures x {len(settings.measures)} "
        f"measures: {seconds:.1f} s, peak memory {peak_gb:.2f} GB (the whole process, table included)"
    )
    print(result.summary[["features", "n_scans", "model", "mae", "r2", "bias_slope"]].to_string(index=False))
    print(
        f"planted +10 years: difference of mean corrected gaps {gap[accelerated].mean() - gap[~accelerated].mean():.2f}"
        f" years; MAE of the others {(trained['predicted_age'] - trained['age'])[~accelerated].abs().mean():.2f} years"
    )
    assert ALL in set(result.summary["features"])


if __name__ == "__main__":
    main()
