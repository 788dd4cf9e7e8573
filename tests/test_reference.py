"""The docs' reference pages (docs/reference/, README's backend table) are what the code generates now, and
the generator covers what it claims to: every Make variable, every spec field with a description, every
backend, every OpenAI feature the tests probe."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from _openai_features import FEATURES
from pydantic import BaseModel

from builder import backends, reference
from builder.spec import BuildSpec

ROOT = Path(__file__).resolve().parents[1]


def test_committed_pages_equal_a_fresh_generation():
    assert not reference.stale(ROOT), "stale generated docs: run `make docs` (python -m builder.reference) and commit"


def test_check_fails_on_an_edited_page_and_a_write_fixes_it(tmp_path):
    for name in ("README.md", "Makefile"):
        shutil.copy2(ROOT / name, tmp_path / name)
    assert reference.main(["--root", str(tmp_path)]) == 0
    assert reference.main(["--root", str(tmp_path), "--check"]) == 0
    page = tmp_path / "docs" / "reference" / "backends.md"
    page.write_text(page.read_text().replace("llama-server", "llama-serve"))
    assert reference.main(["--root", str(tmp_path), "--check"]) == 1
    assert reference.stale(tmp_path) == [page]
    assert reference.main(["--root", str(tmp_path)]) == 0 and not reference.stale(tmp_path)


def test_readme_table_sits_between_its_markers():
    readme = (ROOT / "README.md").read_text()
    table = readme.split(reference.README_START, 1)[1].split(reference.README_END, 1)[0]
    assert table.strip() == reference.backend_table().strip()
    with pytest.raises(ValueError, match="markers"):
        reference.readme_with_table("# no markers here\n")


def test_every_make_variable_is_in_the_table():
    makefile = (ROOT / "Makefile").read_text()
    spec_vars = set(re.search(r"SPEC_VARS := ((?:.*\\\n)*.*)", makefile).group(1).replace("\\", " ").split())
    rows = {row[0].strip("`") for row in reference.make_variables()}
    assert rows == spec_vars
    page = reference.make_variables_page()
    assert "| `QUANT` | `--quant` | `quant` |" in page and "| `TAG` | `--tag` | `tag` | `latest` |" in page


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", info
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _fields(info.annotation, f"{prefix}{name}.")


def test_every_spec_field_has_a_description_on_the_page():
    page = reference.spec_page()
    for name, info in _fields(BuildSpec):
        assert info.description, f"BuildSpec field {name} has no description"
        assert f"| `{name}` |" in page, name


def test_every_backend_has_its_row():
    table = reference.backend_table()
    for b in backends.REGISTRY.values():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{b.name}` |"))
        assert b.dockerfile in row and ("serve (unmerged)" in row) == b.serves_adapters
        assert ("NVIDIA GPU" in row) == (b.gpu or "GPU" in (b.hardware or ""))


def test_openai_table_lists_the_probed_features_and_the_records_gaps():
    assert tuple(backends.OPENAI_FEATURES) == FEATURES  # the features tests/_openai_features.py probes
    head, rows = reference.openai_rows()
    column = head.index("Xinference, transformers engine")
    gaps = backends.get("xinference").openai_gaps(BuildSpec(xinference_engine="transformers"))
    for feature, row in zip(backends.OPENAI_FEATURES, rows, strict=True):
        assert row[column] == ("no" if feature in gaps else "yes"), feature
    assert all(row[head.index("llama.cpp")] == "yes" for row in rows)


# ---- the README and the site around the generated pages ---------------------------------------------------

README_MAX_LINES = 150


def _links(markdown: str) -> list[str]:
    return [target for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", markdown) if "://" not in target]


def test_readme_is_short_and_leads_to_the_two_commands_and_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES, "the README is the way in: move detail to docs/"
    for must in ("make demo", "make test", "make image", "docker compose up", "from openai import OpenAI"):
        assert must in readme, must
    links = _links(readme)
    assert "docs/getting-started.md" in links
    missing = [target for target in links if not (ROOT / target).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_site_navigation_holds_every_page_once():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == pages, "add the page to mkdocs.yml's nav (or remove it from the nav)"
    assert config["strict"] is True and set(config["validation"].values()) == {"warn"}


def test_the_site_builds_in_strict_mode(tmp_path):
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True)
    build(config)  # a broken link or anchor, or a page left out of the nav, raises under strict
    assert (tmp_path / "site" / "security" / "index.html").is_file()
