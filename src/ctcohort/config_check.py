"""Checks of the study's configuration that its JSON schema cannot make, run by the main process before any job.

- ``typed_like_schema``: Snakemake reads a nested ``--config`` value (``--config measure='{scans_per_job: 2}'``)
  with YAML's base loader, so every number and boolean inside it arrives as text and the schema refuses it
  ("'2' is not of type 'integer'"). A text value where the schema wants no text is read again with YAML's
  safe loader and kept where that gives the type the schema wants; anything else is left for the schema to
  refuse.
- ``structure_reference_problems``: names of structures in the configuration that the structure table does not
  have. A misspelled member of ``statistics.combined`` would make the combination vanish with a warning in a
  log, and a misspelled panel would draw an empty panel: both are mistakes to stop at, naming the key.
"""

import difflib
from collections.abc import Iterable, Mapping

import yaml

JSON_TYPES = {"integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
              "null": type(None)}
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
    return any(_takes_text(value, _resolve(alternative, root), root)
               for alternative in (*schema.get("oneOf", ()), *schema.get("anyOf", ())))


def _alternative_for(kind: str, schema: Mapping, root: Mapping) -> Mapping:
    """The alternative of a oneOf / anyOf schema that takes values of JSON type ``kind`` (e.g. the mapping form of
    segmentation.model), or the schema itself."""
    for alternative in (*schema.get("oneOf", ()), *schema.get("anyOf", ())):
        alternative = _resolve(alternative, root)
        if kind in _types(alternative, root):
            return _alternative_for(kind, alternative, root)
    return schema


def _matches(value, kinds: list[str]) -> bool:
    return any(isinstance(value, JSON_TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))
               for kind in kinds if kind in JSON_TYPES)


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
        return typed_like_schema(parsed, schema, root) if _matches(parsed, kinds) and not isinstance(parsed, str) \
            else value
    if isinstance(value, dict):
        schema = _alternative_for("object", schema, root)
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {key: typed_like_schema(item, properties.get(key, extra if isinstance(extra, dict) else {}), root)
                for key, item in value.items()}
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
                problems.append(f"config key statistics.combined.{name}: {member!r} is not a structure of table "
                                f"{table_name}{_suggestion(member, known)}")
    panel_names = known | set(combined)
    for section, key in PANEL_KEYS:
        for index, panel in enumerate(config[section].get(key) or []):
            if panel["structure"] not in panel_names:
                problems.append(f"config key {section}.{key}[{index}].structure: {panel['structure']!r} is neither a "
                                f"structure of table {table_name} nor a combined structure"
                                f"{_suggestion(panel['structure'], panel_names)}")
    return problems
