"""The API reference: Sphinx builds it from the docstrings with warnings as errors, and every public
function and class (the ``__all__`` of krflows and of each of its modules) is in it."""

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import krflows

ROOT = Path(__file__).resolve().parent.parent


def public_modules() -> list[str]:
    names = ["krflows"] + [m.name for m in pkgutil.walk_packages(krflows.__path__, "krflows.")]
    return [n for n in names if not n.rsplit(".", 1)[-1].startswith("_")]


def test_every_module_has_a_page():
    pages = {p.stem for p in (ROOT / "docs" / "api").glob("*.rst")}
    assert set(public_modules()) <= pages, sorted(set(public_modules()) - pages)


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors_and_cover_the_api(tmp_path):
    pytest.importorskip("sphinx")
    out = tmp_path / "html"
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ids = set()
    for page in (out / "api").glob("*.html"):
        ids.update(re.findall(r'id="(krflows[\w.]*)"', page.read_text()))
    missing = []
    for name in public_modules():
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue  # submodules (their own pages), constants
            canonical = f"{obj.__module__}.{obj.__qualname__}"
            if f"{name}.{attr}" not in ids and canonical not in ids:
                missing.append(f"{name}.{attr}")
    assert not missing, f"not in the API reference: {missing}"


def test_readmes_embed_their_figures_and_stay_inside_the_repo():
    text = (ROOT / "experiments" / "README.md").read_text()
    figures = {p.name for p in (ROOT / "experiments" / "results").glob("*.png")}
    embedded = set(re.findall(r"!\[[^\]]+\]\(results/([\w.]+\.png)\)", text))
    assert figures and embedded == figures, figures ^ embedded
    for readme in ("README.md", "experiments/README.md", "benchmarks/README.md"):
        path = ROOT / readme
        body = path.read_text()
        assert "/work/" not in body, readme
        for link in re.findall(r"\]\(([^)#]+)\)", body):
            if "://" not in link:
                assert (path.parent / link).exists(), (readme, link)
    readme = (ROOT / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cu124" in readme
    assert "not a configuration we test" in readme
