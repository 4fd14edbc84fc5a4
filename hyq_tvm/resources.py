"""Data folders that ship with the package: targets/ (one TOML per board), native/ (the QEMU plugin source) and
schedules/ (the committed tuning databases).

In a checkout they are top-level folders of the repository; setup.py puts them into the wheel as
hyq_tvm/_data/NAME, so an installed package finds them from any directory.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """hyq_tvm/_data/NAME in an installed wheel, else NAME/ at the top of the checkout."""
    packaged = PACKAGE / "_data" / name
    return packaged if packaged.is_dir() else PACKAGE.parent / name
