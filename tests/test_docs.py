"""The documentation: the site builds with --strict, and the README stays short with valid links.

``mkdocs build --strict`` turns every warning into a failure: a link to a missing page or
anchor, a page missing from the nav, an API reference (``::: polyreg_cnf...``) that cannot be
collected, and griffe's warnings about docstrings it cannot read.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
MISSING = [name for name in NEEDED if importlib.util.find_spec(name.split(".")[0]) is None
           or importlib.util.find_spec(name) is None]
needs_mkdocs = pytest.mark.skipif(
    bool(MISSING), reason=f"the docs extra is not installed (missing {', '.join(MISSING)}); "
                          "pip install -c constraints.txt -e '.[docs]'")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(config), "--site-dir", str(site)],
                          capture_output=True, text=True, timeout=600, cwd=config.parent,
                          env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1"})


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = build(ROOT / "mkdocs.yml", out)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


@needs_mkdocs
def test_every_page_in_the_nav_is_built(site):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                yield from pages(value)
            else:
                yield value

    names = list(pages(config["nav"]))
    for required in ("results.md", "performance.md", "data.md", "vae.md", "multi-gpu.md",
                     "long-runs.md", "design.md", "cli.md", "api/engine.md"):
        assert required in names, required
    for name in names:
        html = site / ("index.html" if name == "index.md" else name[:-3] + "/index.html")
        assert html.is_file(), name
    # the committed result tables are pages of the site too, reached from results.md
    assert (site / "bench" / "long" / "index.html").is_file()


@needs_mkdocs
@pytest.mark.parametrize("page,names", [
    ("api/engine", ["polyreg_cnf.engine.ODEBlock", "polyreg_cnf.engine.odeint",
                    "polyreg_cnf.engine.trajectory_polynomial_penalty"]),
    ("api/callbacks", ["polyreg_cnf.callbacks.PolynomialTrajectoryRegularizer",
                       "polyreg_cnf.callbacks.NFEMonitor", "polyreg_cnf.callbacks.guard.RunGuard"]),
    ("api/datamodules", ["polyreg_cnf.datamodules.ToyDataModule",
                         "polyreg_cnf.datamodules.TabularDataModule"]),
    ("api/models", ["polyreg_cnf.models.CNFDensityEstimator", "polyreg_cnf.models.CNFVAE"]),
    ("api/app", ["polyreg_cnf.app.cli.main", "polyreg_cnf.app.config.RunConfig"]),
])
def test_api_reference_comes_from_the_docstrings(site, page, names):
    html = (site / page / "index.html").read_text()
    for name in names:
        assert f'id="{name}"' in html, name
    # doctest examples are rendered as code (``Example:`` headings read as examples sections)
    if page == "api/datamodules":
        assert "power/data.npy" in html and "&gt;&gt;&gt;" in html


@needs_mkdocs
def test_the_command_line_reference_lists_every_flag_of_the_parser(site):
    from polyreg_cnf.app.config import make_parser

    html = (site / "cli" / "index.html").read_text()
    assert "all flags --&gt;" not in html and "<!-- all flags -->" not in html
    flags = [s for a in make_parser()._actions for s in a.option_strings if s != "-h"]
    assert len(flags) > 50
    for flag in flags:
        assert f"<code>{flag}</code>" in html, flag


def small_site(tmp_path, index, plugins=("search",)):
    """The project's mkdocs settings on a two-page site in ``tmp_path``; returns the config."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(docs_dir=str(tmp_path / "docs"), nav=["index.md", "other.md"],
                  plugins=list(plugins), hooks=[str(ROOT / h) for h in config["hooks"]])
    (tmp_path / "docs").mkdir(exist_ok=True)
    (tmp_path / "docs" / "other.md").write_text("# Other\n")
    (tmp_path / "docs" / "index.md").write_text(f"# Home\n\n{index}\n")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    return tmp_path / "mkdocs.yml"


@needs_mkdocs
@pytest.mark.parametrize("target,code", [("other.md#other", 0), ("missing.md", 1),
                                         ("other.md#nowhere", 1)])
def test_the_configuration_is_strict_about_broken_links(tmp_path, target, code):
    proc = build(small_site(tmp_path, f"[a link]({target})"), tmp_path / "site")
    assert proc.returncode == code, (target, proc.stderr[-3000:])
    if code:
        assert target.split("#")[-1] in proc.stderr


@needs_mkdocs
@pytest.mark.parametrize("documented,code", [("x", 0), ("y", 1)])
def test_a_docstring_griffe_cannot_match_fails_the_build(tmp_path, documented, code):
    """The API pages' settings: a docstring that names a parameter the signature lacks fails."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (plugin,) = [p for p in config["plugins"] if isinstance(p, dict) and "mkdocstrings" in p]
    handler = plugin["mkdocstrings"]["handlers"]["python"]
    handler["paths"] = [str(tmp_path / "src")]
    handler["options"]["extensions"] = [str(ROOT / "docs" / "griffe_examples.py")]
    (tmp_path / "src" / "toypkg").mkdir(parents=True)
    (tmp_path / "src" / "toypkg" / "__init__.py").write_text(
        f'def f(x: int) -> int:\n    """Twice x.\n\n    Args:\n        {documented}: A number.\n'
        f'\n    Example:\n        >>> f(2)\n        4\n    """\n    return 2 * x\n')
    site = small_site(tmp_path, "::: toypkg", plugins=("search", plugin))
    proc = build(site, tmp_path / "site")
    assert proc.returncode == code, proc.stderr[-3000:]
    if code:
        assert "'y' does not appear in the function signature" in proc.stderr, proc.stderr


def test_the_api_pages_see_polyreg_cnf_as_installed():
    """docs/.api-layout/polyreg_cnf mirrors the installed package with links: every entry of
    polyreg_cnf/ plus callbacks/ and datamodules/ (which install inside it), none dangling."""
    mirror = ROOT / "docs" / ".api-layout" / "polyreg_cnf"
    links = {p.name: p for p in mirror.iterdir()}
    expected = {p.name for p in (ROOT / "polyreg_cnf").iterdir() if p.name != "__pycache__"}
    assert set(links) == expected | {"callbacks", "datamodules"}, (
        "add or remove the matching link in docs/.api-layout/polyreg_cnf")
    for name, link in links.items():
        assert link.is_symlink() and link.exists(), name
    assert links["callbacks"].resolve() == ROOT / "callbacks"
    assert links["engine"].resolve() == ROOT / "polyreg_cnf" / "engine"


def test_readme_is_short_and_keeps_its_sections():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert "Layout" in headings, headings
    assert "make test" in text and "polyreg-cnf train" in text
    assert "PolynomialTrajectoryRegularizer" in text and "from polyreg_cnf import odeint" in text


def test_readme_links_and_images_resolve():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(targets) >= 10, targets
    for target in targets:
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        assert (ROOT / target.split("#")[0]).exists(), target
