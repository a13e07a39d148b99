"""How quickly the review page (ctcohort.review_page) opens and scrolls at 100 and at 10,000 scans, in headless
Chromium (tests/browser.py: Debian's chromium and chromium-driver, selenium).

Writes a page per N with synthetic scans (scores from a normal distribution, a few without one, each measured
scan with a real 600x200 PNG preview: one file, hard-linked per subject; 0 to 4 flags on random structures),
opens it from disk and reads the browser's own timings: first-contentful-paint (the paint entry),
DOMContentLoaded and load (the navigation entry; lazy images outside the viewport do not hold up load). Then
scrolls to the bottom, one viewport per animation frame (at most 200 frames: longer pages take longer steps, each
onto cards not drawn yet), and reports the frames' mean and longest interval (about 17 ms where nothing lags);
jumps back to the top and to the bottom, and filters by one flag. Loads are repeated (--repeats) and the median
reported.

Run:  python benchmarks/review_page.py [--n 100 10000] [--repeats 3] [--workdir DIR]
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ctcohort.review_page import write_review_page

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import missing_browser, start_chromium  # noqa: E402

FLAGS = [
    "cut_off",
    "implausible_volume",
    "implausible_hu",
    "laterality",
    "vertebra_order",
    "fragments",
    "volume_outlier",
]
STRUCTURES = [
    "liver",
    "spleen",
    "kidney_left",
    "kidney_right",
    "pancreas",
    "aorta",
    "lung_upper_lobe_left",
    "vertebrae_L1",
    "vertebrae_L2",
    "gallbladder",
    "stomach",
    "urinary_bladder",
    "",
]

# the paint entry may come a frame after load: wait for it (null after 10 s)
FIRST_RENDER = """const done = arguments[arguments.length - 1];
const nav = performance.getEntriesByType('navigation')[0];
const report = (paint) => done([paint ? paint.startTime : null, nav.domContentLoadedEventEnd, nav.loadEventEnd]);
new PerformanceObserver((list) => report(list.getEntriesByName('first-contentful-paint')[0]))
  .observe({type: 'paint', buffered: true});
setTimeout(report, 10000);"""
# down to the bottom, a step per animation frame: one viewport, or more where the page is longer than
# MAX_FRAMES viewports (each step then lands on cards never drawn yet); the callback gets the frame intervals (ms)
MAX_FRAMES = 200
SCROLL_DOWN = """const done = arguments[arguments.length - 1];
window.scrollTo(0, 0);
const stepPx = Math.max(window.innerHeight, document.documentElement.scrollHeight / arguments[0]);
const gaps = []; let last = performance.now();
function step(now) {
  gaps.push(now - last); last = now;
  if (window.scrollY + window.innerHeight >= document.documentElement.scrollHeight - 1) return done(gaps);
  window.scrollBy(0, stepPx);
  requestAnimationFrame(step);
}
requestAnimationFrame(step);"""
# a jump to the other end, until the frame after it is drawn (ms)
JUMP = """const done = arguments[arguments.length - 1];
const start = performance.now();
window.scrollTo(0, arguments[0] ? document.documentElement.scrollHeight : 0);
requestAnimationFrame(() => setTimeout(() => done(performance.now() - start), 0));"""
FILTER = """const select = document.getElementById('flag-filter'), start = performance.now();
select.value = arguments[0]; select.dispatchEvent(new Event('change'));
document.body.offsetHeight;  // the layout of what is left
return [performance.now() - start, document.getElementById('count').textContent];"""


def write_cohort(folder: Path, n: int) -> Path:
    """A review page of n synthetic scans in ``folder``."""
    rng = np.random.default_rng(n)
    pixels = rng.integers(0, 255, (200, 600), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "preview.png")
    subjects = [f"sub{i:05d}" for i in range(n)]
    scores = rng.normal(0, 1.5, n)
    scores[rng.random(n) < 0.02] = np.nan
    failed = rng.random(n) < 0.01
    for subject, fail in zip(subjects, failed):
        if not fail:
            os.link(folder / "preview.png", folder / f"{subject}.png")
    scans = pd.DataFrame(
        {
            "subject": subjects,
            "score": scores,
            "preview": ["" if f else f"{s}.png" for s, f in zip(subjects, failed)],
            "status": ["failed at segment: synthetic" if f else "" for f in failed],
        }
    )
    flags = [
        (s, rng.choice(STRUCTURES), rng.choice(FLAGS), f"robust z = {rng.normal(0, 3):.1f}")
        for s in subjects
        for _ in range(rng.integers(0, 5))
    ]
    path = folder / "review.html"
    start = time.perf_counter()
    write_review_page(scans, pd.DataFrame(flags, columns=["subject", "structure", "flag", "detail"]), path)
    print(f"N = {n}: write_review_page {time.perf_counter() - start:.2f} s, {len(flags)} flags")
    return path


def measure(driver, page: Path, repeats: int) -> dict[str, float]:
    loads = []
    for _ in range(repeats):
        driver.get("about:blank")
        driver.get(page.as_uri())
        loads.append(driver.execute_async_script(FIRST_RENDER))
    fcp, dcl, load = (statistics.median(column) for column in zip(*loads))
    gaps = driver.execute_async_script(SCROLL_DOWN, MAX_FRAMES)[1:]
    to_top, to_bottom = (driver.execute_async_script(JUMP, down) for down in (False, True))
    filter_ms, shown = driver.execute_script(FILTER, "volume_outlier")
    return {
        "HTML size (MB)": page.stat().st_size / 1e6,
        "first-contentful-paint (ms)": fcp,
        "DOMContentLoaded (ms; keys, filters work)": dcl,
        "load (ms)": load,
        "scroll to the bottom (s)": sum(gaps) / 1000,
        "  frames": len(gaps),
        "  mean frame (ms)": statistics.mean(gaps),
        "  longest frame (ms)": max(gaps),
        "jump to the top (ms)": to_top,
        "jump to the bottom (ms)": to_bottom,
        "filter by one flag (ms)": filter_ms,
        "  cards shown": int(shown),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if reason := missing_browser():
        sys.exit(reason)
    print(f"{platform.node()}: {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        driver = start_chromium(Path(tmp))
        driver.set_script_timeout(600)
        print(f"{driver.capabilities['browserName']} {driver.capabilities['browserVersion']}, headless")
        results = {}
        try:
            for n in args.n:
                (Path(tmp) / str(n)).mkdir()
                results[n] = measure(driver, write_cohort(Path(tmp) / str(n), n), args.repeats)
        finally:
            driver.quit()
    first, last = args.n[0], args.n[-1]
    print(f"\n{'':44}" + "".join(f"{'N = ' + str(n):>12}" for n in args.n) + f"{f'{last}/{first}':>10}")
    for name in results[first]:
        values = [results[n][name] for n in args.n]
        print(f"{name:44}" + "".join(f"{v:12.3g}" for v in values) + f"{values[-1] / values[0]:10.2f}")


if __name__ == "__main__":
    main()
