"""The documentation site builds in strict mode (a broken link, anchor or API reference fails it),
and strict mode does catch a broken link and a broken anchor."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_site_builds_in_strict_mode(tmp_path):
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    site = tmp_path / "site"
    # The generated pages are there: the configuration table from the schema, the notebook, the API.
    keys = (site / "configuration" / "keys" / "index.html").read_text()
    assert "train.ema_decay" in keys and "dist.meta_init" in keys
    assert "load_model" in (site / "api" / "index.html").read_text()
    assert (site / "tutorial" / "index.html").is_file()


def test_strict_mode_fails_on_a_broken_link_and_a_broken_anchor(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "tutorial.ipynb", copy / "examples" / "tutorial.ipynb")
    page = copy / "docs" / "serving.md"
    page.write_text(page.read_text() + "\n[gone](no-such-page.md) and [nowhere](export.md#no-such-heading)\n")
    result = build(copy, tmp_path / "site")
    assert result.returncode != 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert any("no-such-page.md" in line for line in warnings), result.stderr
    assert any("no-such-heading" in line for line in warnings), result.stderr


def test_the_test_extra_brings_the_docs_tools():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on, as in tests/test_packaging.py
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", req)[0] for req in extras["docs"]}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings", "mkdocstrings-python", "mkdocs-gen-files",
            "mkdocs-jupyter"} <= names
    assert "moevlm[docs]" in extras["test"] and not any("mkdocs" in req for req in extras["all"])
