"""mkdocs hooks: pages made from the code at build time, so they cannot drift from it.

* ``index.md`` is the README (its links into ``docs/`` rewritten to work inside the site);
* ``analyses/<name>.md``, one per registered analysis, and ``analyses/index.md`` come from
  :data:`vitlab.analysis.catalog.REGISTRY`: what the analysis measures (its module's docstring),
  the paper, its options (their keys, defaults and help), and its figure (``docs/figures/<name>.png``,
  drawn by ``python docs/figures.py``);
* ``options.md`` lists every option of a run and of the analyses, from their declarations.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def on_config(config):
    """List every registered analysis's page under "Analyses" in the navigation."""
    from vitlab.analysis.catalog import REGISTRY

    for entry in config["nav"]:
        if isinstance(entry, dict) and "Analyses" in entry:
            section = entry["Analyses"]
            section[1:1] = [{a.title: f"analyses/{a.name}.md"} for a in REGISTRY]
    return config


def on_files(files, config):
    """Add the generated pages to the site."""
    for path, text in generated_pages().items():
        files.append(File.generated(config, path, content=text))
    return files


def generated_pages() -> dict[str, str]:
    from vitlab.analysis.catalog import REGISTRY

    pages = {f"analyses/{a.name}.md": analysis_page(a) for a in REGISTRY}
    rows = "\n".join(f"| [{a.title}]({a.name}.md) | `{a.name}` | {a.paper} | {'yes' if a.default else 'no'} |"
                     for a in REGISTRY)
    pages["analyses/index.md"] = (
        "# Analyses\n\nEvery analysis vitlab runs, in report order, each registered once "
        "(`vitlab.analysis.catalog`). `vitlab compare` and `vitlab analyze` run the default set; "
        "`--analyses a,b` picks others.\n\n| analysis | name | paper | default |\n|---|---|---|---|\n" + rows + "\n")
    pages["options.md"] = options_page()
    pages["index.md"] = re.sub(r"\]\(docs/", "](", (ROOT / "README.md").read_text(encoding="utf-8"))
    return pages


def analysis_page(a) -> str:
    module = sys.modules[a.stream.__module__ if a.stream else a.run.__module__]
    doc = inspect.cleandoc(module.__doc__ or "")
    figure = ROOT / "docs" / "figures" / f"{a.name}.png"
    parts = [f"# {a.title}\n", f"`--analyses {a.name}` · {a.paper} · "
             f"{'in the default set' if a.default else 'not in the default set'} · "
             f"{'streamed (shares one pass over the images)' if a.streamed else 'a pass of its own'}\n",
             _rst_to_markdown(doc) + "\n"]
    if a.needs:
        parts.append("**Applies to** models whose anatomy describes: " + ", ".join(a.needs) + ".\n")
    if figure.exists():
        parts.append(f"## In the report\n\n![{a.title}](../figures/{a.name}.png)\n\n"
                     + a.caption.replace("{n}", "N") + "\n")
    else:
        parts.append("## In the report\n\n" + a.caption.replace("{n}", "N") + "\n")
    if a.options is not None:
        parts.append("## Options\n\n" + _options_table(a.options))
    parts.append(f"## API\n\n::: {module.__name__}\n    options:\n      show_root_heading: false\n")
    return "\n".join(parts)


def options_page() -> str:
    from vitlab.analysis.catalog import AnalysisOptions
    from vitlab.analysis.registry import RunOptions
    from vitlab.config import TrainConfig

    return ("# Options\n\nEvery option is declared once (`vitlab.options`); its key is both its "
            "command-line flag (`--key-with-dashes`) and a YAML key. In a config file, options sit in "
            "their sections (`optim: {lr: 0.001}`); a flat key at the top (`lr: 0.001`) is accepted too, "
            "so configs written before the sections existed still load.\n\n"
            "## Training (`vitlab train`, `pretrain`, `finetune`; `config.yaml`)\n\n" + _options_table(TrainConfig)
            + "\n## Analyses (`vitlab compare`, `analyze`)\n\n" + _options_table(RunOptions)
            + "\n" + _options_table(AnalysisOptions))


def _options_table(cls) -> str:
    from vitlab.options import leaves

    rows = []
    for leaf in leaves(cls):
        default = leaf.default if leaf.default not in (None, {}, ()) else "none"
        choices = f" One of: {', '.join(map(str, leaf.spec.choices))}." if leaf.spec.choices else ""
        rows.append(f"| `{leaf.flag}` | `{leaf.dotted}` | `{default}` | {leaf.spec.help}.{choices} |")
    return "| flag | YAML path | default | what it sets |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


def _rst_to_markdown(text: str) -> str:
    """The docstrings' reST inline markup as Markdown: ``code`` and :role:`target`."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):(<code>)~?([\w.]*?)([\w]+)(</code>)")


def on_page_content(html: str, page, config, files) -> str:
    """The docstrings' reST roles as plain code: ``:class:`~a.b.C``` reads ``C``, ``:func:`x.f``` ``x.f``."""
    html = _ROLE.sub(lambda m: m.group(1) + (m.group(3) if "~" in m.group(0) else m.group(2) + m.group(3)) + m.group(4),
                     html)
    return html.replace("::</p>", ":</p>")  # a reST literal-block marker before a code block
