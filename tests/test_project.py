"""The project's promises about itself: CI runs the README's test command, configs validate."""

import re

import jsonschema
import yaml
from conftest import REPO, SHEET_SCHEMA


def quickstart_commands():
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Quickstart$(.*?)^## ", text, re.M | re.S).group(1)
    return [block.strip() for block in re.findall(r"```\n(.*?)```", section, re.S)]


def test_readme_quickstart_has_two_commands_and_ci_runs_the_second():
    commands = quickstart_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "snakemake" in commands[0] and "--report" in commands[0]
    assert commands[1] in (REPO / ".ci" / "run").read_text().splitlines()


def test_shipped_config_validates_and_every_key_is_documented():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    jsonschema.validate(config, schema)
    documented = (REPO / "config" / "README.md").read_text()

    named_by_the_user = {"statistics.combined"}  # a mapping of names the user chooses: one documented key

    def leaf_keys(mapping, prefix=""):
        for key, value in mapping.items():
            if isinstance(value, dict) and f"{prefix}{key}" not in named_by_the_user:
                yield from leaf_keys(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    for name in leaf_keys(config):
        assert f"`{name}`" in documented, name


def test_example_sheet_columns_follow_the_schema():
    schema = yaml.safe_load(SHEET_SCHEMA.read_text())
    header = (REPO / "config" / "examples" / "cohort.tsv").read_text().splitlines()[0].split("\t")
    assert set(schema["required"]) <= set(header)
