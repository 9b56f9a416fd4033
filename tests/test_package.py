"""Cheap guards of the package and the docs site (no build here: benchmarks/package_check.sh builds the wheel and
runs the demo from it, and CI runs `mkdocs build --strict`): the license the metadata states, mkdocs.yml's nav
against docs/, the API pages' `::: target` against the code, and no relative link in docs/ that the site cannot
serve (one that leaves docs/, or whose target is missing)."""

import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


class _MkdocsLoader(yaml.SafeLoader):
    """mkdocs.yml may hold `!!python/...` tags (the toc slugify function): read them as None."""


_MkdocsLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def mkdocs_config() -> dict:
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_MkdocsLoader)  # noqa: S506 (a SafeLoader)


def nav_pages(nav) -> list[str]:
    """Every page path in a (nested) mkdocs nav."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for item in nav for page in nav_pages(item)]


def test_license_is_mit_in_the_metadata_and_the_file():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_nav_lists_every_docs_page_and_only_existing_ones():
    config = mkdocs_config()
    assert config["docs_dir"] == "docs"
    pages = nav_pages(config["nav"])
    assert len(pages) == len(set(pages)), "a page is twice in the nav"
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"
    # every hand-written page (docs/*.md, docs/api/*.md; docs/results/ holds generated reports linked from them)
    written = {p.relative_to(DOCS).as_posix() for p in [*DOCS.glob("*.md"), *DOCS.glob("api/*.md")]}
    assert not written - set(pages), f"pages missing from mkdocs.yml's nav: {sorted(written - set(pages))}"


def api_targets() -> list[tuple[str, str]]:
    return [(page.name, match) for page in sorted((DOCS / "api").glob("*.md"))
            for match in re.findall(r"^::: *([\w.]+)", page.read_text(), flags=re.M)]


@pytest.mark.parametrize(("page", "target"), api_targets())
def test_api_page_targets_exist(page, target):
    """`::: backsmooth.x.y` is a module, or a name in one."""
    assert target.startswith("backsmooth"), target
    try:
        importlib.import_module(target)
    except ModuleNotFoundError:
        module, _, name = target.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{page}: {target} does not exist"


def test_api_pages_cover_the_public_subpackages():
    targets = {target for _, target in api_targets()}
    for module in ("backsmooth", "backsmooth.methods", "backsmooth.attacks", "backsmooth.evaluation",
                   "backsmooth.training", "backsmooth.models", "backsmooth.data"):
        assert module in targets, f"no API page documents {module}"


LINK = re.compile(r"\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")


def relative_links(text: str) -> list[str]:
    """The relative link targets of Markdown text, outside fenced code blocks and code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:|#", target)]


def test_docs_links_stay_inside_docs_and_exist():
    """mkdocs serves docs/ only: `--strict` fails on a link that leaves it (../README.md, ../benchmarks/...);
    name such files as code (`benchmarks/foo.sh`) instead."""
    bad = []
    for page in sorted(DOCS.rglob("*.md")):
        for target in relative_links(page.read_text()):
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(DOCS.resolve()) or not path.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target}")
    assert not bad, "links the docs site cannot serve:\n" + "\n".join(bad)
