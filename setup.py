"""Metadata lives in setup.cfg; this file adds one build step.

The shipped ``gateway.ini`` and ``.env.example`` stay at the top of the source tree (where the
README's commands use them) and are copied into the package as ``meetinity_gateway/shipped/``
when a wheel is built, so an installed gateway can hand them out (``meetinity-gateway init``).
An editable install reads them from the source tree instead (:mod:`meetinity_gateway.shipped`).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
#: Files of the source tree that the installed package carries (kept in step with
#: meetinity_gateway/shipped.py and MANIFEST.in).
SHIPPED = ("gateway.ini", ".env.example", "README.md", "CHANGELOG.md", "LICENSE")


class BuildWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # the source tree is there: nothing to copy
            return
        target = Path(self.build_lib) / "meetinity_gateway" / "shipped"
        target.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED:
            shutil.copyfile(HERE / name, target / name)


setup(cmdclass={"build_py": BuildWithShippedFiles})
