"""MkDocs hook: docs/config-files.md lists every file under conf/, read when the site is built.

A new config group option or entry config appears in the docs without anyone editing the page.
"""

from __future__ import annotations

from pathlib import Path

MARKER = "<!-- config files -->"
PAGE = "config-files.md"


def config_sections(conf: Path) -> str:
    """Markdown: entry configs, then one section per group, each file in a YAML block."""
    root = conf.parent
    entry = sorted(conf.glob("*.yaml"))
    groups: dict[str, list[Path]] = {}
    for path in sorted(conf.rglob("*.yaml")):
        if path.parent != conf:
            groups.setdefault(path.parent.relative_to(conf).as_posix(), []).append(path)
    out = ["## Entry configs", "", "One per script; `--cfg job` prints the composed result.", ""]
    sections = [(None, entry), *groups.items()]
    for group, paths in sections:
        if group is not None:
            out += [f"## `{group}/`", ""]
        for path in paths:
            text = path.read_text().rstrip()
            out += [f"### `{path.relative_to(root).as_posix()}`", "", "```yaml", text, "```", ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs calls it so
    if page.file.src_uri != PAGE:
        return markdown
    conf = Path(config["config_file_path"]).parent / "conf"
    return markdown.replace(MARKER, config_sections(conf))
