"""Pages made at build time (mkdocs-gen-files), so they cannot drift from the code:

- ``configuration/keys.md``: every config key with its default and help text, read from the schema
  (``moevlm.config.describe_fields``, what ``moevlm train --help-config`` prints), and what each preset sets;
- ``tutorial.ipynb``: ``examples/tutorial.ipynb`` as it is, which mkdocs-jupyter renders without running it.
"""

import html
from pathlib import Path

import mkdocs_gen_files

from moevlm.config import PRESETS, describe_fields

ROOT = Path(__file__).resolve().parents[1]


def cell(text: str) -> str:
    """A Markdown table cell of plain text: ``<bos>`` and ``a * b`` shown as written, pipes escaped, never empty."""
    return html.escape(text, quote=False).replace("*", "\\*").replace("|", "\\|") or " "


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def keys_page() -> str:
    lines = ["# Every configuration key", "",
             "Generated from the schema's field help (`src/moevlm/config/model.py` and `training.py`) when "
             "the site is built: the same text `moevlm train --help-config` prints. Defaults are the "
             "schema's; a preset (table at the end) changes some of them. Set any key with `--set KEY=VALUE` "
             "or in a YAML `--config` file; `vision.`, `decoder.`, `moe.`, `projector.` and `tokenizer.` are short for "
             "`model.vision.` and so on.", ""]
    sections: dict[str, list[str]] = {}
    for key, default, text in describe_fields():
        rows = sections.setdefault(key.rsplit(".", 1)[0], [])
        rows.append(f"| `{key}` | `{default.replace('|', ' or ')}` | {cell(text)} |")
    for section, rows in sections.items():
        lines += ["", f"## `{section}`", "", "| key | default | meaning |", "|---|---|---|", *rows]
    lines += ["", "## What each preset sets", "",
              "A preset is a set of values over the defaults above (`src/moevlm/config/presets.py`).", "",
              "| preset | values |", "|---|---|"]
    for name, values in PRESETS.items():
        listed = ", ".join(f"`{key}={value}`" for key, value in flatten(values).items())
        lines.append(f"| `{name}` | {listed.replace('|', ' or ') if values else 'the defaults'} |")
    return "\n".join(lines) + "\n"


with mkdocs_gen_files.open("configuration/keys.md", "w") as page:
    page.write(keys_page())
mkdocs_gen_files.set_edit_path("configuration/keys.md", "gen_pages.py")
with mkdocs_gen_files.open("tutorial.ipynb", "w") as notebook:
    notebook.write((ROOT / "examples" / "tutorial.ipynb").read_text())
