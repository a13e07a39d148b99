"""Configuration mistakes stop before any job, naming the key; nested --config values get the schema's types."""

import dataclasses
import subprocess

import jsonschema
import pytest
import yaml
from conftest import REPO, workflow_command

from ctcohort import centiles, config_defaults, ct_age, imaging, patients, qc, segment, stats, train
from ctcohort.config_check import (
    config_disagreements,
    config_values,
    readme_defaults,
    schema_keys,
    structure_reference_problems,
    typed_like_schema,
)
from ctcohort.structures import load_structure_table

SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
SCHEMA_KEYS = schema_keys(SCHEMA)


README = (REPO / "config" / "README.md").read_text()
# each stage's settings: how the workflow builds them from the whole config, and the config section that holds
# their fields key for key (None: fields spread over sections, or optional keys the shipped config leaves out)
SETTINGS = {
    segment.SegmentationSettings: (
        lambda c: segment.SegmentationSettings.from_config(c["segmentation"]),
        ("segmentation",),
    ),
    qc.QCSettings: (qc.QCSettings.from_config, None),
    imaging.ScanChecks: (lambda c: imaging.ScanChecks.from_config(c["measure"]["ct_checks"]), ("measure", "ct_checks")),
    stats.StatisticsSettings: (lambda c: stats.StatisticsSettings.from_config(c["statistics"]), ("statistics",)),
    patients.PatientSettings: (lambda c: patients.PatientSettings.from_config(c["statistics"]), ("statistics",)),
    train.TrainingSettings: (lambda c: train.TrainingSettings.from_config(c["training"]), None),
    centiles.CentileSettings: (lambda c: centiles.CentileSettings.from_config(c["normative"]), None),
    ct_age.CtAgeSettings: (lambda c: ct_age.CtAgeSettings.from_config(c["ct_age"]), ("ct_age",)),
}


def shipped_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_config_yaml_the_schema_and_the_readme_agree():
    assert config_disagreements(shipped_config(), SCHEMA, README) == []


def test_a_disagreement_of_config_yaml_the_schema_or_the_readme_is_named():
    config, schema = shipped_config(), yaml.safe_load(yaml.safe_dump(SCHEMA))
    config["measure"]["min_voxels"] = 11
    config["qc"]["preview_height"] = 200
    del config["statistics"]["combined"]["hips"]
    del config["segmentation"]["checkpoint"]
    del schema["properties"]["ct_age"]["properties"]["threads"]
    readme = README.replace("| `training.half` | `false` |", "| `training.half` | `true` |")
    readme = readme.replace("| `demo.seed` |", "| `demo.sed` |")
    assert sorted(config_disagreements(config, schema, readme)) == sorted(
        [
            "config.yaml key qc.preview_height is not in the schema",
            "config.yaml key ct_age.threads is not in the schema",
            "schema key segmentation.checkpoint is not in config.yaml",
            "demo.seed has no row in config/README.md",
            "config/README.md's demo.sed is not in the schema",
            "config/README.md's ct_age.threads is not in the schema",
            "config/README.md's default of measure.min_voxels, `10`, is not config.yaml's 11",
            "config/README.md's default of training.half, `true`, is not config.yaml's False",
            f"config/README.md's default of statistics.combined, nine pairs, is not config.yaml's "
            f"{config['statistics']['combined']!r}",
        ]
    )


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda settings: settings.__name__)
def test_each_stages_settings_default_to_config_yamls_values(settings):
    build, section = SETTINGS[settings]
    config = shipped_config()
    assert build(config) == settings()
    if section:  # every field is a key of its section, so that a default cannot hide from config.yaml
        keys = config[section[0]] if len(section) == 1 else config[section[0]][section[1]]
        assert {field.name for field in dataclasses.fields(settings)} <= set(keys)


def test_a_config_yaml_value_other_than_the_default_is_seen():
    config = shipped_config()
    config["segmentation"]["tile_step"] = 0.8
    config["measure"]["min_voxels"] = 11
    config["statistics"]["min_n"] = 12
    for settings in (segment.SegmentationSettings, qc.QCSettings, stats.StatisticsSettings):
        assert SETTINGS[settings][0](config) != settings()


