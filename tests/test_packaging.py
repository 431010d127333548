"""The README's set-up, CI and the package metadata agree.

* The README's first command is one ``pip install`` of extras that exist, then the main job;
  the second is the test command. ``.ci/run`` runs both verbatim.
* ``pyproject.toml`` is the only metadata (no ``setup.py``); its version is the package's.
"""

import pathlib
import re

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = pathlib.Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
CI = (REPO / ".ci" / "run").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _bash_blocks(text):
    return [m.group(1).strip() for m in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M)]


def _quick_start():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return _bash_blocks(section)


def test_first_command_is_one_pip_install_and_the_main_job():
    first = _quick_start()[0]
    assert "\n" not in first, first
    install, job = [part.strip() for part in first.split("&&")]
    assert re.fullmatch(r'pip install -e "\.\[[a-z,]+\]"', install), install
    assert "--no-deps" not in first
    assert job == "python examples/continual_sine.py"
    extras = re.search(r"\[([a-z,]+)\]", install).group(1).split(",")
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"]), extras


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    install, job = [part.strip() for part in _quick_start()[0].split("&&")]
    test_command = _quick_start()[1]
    assert test_command == "python -m pytest -q tests"
    ci_lines = [line.strip() for line in CI.splitlines()]
    for command in (install, job, test_command):
        assert command in ci_lines, f".ci/run does not run {command!r}"


def test_pyproject_is_the_only_metadata():
    assert not (REPO / "setup.py").exists()
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "warpkeras.__version__"
    init = (REPO / "warpkeras" / "__init__.py").read_text()
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', init, re.M)
    assert (REPO / "warpkeras" / "py.typed").is_file()


def test_optional_packages_are_extras_not_requirements():
    core = " ".join(PYPROJECT["project"]["dependencies"])
    for name in (
        "tensorflow-datasets",
        "gymnasium",
        "matplotlib",
        "tensorflow-probability",
        "tf-keras",
    ):
        assert name not in core, name
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any("tensorflow-datasets" in r for r in extras["data"])
    assert any("gymnasium" in r for r in extras["rl"])
    assert any("matplotlib" in r for r in extras["plot"])
