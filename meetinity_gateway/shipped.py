"""The files the gateway ships besides its code: ``gateway.ini`` and ``.env.example`` (and the
README, changelog and license), found wherever the package is.

A wheel carries them in ``meetinity_gateway/shipped/`` (copied there by ``setup.py`` at build
time); an editable install or a source checkout reads them at the top of the source tree,
where the README's commands use them. ``meetinity-gateway init`` writes a starting
``gateway.ini`` from here.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["SHIPPED_FILES", "shipped_file"]

#: What :func:`shipped_file` can find (kept in step with ``setup.py`` and ``MANIFEST.in``).
SHIPPED_FILES = ("gateway.ini", ".env.example", "README.md", "CHANGELOG.md", "LICENSE")

_PACKAGE = Path(__file__).resolve().parent


def shipped_file(name: str) -> Path:
    """The path of the shipped file ``name``; FileNotFoundError naming where it looked."""
    if name not in SHIPPED_FILES:
        raise ValueError(f"not a shipped file: {name!r} (one of {', '.join(SHIPPED_FILES)})")
    places = (_PACKAGE / "shipped" / name, _PACKAGE.parent / name)
    for path in places:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} is in neither {places[0].parent} nor {places[1].parent}: "
                            "reinstall the package")