def test_config_yaml_and_the_readme_are_what_the_generator_writes():
    generated = config_defaults.generated_files(REPO)
    for name, path in config_defaults.PATHS.items():
        assert (REPO / path).read_text() == generated[name], (
            f"{path} is not current: run `python -m ctcohort.config_defaults` in the repository's root"
        )


def test_every_stages_settings_class_has_its_section():
    held = {settings for classes in config_defaults.SETTINGS_OF_SECTION.values() for settings in classes}
    assert set(SETTINGS) <= held


CHANGED_DEFAULTS = {
    "measure.min_voxels": 12,
    "segmentation.folds": [0, 1, 2, 3, 4],
    "normative.gaic_penalty": None,
    "training.small_configuration.patch_voxels": 1000,
    "statistics.combined": {"kidneys": ["kidney_left", "kidney_right"], "hips": ["hip_left", "hip_right"]},
}


def test_a_changed_default_reaches_config_yaml_and_the_readme():
    text = (REPO / "config" / "config.yaml").read_text()
    changed = config_defaults.config_with_defaults(text, CHANGED_DEFAULTS)
    expected = shipped_config()
    expected["measure"]["min_voxels"] = 12
    expected["segmentation"]["folds"] = [0, 1, 2, 3, 4]
    expected["normative"]["gaic_penalty"] = None
    expected["training"]["small_configuration"]["patch_voxels"] = 1000
    expected["statistics"]["combined"] = CHANGED_DEFAULTS["statistics.combined"]
    assert yaml.safe_load(changed) == expected
    # the lines' comments and every comment line stay
    assert "    patch_voxels: 1000  # 48^3\n" in changed
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert comments == [line for line in changed.splitlines() if line.lstrip().startswith("#")]
    assert len(text.splitlines()) - len(changed.splitlines()) == 9 - 2  # the combined block: nine pairs, now two
    readme = config_defaults.readme_with_defaults(README, config_values(yaml.safe_load(changed), SCHEMA))
    defaults = readme_defaults(readme)
    assert defaults["measure.min_voxels"] == "`12`" and defaults["normative.gaic_penalty"] == "`null`"
    assert defaults["segmentation.folds"] == "`[0, 1, 2, 3, 4]`" and defaults["statistics.combined"] == "two pairs"
    assert config_disagreements(yaml.safe_load(changed), SCHEMA, readme) == []
    assert config_defaults.config_with_defaults(text, config_defaults.settings_defaults(SCHEMA_KEYS)) == text


