"""RUN/report.html: one self-contained page of a run's figures and tables that opens offline.

plotly.js is embedded once in the page (no CDN), images are data URIs, the style sheet is inline: the file can
be mailed or opened from a laptop without network. The sections come from `report_sections`; this module lays
them out, writes the file, and records it in the run's manifest as the output of the "report" step.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from halluscope.plots.report_sections import Plot, Section, build_sections, headline
from halluscope.runs import Run, locked_step

__all__ = ["REPORT_NAME", "render_report", "report_step"]

REPORT_NAME = "report.html"

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0; color: #1f2328; }
header { padding: 1.2rem 2rem; background: #f6f8fa; border-bottom: 1px solid #d0d7de; }
header h1 { margin: 0 0 .4rem 0; font-size: 1.5rem; }
nav a { margin-right: 1rem; color: #0969da; text-decoration: none; }
main { padding: 0 2rem 3rem 2rem; max-width: 1400px; }
section { margin-top: 2rem; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
.absent { color: #6e7781; font-style: italic; }
.headline li { margin: .2rem 0; }
table.table { border-collapse: collapse; font-size: .85rem; margin: .8rem 0; }
table.table th, table.table td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left;
  vertical-align: top; }
table.table th { background: #f6f8fa; }
table.facts th { width: 14rem; }
"""


def _headline(run: Run) -> str:
    """The headline numbers as a list under the page title (nothing for a run without them)."""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in headline(run))
    return f'<ul class="headline">{items}</ul>' if items else ""


def _section_html(section: Section) -> str:
    """A section as HTML: its heading, then its fragments and figures in order (figures without plotly.js,
    which the page holds once)."""
    from plotly.io import to_html

    parts = []
    for item in section.body:
        if isinstance(item, Plot):
            parts.append(to_html(item.figure, full_html=False, include_plotlyjs=False, div_id=item.div_id,
                                 config={"displaylogo": False, "responsive": True}))
        else:
            parts.append(item)
    return (f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>\n' + "\n".join(parts)
            + "\n</section>")


def render_report(run: Run) -> str:
    """The whole page of `run` as one HTML string, plotly.js included.

    Example:
        >>> text = render_report(Run.open("runs/demo"))
    """
    from plotly.offline import get_plotlyjs

    model = run.manifest.get("model") or {}
    title = f"halluscope report: {model.get('name', 'unknown model')} ({model.get('family', '?')})"
    sections = build_sections(run)
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(_section_html(s) for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
<script>{get_plotlyjs()}</script>
</head>
<body>
<header><h1>{html.escape(title)}</h1><div>run <code>{html.escape(os.fspath(run.path))}</code></div>
{_headline(run)}<nav>{nav}</nav></header>
<main>
{body}
</main>
</body>
</html>
"""


@locked_step
def report_step(run_dir: str | os.PathLike[str]) -> Path:
    """`halluscope report`: write RUN/report.html from whatever steps the run has; returns its path.

    The page is built before the "report" step is recorded, so its manifest section shows the run as it was.

    Raises:
        RunError: `run_dir` holds no run.

    Example:
        >>> report_step("runs/demo")
        PosixPath('runs/demo/report.html')
    """
    run = Run.open(run_dir)
    text = render_report(run)
    run.begin_step("report", {}, force=True)  # derived from the run: always rebuilt
    path = run.write_file(REPORT_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    run.finish_step("report", {"file": REPORT_NAME, "bytes": path.stat().st_size})
    return path
