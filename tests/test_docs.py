"""The docs stay true to the code: every setting documented in docs/configuration.md (its reference table is
generated from the settings model's descriptions), every config example a valid config, every link between
the README and docs/ resolving to a file and a heading, and the README short enough to finish.

Regenerate the settings reference after changing a setting:

    .venv/bin/python -m tests.test_docs > /tmp/ref.md   # then paste it between the markers (or --write)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
START, END = "<!-- settings-reference:start -->", "<!-- settings-reference:end -->"
README_MAX_LINES = 300


def _default(field) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list | tuple):
        return "`[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def settings_reference() -> str:
    """The markdown table of every leaf setting of :class:`valuegate.settings.Settings`: key, default, and its
    ``description`` (the text ``valuegate run --help`` shows), in declaration order."""
    from valuegate.settings import setting_fields

    lines = ["| setting | default | meaning |", "|---|---|---|"]
    for path, field in setting_fields():
        text = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(f"| `{'.'.join(path)}` | {_default(field)} | {text} |")
    return "\n".join(lines)


def _documented_reference() -> str:
    text = CONFIGURATION.read_text(encoding="utf-8")
    assert START in text and END in text, f"{CONFIGURATION} has lost its {START} / {END} markers"
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_every_setting_is_documented_with_its_description():
    """docs/configuration.md's reference table is the settings model's own (a new or changed setting must be
    documented: regenerate with ``python -m tests.test_docs --write``)."""
    from valuegate.settings import setting_fields

    documented = _documented_reference()
    missing = [".".join(p) for p, _ in setting_fields() if f"| `{'.'.join(p)}` |" not in documented]
    assert not missing, f"settings not in docs/configuration.md: {missing} (python -m tests.test_docs --write)"
    assert documented == settings_reference(), ("docs/configuration.md's settings table differs from the "
                                                "settings' descriptions: python -m tests.test_docs --write")


def _toml_blocks(path: Path) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("page", ["README.md", "docs/configuration.md", "docs/scaling.md", "docs/your-data.md"])
def test_every_config_example_is_a_valid_config(page, tmp_path, monkeypatch):
    """A TOML example that no longer loads (a removed or renamed key, a bad value) fails here, not in a
    newcomer's hands."""
    from valuegate.settings import load_settings

    monkeypatch.chdir(tmp_path)
    for name in [k for k in __import__("os").environ if k.startswith("VALUEGATE_") and "__" in k]:
        monkeypatch.delenv(name)
    blocks = _toml_blocks(ROOT / page)
    assert blocks, f"{page} has no toml example"
    for i, block in enumerate(blocks):
        cfg = tmp_path / f"example{i}.toml"
        cfg.write_text(block, encoding="utf-8")
        load_settings(cfg)  # raises ValuegateError naming the key


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_to_a_file_and_a_heading(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), file, mailto
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if ROOT in dest.parents else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_is_a_page_a_newcomer_finishes():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move the detail to docs/ (< {README_MAX_LINES})"


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        text = CONFIGURATION.read_text(encoding="utf-8")
        head, rest = text.split(START, 1)
        CONFIGURATION.write_text(f"{head}{START}\n{settings_reference()}\n{END}{rest.split(END, 1)[1]}",
                                 encoding="utf-8")
    else:
        print(settings_reference())