def test_two_classes_that_give_one_key_two_defaults_are_refused(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class OtherStatistics:
        min_n: int = 11

    sections = {"statistics": (stats.StatisticsSettings, OtherStatistics)}
    monkeypatch.setattr(config_defaults, "SETTINGS_OF_SECTION", sections)
    with pytest.raises(ValueError, match="statistics.min_n: two defaults, 10 and 11"):
        config_defaults.settings_defaults(SCHEMA_KEYS)


def test_the_command_rewrites_a_stale_file_and_checks(tmp_path):
    for path in (*config_defaults.PATHS.values(), config_defaults.SCHEMA):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text((REPO / path).read_text())
    readme = tmp_path / config_defaults.PATHS["readme"]
    readme.write_text(readme.read_text().replace("| `qc.preview_width` | `600` |", "| `qc.preview_width` | `800` |"))
    assert config_defaults.main(["--root", str(tmp_path), "--check"]) == 1
    assert config_defaults.main(["--root", str(tmp_path)]) == 0
    assert readme.read_text() == README
    assert config_defaults.main(["--root", str(tmp_path), "--check"]) == 0


def as_base_loader_reads(value):
    """What Snakemake makes of a nested --config value: YAML's base loader, every scalar a string."""
    return yaml.load(yaml.safe_dump(value), Loader=yaml.BaseLoader)


def test_nested_config_values_get_the_schemas_types():
    config = shipped_config()
    config["measure"] = as_base_loader_reads({**config["measure"], "scans_per_job": 2})
    config["statistics"] = as_base_loader_reads({**config["statistics"], "alpha": 0.05})
    config["qc"] = as_base_loader_reads({**config["qc"], "plausible_volumes": None})
    assert config["measure"]["scans_per_job"] == "2" and config["qc"]["plausible_volumes"] == "null"
    with pytest.raises(jsonschema.ValidationError, match="' is not of type 'integer'"):
        jsonschema.validate(config, SCHEMA)
    typed = typed_like_schema(config, SCHEMA)
    jsonschema.validate(typed, SCHEMA)
    assert typed["measure"]["scans_per_job"] == 2 and typed["statistics"]["alpha"] == 0.05
    assert typed["measure"]["ct_checks"]["max_spacing_mm"] == 15.0 and typed["qc"]["preview"] is True
    assert typed["qc"]["plausible_volumes"] is None and typed["qc"]["hu_window"] == [-1100, 3000]
    assert typed["statistics"]["combined"] == shipped_config()["statistics"]["combined"]  # text stays text
    assert typed["structures"] == "total_v1"


def test_a_model_mapping_on_the_command_line_gets_its_tasks_typed():
    config = shipped_config()
    models = {"total": {"folder": "/m", "task": 297}, "body": {"folder": "/m", "task": None}, "plain": "/p"}
    config["segmentation"] = as_base_loader_reads({**config["segmentation"], "model": models})
    assert config["segmentation"]["model"]["total"]["task"] == "297"
    typed = typed_like_schema(config, SCHEMA)
    jsonschema.validate(typed, SCHEMA)
    assert typed["segmentation"]["model"] == models


def test_text_that_is_not_the_wanted_type_is_left_for_the_schema_to_refuse():
    config = shipped_config()
    config["measure"]["scans_per_job"] = "two"
    config["figures"]["age_edges"] = "quartiles"  # text is one of age_edges' types: kept
    typed = typed_like_schema(config, SCHEMA)
    assert typed["measure"]["scans_per_job"] == "two" and typed["figures"]["age_edges"] == "quartiles"
    device = SCHEMA["properties"]["segmentation"]["properties"]["device"]
    assert typed_like_schema("gpu", device, SCHEMA) == "gpu"  # text, but none of the enum's: kept
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        jsonschema.validate(typed, SCHEMA)


def test_the_shipped_configuration_names_only_known_structures():
    names = load_structure_table("total_v1")["name"]
    assert structure_reference_problems(shipped_config(), names, "total_v1") == []


def test_misspelled_structures_are_named_with_their_key():
    config = shipped_config()
    config["statistics"]["combined"]["kidneys"] = ["kidney_left", "kidny_right"]
    config["figures"]["scatter"][1]["structure"] = "hipps"
    config["normative"]["panels"].append({"structure": "spleeen", "measure": "volume_ml"})
    problems = structure_reference_problems(config, load_structure_table("total_v1")["name"], "total_v1")
    assert problems == [
        "config key statistics.combined.kidneys: 'kidny_right' is not a structure of table total_v1 "
        "(did you mean 'kidney_right'?)",
        "config key figures.scatter[1].structure: 'hipps' is neither a structure of table total_v1 nor a combined "
        "structure (did you mean 'hips'?)",
        "config key normative.panels[3].structure: 'spleeen' is neither a structure of table total_v1 nor a "
        "combined structure (did you mean 'spleen'?)",
    ]


def dry_run(tmp_path, *config_args):
    """A dry run of the shipped config in ``tmp_path`` with ``--config`` values, as a user types them."""
    command = workflow_command(tmp_path, {}, "--dry-run", "--config", *config_args)
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_a_nested_config_value_as_the_readme_teaches_it_works(tmp_path):
    result = dry_run(tmp_path, "measure={scans_per_job: 2, border_margin: 3}")
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_misspelled_combined_member_stops_before_any_job(tmp_path):
    result = dry_run(tmp_path, "statistics={combined: {kidneys: [kidney_left, kidny_right]}}")
    assert result.returncode != 0
    assert "config key statistics.combined.kidneys: 'kidny_right' is not a structure" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()
