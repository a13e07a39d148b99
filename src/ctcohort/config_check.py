"""Checks of the study's configuration that its JSON schema cannot make, run by the main process before any job.

- ``typed_like_schema``: Snakemake reads a nested ``--config`` value (``--config measure='{scans_per_job: 2}'``)
  with YAML's base loader, so every number and boolean inside it arrives as text and the schema refuses it
  ("'2' is not of type 'integer'"). A text value where the schema wants no text is read again with YAML's
  safe loader and kept where that gives the type the schema wants; anything else is left for the schema to
  refuse.
- ``structure_reference_problems``: names of structures in the configuration that the structure table does not
  have. A misspelled member of ``statistics.combined`` would make the combination vanish with a warning in a
  log, and a misspelled panel would draw an empty panel: both are mistakes to stop at, naming the key.
- ``config_disagreements``: where config/config.yaml, the schema and config/README.md's table of keys disagree
  (a key missing from one of them, a README default other than config.yaml's value); a test runs it on the
  shipped files.
"""

import difflib
import re
from collections.abc import Iterable, Mapping

import yaml

JSON_TYPES = {
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "array": list,
    "object": dict,
    "null": type(None),
}
# the configuration's lists of {structure, measure} panels
PANEL_KEYS = (("figures", "boxplots"), ("figures", "scatter"), ("normative", "panels"))


def _resolve(schema: Mapping, root: Mapping) -> Mapping:
    reference = schema.get("$ref", "")
    if reference.startswith("#/"):
        for part in reference[2:].split("/"):
            root = root[part]
        return root
    return schema


def _types(schema: Mapping, root: Mapping) -> list[str]:
    """The JSON types a schema allows (of each alternative of oneOf / anyOf)."""
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for alternative in (*schema.get("oneOf", ()), *schema.get("anyOf", ())):
        kinds += _types(_resolve(alternative, root), root)
    return kinds


def _takes_text(value: str, schema: Mapping, root: Mapping) -> bool:
    """Whether the schema, or one of its alternatives, takes ``value`` as text: a string type, and its enum
    where it has one (so "297" for segmentation.task, whose text values are task names, is read as a number)."""
    kinds = schema.get("type", [])
    if "string" in ([kinds] if isinstance(kinds, str) else kinds):
        return value in schema.get("enum", [value])
    return any(
        _takes_text(value, _resolve(alternative, root), root)
        for alternative in (*schema.get("oneOf", ()), *schema.get("anyOf", ()))
    )


def _alternative_for(kind: str, schema: Mapping, root: Mapping) -> Mapping:
    """The alternative of a oneOf / anyOf schema that takes values of JSON type ``kind`` (e.g. the mapping form of
    segmentation.model), or the schema itself."""
    for alternative in (*schema.get("oneOf", ()), *schema.get("anyOf", ())):
        alternative = _resolve(alternative, root)
        if kind in _types(alternative, root):
            return _alternative_for(kind, alternative, root)
    return schema


def _matches(value, kinds: list[str]) -> bool:
    return any(
        isinstance(value, JSON_TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))
        for kind in kinds
        if kind in JSON_TYPES
    )


