"""environment.yml (conda) and pyproject.toml (pip) describe the same environment."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import tomllib

import pytest

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from crosslib.constants import REPO_ROOT


def normalise(requirements: list[str]) -> dict[str, str]:
    """name -> specifier (sorted), so that `A>=1,<2` and `a<2, >=1` compare equal."""
    out = {}
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name not in out, f"{name} is listed twice"
        out[name] = ",".join(sorted(str(s) for s in req.specifier)) + (f";{req.marker}" if req.marker else "")
    return out


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def conda_environment() -> tuple[list, list[str]]:
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip section"
    return [d for d in deps if isinstance(d, str)], pip_sections[0]


def test_environment_yml_and_pyproject_list_the_same_packages():
    project = pyproject()["project"]
    expected = normalise(project["dependencies"] + project["optional-dependencies"]["dev"])
    _, pip = conda_environment()
    local = [p for p in pip if p.startswith("-e") or p.startswith(".")]
    assert local == ["-e ."], "environment.yml's pip section must install the project itself with `-e .`"
    listed = normalise([p for p in pip if p not in local])
    missing = sorted(set(expected) - set(listed))
    extra = sorted(set(listed) - set(expected))
    assert not missing, f"in pyproject.toml but not in environment.yml: {missing}"
    assert not extra, f"in environment.yml but not in pyproject.toml: {extra}"
    differ = {n: (expected[n], listed[n]) for n in expected if expected[n] != listed[n]}
    assert not differ, f"versions differ (pyproject, environment.yml): {differ}"


def test_python_version_agrees():
    conda, _ = conda_environment()
    pythons = [d for d in conda if d.replace(" ", "").startswith("python=")]
    assert len(pythons) == 1, "environment.yml must pin python"
    version = pythons[0].split("=", 1)[1].strip()
    assert version in SpecifierSet(pyproject()["project"]["requires-python"]), (version, pyproject()["project"]["requires-python"])


def test_torch_is_the_pinned_cpu_build():
    deps = normalise(pyproject()["project"]["dependencies"])
    assert deps["torch"] == "==2.13.0"
    assert importlib.metadata.version("torch").startswith("2.13.0")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_set_up_refuses_a_full_disk_before_installing_anything(tmp_path):
    """A set-up that runs out of disk half-way leaves a broken .venv; `make` checks the space first."""

    def check_disk(gib: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "-s", "check-disk", f"SETUP_FREE_GIB={gib}", f"VENV={tmp_path / 'not-yet' / '.venv'}"],
            cwd=REPO_ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)},
        )

    enough = check_disk(0)
    assert enough.returncode == 0, enough.stderr
    too_much = check_disk(10**9)  # a billion GiB: no disk has that
    assert too_much.returncode != 0
    assert "not enough free disk for set-up: it needs about 1000000000 GiB" in too_much.stderr
    assert "VENV=" in too_much.stderr and "TMPDIR=" in too_much.stderr
