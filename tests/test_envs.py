"""The conda environments of `snakemake --sdm conda` (envs/): pins that agree with pyproject.toml and with each
other, the post-deploy script that installs ctcohort into them, and the start-up check they make unneeded."""

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, require_shared_data, workflow_command
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from ctcohort.nnunet_adapter import nnunet_version_problem

ENVS = REPO / "envs"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Dependencies of the driver only: Snakemake runs a rule's script with the environment's Python and puts its
# own modules on that script's path; pygments serves `snakemake --report`.
DRIVER_ONLY = {"snakemake", "pygments"}
# Block an import the way Python documents it (sys.modules[name] = None), then run snakemake's command line.
SNAKEMAKE_WITHOUT_TORCH = (
    "import sys; sys.modules['torch'] = None; from snakemake.cli import main; sys.argv[0] = 'snakemake'; main()"
)


def env_file(name: str) -> dict:
    return yaml.safe_load((ENVS / f"{name}.yaml").read_text())


def conda_specs(env: dict) -> dict[str, str]:
    """Conda package name -> the rest of its spec ('' when unpinned)."""
    specs = {}
    for item in env["dependencies"]:
        if isinstance(item, str):
            name, _, version = item.partition("=")
            specs[name] = version
    return specs


def pip_pins(env: dict) -> dict[str, Version]:
    """Normalized PyPI name -> exact version, from the env file's pip section (every entry must be `name==X`)."""
    sections = [item["pip"] for item in env["dependencies"] if isinstance(item, dict)]
    assert len(sections) == 1, sections
    pins = {}
    for line in sections[0]:
        requirement = Requirement(line)  # a path or an option (`-e ..`) does not parse
        (specifier,) = requirement.specifier
        assert specifier.operator == "==" and not requirement.extras and not requirement.marker, line
        pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def runtime_requirements(extra: str | None = None) -> list[Requirement]:
    lines = PYPROJECT["project"]["optional-dependencies"][extra] if extra else PYPROJECT["project"]["dependencies"]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("name", ["analysis", "segmentation"])
def test_env_file_parses_and_pins_every_package(name):
    env = env_file(name)
    assert env["channels"][0] == "conda-forge"
    conda = conda_specs(env)
    assert set(conda) == {"python", "pip"}, conda  # every other package through pip, pinned
    assert Version(conda["python"]) in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert pip_pins(env)


@pytest.mark.parametrize("name", ["analysis", "segmentation"])
def test_env_pins_satisfy_pyproject(name):
    pins = pip_pins(env_file(name))
    for requirement in runtime_requirements():
        if canonicalize_name(requirement.name) in DRIVER_ONLY:
            assert canonicalize_name(requirement.name) not in pins
            continue
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"envs/{name}.yaml lacks {requirement.name}"
        assert pinned in requirement.specifier, f"envs/{name}.yaml pins {requirement.name}=={pinned}: not {requirement}"
    # the post-deploy script builds ctcohort with the environment's setuptools (no build isolation)
    for line in PYPROJECT["build-system"]["requires"]:
        requirement = Requirement(line)
        assert pins[canonicalize_name(requirement.name)] in requirement.specifier, line


def test_segmentation_env_is_the_analysis_env_plus_nnunet():
    analysis, segmentation = pip_pins(env_file("analysis")), pip_pins(env_file("segmentation"))
    assert conda_specs(env_file("analysis")) == conda_specs(env_file("segmentation"))
    assert {name: segmentation.get(name) for name in analysis} == analysis
    assert set(segmentation) - set(analysis) == {"torch", "nnunetv2"}
    for requirement in runtime_requirements("segment"):
        assert segmentation[canonicalize_name(requirement.name)] in requirement.specifier, requirement
    # the version the nnU-Net adapter is written against
    assert nnunet_version_problem(str(segmentation["nnunetv2"])) is None


