"""The quality review page, results/qc/review.html, and the decisions file that comes back from it.

Nobody looks at thousands of previews; the page says which scans to look at first. It is one static file that
opens from disk, offline: its style and script are inlined from resources/qc/ (no external URL, no font), the
cards are written here in review order (outlier score, highest first; no score last; ties by subject), each an
element with ``data-subject`` and ``data-score``, showing the pseudonym, the score, the preview (lazy) and the
flags grouped by structure. The script adds filters (by flag, by structure), a larger view, keyboard
navigation and the reviewer's decisions (exclude/accept a scan or one structure, with a reason), kept in the
browser's localStorage and downloaded as ``review_decisions.tsv`` (DECISION_COLUMNS; a blank structure is the
whole scan). ``read_decisions`` reads that file, or one written by hand, back.

At 10,000 scans the page is one file of about 8 MB that paints its first cards at once: the cards are plain HTML
that the browser lays out only near the viewport (``content-visibility: auto``), images load lazily, and the
filter index is built on the first filter change. ``benchmarks/review_page.py`` measures it in headless Chromium:
first paint as at 100 scans, keys and filters ready within a second, scrolling frames slower than at 100 scans
(the browser's per-element bookkeeping of lazy images and skipped cards grows with their number).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from ctcohort.qc import QCSettings
from ctcohort.resources import resources_dir

DECISION_COLUMNS = ["subject", "structure", "decision", "reason"]
DECISIONS = ("exclude", "accept")
SCAN_COLUMNS = ["subject", "score", "preview", "status"]
FLAG_COLUMNS = ["subject", "structure", "flag", "detail"]
DECISIONS_FILE = "review_decisions.tsv"  # the name the page downloads
# the img width/height attributes: qc.preview_png's shape (three square panels); the CSS keeps that aspect ratio
# whatever a preview's pixels are (a placeholder pixel stays a 3:1 box), so the layout never jumps
PREVIEW_SIZE = (QCSettings().preview_width, QCSettings().preview_width // 3)


def esc(text) -> str:
    """Text for HTML content and quoted attribute values."""
    return html.escape(str(text), quote=True)


def script_json(data) -> str:
    """JSON for a <script type="application/json"> element: '<', '>' and '&' as \\u escapes, so that no value
    can close the element (``</script>``) or start a comment."""
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def require_columns(table: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}")


def review_order(scans: pd.DataFrame) -> pd.DataFrame:
    """The scans in review order: score highest first, NaN last, ties by subject."""
    require_columns(scans, SCAN_COLUMNS, "review page scans")
    table = scans[SCAN_COLUMNS].copy()
    table["subject"] = table["subject"].astype(str)
    table["score"] = pd.to_numeric(table["score"], errors="raise").astype(float)
    for column in ("preview", "status"):
        table[column] = table[column].fillna("").astype(str)
    duplicated = table.loc[table["subject"].duplicated(), "subject"].tolist()
    if duplicated:
        raise ValueError(f"review page scans: subject(s) listed twice: {duplicated[:10]}")
    return table.sort_values(
        ["score", "subject"], ascending=[False, True], na_position="last", kind="stable"
    ).reset_index(drop=True)


def flag_table(flags: pd.DataFrame, subjects: pd.Series) -> pd.DataFrame:
    """FLAG_COLUMNS as text; a flag of a subject that is not among the scans is an error (it would silently
    vanish from the review)."""
    require_columns(flags, FLAG_COLUMNS, "review page flags")
    table = flags[FLAG_COLUMNS].fillna("").astype(str)
    unknown = sorted(set(table["subject"]) - set(subjects))
    if unknown:
        raise ValueError(f"review page flags: subject(s) not among the scans: {unknown[:10]}")
    return table


def score_text(score: float) -> str:
    return "no score" if math.isnan(score) else f"{score:.2f}"


def preview_html(preview: str) -> str:
    if not preview:
        return '<div class="preview none">no preview</div>'
    width, height = PREVIEW_SIZE
    # quote(): a relative URL whatever the path holds (a ':' or '#' cannot turn it into a link elsewhere)
    return (
        f'<img class="preview" src="{esc(quote(preview))}" loading="lazy" '
        f'width="{width}" height="{height}" alt="preview">'
    )


def decision_buttons() -> str:
    return "".join(f'<button class="{d}">{d}</button>' for d in DECISIONS)


def structure_html(structure: str, flags: list[tuple[str, str]]) -> str:
    """One structure's flags; a structure of its own (not the whole scan) gets its decision buttons."""
    items = "".join(
        f'<span data-flag="{esc(f)}">{esc(f)}{" <i>" + esc(d) + "</i>" if d else ""}</span>' for f, d in flags
    )
    buttons = decision_buttons() if structure else ""
    return f'<li data-structure="{esc(structure)}"><b>{esc(structure) or "scan"}</b> {items} {buttons}</li>'


def flags_html(structures: dict[str, list[tuple[str, str]]]) -> str:
    """The flags grouped by structure, scan-level flags first, then structures as the flags table lists them."""
    if not structures:
        return ""
    ordered = sorted(structures.items(), key=lambda item: item[0] != "")
    return "<ul>" + "".join(structure_html(s, flags) for s, flags in ordered) + "</ul>"