def typed_like_schema(value, schema: Mapping, root: Mapping | None = None):
    """``value`` (a configuration, or a part of it) with text that the schema wants as another type read as YAML
    where that gives that type (module docstring). Returns a new value; the input is not changed."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    kinds = _types(schema, root)
    if isinstance(value, str) and value in ("null", "~") and "null" in kinds:
        return None
    if isinstance(value, str) and kinds and not _takes_text(value, schema, root):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        # text that stays text (a misspelt enum value) is left for the schema to refuse
        return (
            typed_like_schema(parsed, schema, root)
            if _matches(parsed, kinds) and not isinstance(parsed, str)
            else value
        )
    if isinstance(value, dict):
        schema = _alternative_for("object", schema, root)
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            key: typed_like_schema(item, properties.get(key, extra if isinstance(extra, dict) else {}), root)
            for key, item in value.items()
        }
    if isinstance(value, list):
        schema = _alternative_for("array", schema, root)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [typed_like_schema(item, schema["items"], root) for item in value]
    return value


def _suggestion(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def structure_reference_problems(config: Mapping, structures: Iterable[str], table_name: str) -> list[str]:
    """One line per structure name of the configuration that is not in the structure table: members of
    ``statistics.combined``, and the structures of the figure and normative panels (which may also name a
    combined structure)."""
    known = set(structures)
    problems = []
    combined = config["statistics"].get("combined") or {}
    for name, members in combined.items():
        for member in members:
            if member not in known:
                problems.append(
                    f"config key statistics.combined.{name}: {member!r} is not a structure of table "
                    f"{table_name}{_suggestion(member, known)}"
                )
    panel_names = known | set(combined)
    for section, key in PANEL_KEYS:
        for index, panel in enumerate(config[section].get(key) or []):
            if panel["structure"] not in panel_names:
                problems.append(
                    f"config key {section}.{key}[{index}].structure: {panel['structure']!r} is neither a "
                    f"structure of table {table_name} nor a combined structure"
                    f"{_suggestion(panel['structure'], panel_names)}"
                )
    return problems


# a README default that describes a list or mapping by its length: "nine pairs", "three panels"
COUNT_WORDS = {
    word: n for n, word in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())
}


def _sections(schema: Mapping, root: Mapping) -> Mapping:
    """The fixed properties of an object schema (empty for a value such as a free mapping or a list)."""
    return _resolve(schema, root).get("properties", {})


def schema_keys(schema: Mapping, root: Mapping | None = None, prefix: str = "") -> list[str]:
    """Every key of the schema as a dotted name, down into the sections with fixed properties."""
    root = schema if root is None else root
    keys = []
    for name, item in _sections(schema, root).items():
        inner = schema_keys(item, root, f"{prefix}{name}.")
        keys += inner or [f"{prefix}{name}"]
    return keys


def config_values(config: Mapping, schema: Mapping, root: Mapping | None = None, prefix: str = "") -> dict:
    """Every key of ``config`` as a dotted name -> its value, down into the sections the schema gives fixed
    properties (a mapping of free names, statistics.combined, is one value)."""
    root = schema if root is None else root
    properties, values = _sections(schema, root), {}
    for name, value in config.items():
        item = properties.get(name, {})
        if isinstance(value, Mapping) and _sections(item, root):
            values.update(config_values(value, item, root, f"{prefix}{name}."))
        else:
            values[f"{prefix}{name}"] = value
    return values


def readme_defaults(text: str) -> dict[str, str]:
    """Key -> default cell of the README's table of keys (``| key | default | meaning |``). A row may name
    several keys of one section: `normative.families`, `tail_min_scans` (the later ones without the section)."""
    defaults, in_table = {}, False
    for line in text.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)]
        if cells[1:3] == ["key", "default"]:
            in_table = True
        elif in_table and not line.startswith("|"):
            break
        elif in_table and len(cells) > 3 and cells[1].startswith("`"):
            names = re.findall(r"`([^`]+)`", cells[1])
            section = names[0].rpartition(".")[0]
            for name in names:
                defaults[name if "." in name or not section else f"{section}.{name}"] = cells[2]
    return defaults


def documented_value_differs(cell: str, value) -> bool:
    """Whether a README default cell disagrees with config.yaml's ``value``: a `literal` read as YAML, or a
    count of entries ("nine pairs")."""
    literal = re.fullmatch(r"`([^`]*)`", cell)
    if literal:
        return yaml.safe_load(literal.group(1)) != value
    words = cell.split()
    if len(words) == 2 and words[0] in COUNT_WORDS:
        return not isinstance(value, (list, Mapping)) or len(value) != COUNT_WORDS[words[0]]
    return True


def config_disagreements(config: Mapping, schema: Mapping, readme: str) -> list[str]:
    """One line per disagreement of config.yaml (``config``), its schema and the README's table of keys: a key
    one of them lacks, or a README default that is not config.yaml's value."""
    values, keys, documented = config_values(config, schema), schema_keys(schema), readme_defaults(readme)
    problems = [f"config.yaml key {key} is not in the schema" for key in values if key not in keys]
    problems += [f"schema key {key} is not in config.yaml" for key in keys if key not in values]
    problems += [f"{key} has no row in config/README.md" for key in keys if key not in documented]
    problems += [f"config/README.md's {key} is not in the schema" for key in documented if key not in keys]
    problems += [
        f"config/README.md's default of {key}, {documented[key]}, is not config.yaml's {value!r}"
        for key, value in values.items()
        if key in documented and documented_value_differs(documented[key], value)
    ]
    return problems