@pytest.mark.parametrize("name", ["analysis", "segmentation"])
def test_each_env_has_the_post_deploy_script(name):
    # Snakemake runs envs/NAME.post-deploy.sh (beside envs/NAME.yaml) in the environment it has just created
    script = ENVS / f"{name}.post-deploy.sh"
    assert script.read_text() == (ENVS / "analysis.post-deploy.sh").read_text()
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    rules = "".join(path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk"))
    assert f'"../../envs/{name}.yaml"' in rules


def checkout_copy(folder: Path) -> Path:
    """A checkout of ctcohort (its package, its packaging files and its resources) in ``folder``."""
    folder.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, folder / name)
    shutil.copytree(
        REPO / "src" / "ctcohort", folder / "src" / "ctcohort", ignore=shutil.ignore_patterns("__pycache__")
    )
    (folder / "resources").symlink_to(REPO / "resources")
    return folder


def environment_with_build_tools(folder: Path) -> Path:
    """A Python environment holding what envs/*.yaml's pip section brings for the install: pip and setuptools
    (linked from the test's own environment, so that nothing is downloaded)."""
    setuptools = importlib.metadata.version("setuptools")  # from 70.1 on, it builds wheels without `wheel`
    if Version(setuptools) < Version("70.1"):
        pytest.skip(f"setuptools {setuptools} here: the post-deploy install needs 70.1 or later")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    (site_packages,) = folder.glob("lib/python*/site-packages")
    for module in ("pip", "setuptools", "pkg_resources", "_distutils_hack"):
        spec = importlib.util.find_spec(module)
        if spec is None:  # pkg_resources and _distutils_hack: not in every setuptools
            continue
        source = Path(spec.origin).parent
        (site_packages / module).symlink_to(source)
        for info in source.parent.glob(f"{module}-*.dist-info"):
            (site_packages / info.name).symlink_to(info)
    return folder


