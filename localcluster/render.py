"""Render the jinja2 templates under templates/ into config files, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,
)


def render(template: str, **values: Any) -> str:
    return _env.get_template(template).render(**values)


def write_file(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write `text` to `path` atomically with `mode`; True when the content changed."""
    try:
        if path.read_text() == text and (path.stat().st_mode & 0o7777) == mode:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def render_to(path: Path, template: str, mode: int = 0o644, **values: Any) -> bool:
    return write_file(path, render(template, **values), mode)