def flags_by_structure(flags: pd.DataFrame) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Per subject, per structure (in the table's order): its (flag, detail) pairs."""
    grouped = {}
    for subject, structure, flag, detail in zip(*(flags[c] for c in FLAG_COLUMNS)):
        grouped.setdefault(subject, {}).setdefault(structure, []).append((flag, detail))
    return grouped


def card_html(scan, structures: dict[str, list[tuple[str, str]]]) -> str:
    subject = esc(scan.subject)
    status = f'<p class="status">{esc(scan.status)}</p>' if scan.status else ""
    return (
        f'<article class="card{" failed" if scan.status else ""}" data-subject="{subject}" '
        f'data-score="{scan.score!r}"><h2>{subject}</h2> <span class="score">{score_text(scan.score)}</span> '
        f'<span class="scan-decision">{decision_buttons()}</span>{status}'
        f"{preview_html(scan.preview)}{flags_html(structures)}"
        f'<input class="reason" placeholder="reason"></article>\n'
    )


def options_html(values: list[str], any_label: str, labels: dict[str, str] | None = None) -> str:
    """<option>s: '*' for any, then each value (with its label where given)."""
    labels = labels or {}
    return f'<option value="*">{any_label}</option>' + "".join(
        f'<option value="{esc(v)}">{esc(labels.get(v, v))}</option>' for v in values
    )


def filters_html(flags: pd.DataFrame) -> str:
    """The flag and structure selects, with each flag's number of scans; '' is the whole-scan 'structure'."""
    scans_per_flag = flags.groupby("flag")["subject"].nunique().sort_index()
    flag_labels = {flag: f"{flag} ({n})" for flag, n in scans_per_flag.items()}
    structures = sorted(set(flags["structure"]))
    return (
        f'<label>flag <select id="flag-filter">{options_html(list(scans_per_flag.index), "any", flag_labels)}'
        f'</select></label> <label>structure <select id="structure-filter">'
        f"{options_html(structures, 'any', {'': 'whole scan'})}</select></label>"
    )


KEYS_HELP = (
    "<kbd>j</kbd>/<kbd>&darr;</kbd> next scan, <kbd>k</kbd>/<kbd>&uarr;</kbd> previous, "
    "<kbd>x</kbd> exclude the scan, <kbd>a</kbd> accept it, <kbd>Enter</kbd> larger view, "
    "<kbd>Esc</kbd> close it; a second click on a decision takes it back"
)


def page_html(scans: pd.DataFrame, flags: pd.DataFrame, title: str) -> str:
    ordered = review_order(scans)
    flags = flag_table(flags, ordered["subject"])
    grouped = flags_by_structure(flags)
    cards = "".join(card_html(scan, grouped.get(scan.subject, {})) for scan in ordered.itertuples(index=False))
    settings = {"title": title, "columns": DECISION_COLUMNS, "decisions": list(DECISIONS), "file": DECISIONS_FILE}
    style = (resources_dir() / "qc" / "review_page.css").read_text()
    script = (resources_dir() / "qc" / "review_page.js").read_text()
    n = len(ordered)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{style}</style></head>
<body>
<header><h1>{esc(title)}</h1>
<p>{n} scans, highest outlier score first. {filters_html(flags)}
<output id="count">{n}</output> of {n} shown. <output id="decided">0 decisions</output>
<button id="download">Download decisions (TSV)</button>
<label class="load">Load decisions <input type="file" id="load" accept=".tsv,.txt"></label></p>
<p class="keys">{KEYS_HELP}</p></header>
<main id="cards">
{cards}</main>
<div id="overlay" hidden><img alt=""></div>
<script type="application/json" id="review-settings">{script_json(settings)}</script>
<script>{script}</script>
</body></html>
"""


def write_review_page(
    scans: pd.DataFrame, flags: pd.DataFrame, path: str | Path, title: str = "ctcohort QC review"
) -> None:
    """Write the review page: ``scans`` (SCAN_COLUMNS: subject, score (NaN: none), preview (path relative to the
    page's folder, '' for none), status ('' for a measured scan, else the failure)), ``flags`` (FLAG_COLUMNS:
    subject, structure ('' for the whole scan), flag, detail). Other columns are ignored."""
    Path(path).write_text(page_html(scans, flags, title), encoding="utf-8")


# --- the decisions file -------------------------------------------------------------------------------------


def decision_row(fields: list[str], header: list[str], where: str) -> list[str]:
    """One line's DECISION_COLUMNS, checked: as many fields as the header (a missing trailing reason is
    blank), a subject, a known decision."""
    if len(fields) > len(header):
        raise ValueError(f"{where}: {len(fields)} fields, the header has {len(header)}")
    values = dict(zip(header, fields + [""] * (len(header) - len(fields))))
    row = [values[c].strip() for c in DECISION_COLUMNS]
    row[2] = row[2].lower()
    if not row[0]:
        raise ValueError(f"{where}: empty subject")
    if row[2] not in DECISIONS:
        raise ValueError(f"{where}: decision {values['decision']!r} is not one of {', '.join(DECISIONS)}")
    return row


def read_decisions(path: str | Path) -> pd.DataFrame:
    """A reviewer's decisions (tab-separated, a header naming at least DECISION_COLUMNS; blank lines skipped):
    DECISION_COLUMNS as text, structure '' for the whole scan. A bad line, or two lines that decide the same
    scan or structure differently, is a ValueError naming the line."""
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty, expected the header line {chr(9).join(DECISION_COLUMNS)!r}")
    header = [name.strip() for name in lines[0].split("\t")]
    missing = [c for c in DECISION_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path}, line 1: missing column(s) {missing} (the header must be tab-separated)")
    decided = {}  # (subject, structure) -> (line number, row); a repeated identical decision is kept once
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        row = decision_row(line.split("\t"), header, f"{path}, line {number}")
        earlier = decided.setdefault((row[0], row[1]), (number, row))
        if earlier[1][2] != row[2]:
            raise ValueError(
                f"{path}, line {number}: {row[2]} contradicts line {earlier[0]} ({earlier[1][2]}) for "
                f"subject {row[0]!r}{', structure ' + repr(row[1]) if row[1] else ''}"
            )
    return pd.DataFrame([row for _, row in decided.values()], columns=DECISION_COLUMNS, dtype=str)