def post_deploy(environment: Path, workdir: Path, checkout: Path | None) -> subprocess.CompletedProcess:
    """Run envs/analysis.post-deploy.sh as Snakemake does: a copy of it beside the environment, run with the
    interpreter of its first line in the activated environment, in the working directory of the run."""
    copy = environment.parent / f"{environment.name}.post-deploy.sh"
    shutil.copy(ENVS / "analysis.post-deploy.sh", copy)
    interpreter = copy.read_text().splitlines()[0][2:].strip()
    env = {key: value for key, value in os.environ.items() if key not in ("CTCOHORT_CHECKOUT", "PYTHONPATH")}
    if checkout is not None:
        env["CTCOHORT_CHECKOUT"] = str(checkout)
    return subprocess.run(
        ["bash", "-c", f"source '{environment}/bin/activate'; {interpreter} {copy}"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def env_python(environment: Path, code: str) -> str:
    result = subprocess.run(
        [str(environment / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        cwd=environment,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_post_deploy_installs_the_workflows_checkout(tmp_path):
    checkout = checkout_copy(tmp_path / "checkout")
    environment = environment_with_build_tools(tmp_path / "conda" / "0123abcd")
    study = tmp_path / "study"  # `snakemake --directory study`: the workflow gives its folder by CTCOHORT_CHECKOUT
    study.mkdir()
    assert env_python(environment, "import importlib.util; print(importlib.util.find_spec('ctcohort'))") == "None"

    result = post_deploy(environment, study, checkout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"from {checkout.resolve()}/src/ctcohort" in result.stdout
    where = env_python(
        environment,
        "import ctcohort, importlib.metadata as m; from ctcohort.resources import "
        "resources_dir; print(ctcohort.__file__, resources_dir(), m.distribution('ctcohort').version)",
    )
    module, resources, version = where.split()
    assert Path(module).resolve() == (checkout / "src" / "ctcohort" / "__init__.py").resolve()
    assert Path(resources) == checkout.resolve() / "resources" and version == PYPROJECT["project"]["version"]
    # editable: what changes in the checkout reaches the environment, which Snakemake does not rebuild for it
    (checkout / "src" / "ctcohort" / "probe_module.py").write_text("ANSWER = 42\n")
    assert env_python(environment, "from ctcohort.probe_module import ANSWER; print(ANSWER)") == "42"


def test_post_deploy_finds_the_checkout_above_the_working_directory(tmp_path):
    checkout = checkout_copy(tmp_path / "checkout")
    (checkout / "results").mkdir()
    environment = environment_with_build_tools(tmp_path / "conda" / "0123abcd")
    result = post_deploy(environment, checkout / "results", None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"from {checkout.resolve()}/src/ctcohort" in result.stdout


def test_post_deploy_without_a_checkout_fails_saying_what_to_set(tmp_path):
    environment = environment_with_build_tools(tmp_path / "conda" / "0123abcd")
    (tmp_path / "elsewhere").mkdir()
    result = post_deploy(environment, tmp_path / "elsewhere", None)
    assert result.returncode != 0
    assert "set CTCOHORT_CHECKOUT" in result.stderr
    bad = post_deploy(environment, tmp_path / "elsewhere", tmp_path / "elsewhere")
    assert bad.returncode != 0 and "set CTCOHORT_CHECKOUT" in bad.stderr


def dry_run_without_torch(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = workflow_command(workdir, {}, "--dry-run", *args)
    assert command[1:3] == ["-m", "snakemake"]
    command[1:3] = ["-c", SNAKEMAKE_WITHOUT_TORCH]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)


def test_sdm_conda_leaves_the_segmentation_packages_to_the_environment(tmp_path):
    # the demo segments with nnU-Net; a driver without torch is stopped at start-up ...
    plain = dry_run_without_torch(tmp_path)
    assert plain.returncode != 0 and "needs torch" in plain.stdout + plain.stderr, plain.stdout[-3000:]
    # ... but not when the rules run in their own conda environments, envs/segmentation.yaml holding torch
    conda = dry_run_without_torch(tmp_path, "--sdm", "conda")
    output = conda.stdout + conda.stderr
    assert "needs torch" not in output
    if shutil.which("conda"):
        assert conda.returncode == 0, output[-3000:]
        assert "segmentation.yaml will be created" in output, output[-3000:]
    else:  # the run got past the start-up check and stopped where Snakemake looks for conda
        assert conda.returncode != 0 and "conda info" in output, output[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("conda") is None, reason="conda is not installed: `snakemake --sdm conda` needs it")
def test_sdm_conda_runs_a_study_in_the_analysis_environment(tmp_path, request):
    """A precomputed-segmentation study of real CT copies, with the analysis environment created by conda
    (downloaded once, kept in pytest's cache folder), against the same study run in the test's environment."""
    folder = require_shared_data() / "totalseg-example"
    ct = nib.load(folder / "example_ct.nii.gz")
    hu = np.asanyarray(ct.dataobj).astype(np.int16)
    nib.save(nib.load(folder / "example_seg_v1.nii.gz"), tmp_path / "seg.nii.gz")
    rows = []
    for i in range(1, 4):
        nib.save(nib.Nifti1Image(hu + np.int16(i), ct.affine), tmp_path / f"s{i}.nii.gz")
        rows.append(
            {
                "subject": f"s{i}",
                "ct": str(tmp_path / f"s{i}.nii.gz"),
                "seg": str(tmp_path / "seg.nii.gz"),
                "age": 30 + 10 * i,
                "sex": "MF"[i % 2],
                "contrast": 0,
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.tsv", sep="\t", index=False)
    config = {"cohort": str(tmp_path / "cohort.tsv"), "segmentation": {"method": "precomputed"}}
    targets = ("results/tables/measurements.tsv", "results/tables/software_versions.tsv")
    cache = getattr(request.config, "cache", None)  # environments kept between runs, where pytest has a cache
    prefix = cache.mkdir("conda-envs") if cache else tmp_path / "conda-envs"
    tables = {}
    for name, args in (("conda", ("--sdm", "conda", "--conda-prefix", str(prefix))), ("local", ())):
        workdir = tmp_path / name
        workdir.mkdir()
        command = workflow_command(workdir, config, *args, *targets)
        result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=3600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        tables[name] = pd.read_csv(workdir / targets[0], sep="\t")
        versions = pd.read_csv(workdir / targets[1], sep="\t").set_index("software")["version"]
        if name == "conda":
            pins = pip_pins(env_file("analysis"))
            for package in ("numpy", "pandas", "nibabel", "scipy"):
                assert Version(versions[package]) == pins[package], versions
            assert versions["ctcohort"] == PYPROJECT["project"]["version"]
            assert "Running post-deploy script" in result.stderr
    assert tables["conda"]["subject"].nunique() == 3
    pd.testing.assert_frame_equal(tables["conda"], tables["local"], check_exact=False, rtol=1e-9)
