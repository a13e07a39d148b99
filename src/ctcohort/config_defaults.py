"""config/config.yaml's values and config/README.md's default column, written from the settings classes.

A key that a stage's settings class holds (a field of the same name in the class a section maps to in
SETTINGS_OF_SECTION) has its default in that field and nowhere else: ``python -m ctcohort.config_defaults``
writes it into config.yaml (the line's comment and every other line kept) and then every key's value into the
README's default column. A key no class holds (``demo.n_subjects``, ``figures.boxplots``, ...) has its
default in config.yaml alone. So a change of a default is one edit, the field or the config.yaml line, and
this command; tests/test_config_check.py fails while the files are not what it would write.
"""

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from ctcohort.centiles import CentileSettings
from ctcohort.config_check import COUNT_WORDS, config_values, documented_value_differs, readme_defaults, schema_keys
from ctcohort.ct_age import CtAgeSettings
from ctcohort.imaging import ScanChecks
from ctcohort.normative import ChartSettings
from ctcohort.patients import PatientSettings
from ctcohort.qc import QCSettings
from ctcohort.segment import SegmentationSettings
from ctcohort.stats import StatisticsSettings
from ctcohort.train import SmallConfiguration, TrainingSettings

# config section -> the settings classes whose fields of a key's name hold its default (a key two classes hold
# must have one default in both)
SETTINGS_OF_SECTION = {
    "segmentation": (SegmentationSettings,),
    "measure": (QCSettings,),
    "measure.ct_checks": (ScanChecks,),
    "qc": (QCSettings,),
    "statistics": (StatisticsSettings, PatientSettings),
    "training": (TrainingSettings,),
    "training.small_configuration": (SmallConfiguration,),
    "normative": (ChartSettings, CentileSettings),
    "ct_age": (CtAgeSettings,),
}
PATHS = {"config": Path("config/config.yaml"), "readme": Path("config/README.md")}
SCHEMA = Path("workflow/schemas/config.schema.yaml")
LONGEST_LITERAL = 48  # a longer list or mapping is described in the README by its length ("nine pairs")


def plain(value):
    """A field's default as config.yaml holds it: tuples as lists, mappings as dicts."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def _field_default(item: dataclasses.Field):
    if item.default is not dataclasses.MISSING:
        return item.default
    return item.default_factory()  # type: ignore[misc]


def settings_defaults(keys) -> dict:
    """Dotted config key -> its default, for every key of ``keys`` that a settings class holds."""
    defaults = {}
    for section, classes in SETTINGS_OF_SECTION.items():
        for settings in classes:
            for item in dataclasses.fields(settings):
                key, value = f"{section}.{item.name}", plain(_field_default(item))
                if key not in keys or dataclasses.is_dataclass(value):
                    continue
                if key in defaults and not same_value(defaults[key], value):
                    raise ValueError(f"{key}: two defaults, {defaults[key]!r} and {value!r} ({settings.__name__})")
                defaults[key] = value
    return defaults


def same_value(a, b) -> bool:
    """Equal as configuration values: 3 is 3.0, but true is not 1."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def flow(value) -> str:
    """A value in YAML's flow style, as config.yaml writes it: `[a, b]`, `{k: v}`, `""`, `null`."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key}: {flow(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(item) for item in value) + "]"
    if isinstance(value, str) and (value == "" or yaml.safe_load(value) != value or re.search(r"[:#,\[\]{}]", value)):
        return json.dumps(value)
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)(?P<comment>\s+#.*)?$")


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """The index after the block of lines more indented than ``indent`` that follows line ``start``."""
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return end


def _block(value, indent: int) -> list[str]:
    text = yaml.safe_dump(value, default_flow_style=None, sort_keys=False, width=10**6)
    return [" " * (indent + 2) + line for line in text.splitlines()]


def config_with_defaults(text: str, defaults: Mapping) -> str:
    """config.yaml's text with each key of ``defaults`` set to its default where its value differs; comments,
    order and every other line as they were. A block value (a mapping over several lines) is rewritten whole."""
    lines, path, index = text.splitlines(), [], 0
    while index < len(lines):
        match = KEY_LINE.match(lines[index])
        if not match or lines[index].lstrip().startswith("#"):
            index += 1
            continue
        indent = len(match["indent"])
        path = [(level, key) for level, key in path if level < indent] + [(indent, match["key"])]
        key, end = ".".join(key for _, key in path), _block_end(lines, index, indent)
        inline = match["value"].strip()
        current = yaml.safe_load(inline) if inline else yaml.safe_load("\n".join(lines[index + 1 : end]) or "null")
        if key in defaults and not same_value(current, defaults[key]):
            if inline or not isinstance(defaults[key], Mapping):
                lines[index : end if not inline else index + 1] = [
                    f"{match['indent']}{match['key']}: {flow(defaults[key])}{match['comment'] or ''}"
                ]
            else:
                lines[index + 1 : end] = _block(defaults[key], indent)
        index += 1
    return "\n".join(lines) + "\n"


def default_cell(value, cell: str) -> str:
    """The README's default cell for config.yaml's ``value``: the cell as it is where it agrees, else the value
    as a literal, or for a long list or mapping its length in words with the cell's noun ("nine pairs")."""
    if not documented_value_differs(cell, value):
        return cell
    literal = flow(value)
    words = cell.split()
    if len(literal) > LONGEST_LITERAL and isinstance(value, (list, Mapping)) and len(value) < len(COUNT_WORDS):
        noun = words[1] if len(words) == 2 and words[0] in COUNT_WORDS else "entries"
        return f"{list(COUNT_WORDS)[len(value)]} {noun}"
    return f"`{literal.replace('|', chr(92) + '|')}`"


def readme_with_defaults(text: str, values: Mapping) -> str:
    """config/README.md with each key's default cell set from config.yaml's ``values`` (dotted keys)."""
    documented, lines = readme_defaults(text), text.splitlines()
    for number, line in enumerate(lines):
        cells = re.split(r"(?<!\\)\|", line)
        names = re.findall(r"`([^`]+)`", cells[1]) if line.startswith("| `") and len(cells) > 3 else []
        if len(names) == 1 and names[0] in values:
            cells[2] = f" {default_cell(values[names[0]], documented[names[0]])} "
            lines[number] = "|".join(cells)
    return "\n".join(lines) + "\n"


def generated_files(root: Path) -> dict[str, str]:
    """What config.yaml and config/README.md should read: name (``PATHS``) -> text."""
    schema = yaml.safe_load((root / SCHEMA).read_text())
    config_text = config_with_defaults((root / PATHS["config"]).read_text(), settings_defaults(schema_keys(schema)))
    values = config_values(yaml.safe_load(config_text), schema)
    return {"config": config_text, "readme": readme_with_defaults((root / PATHS["readme"]).read_text(), values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository (default: here)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 where a file is not current")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generated_files(args.root).items():
        path = args.root / PATHS[name]
        if path.read_text() != text:
            stale.append(str(PATHS[name]))
            if not args.check:
                path.write_text(text)
    verb = "not current" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "config.yaml and config/README.md are current")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
