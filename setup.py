"""Packaging beyond pyproject.toml: the top-level folders targets/, native/ and schedules/ go into the wheel as
hyq_tvm/_data/NAME (read through hyq_tvm.resources.data_dir)."""
from setuptools import find_namespace_packages, setup

DATA = {"targets": ["*.toml"], "native": ["*.c"], "schedules": ["*/*/*.json"]}

setup(packages=find_namespace_packages(include=["hyq_tvm*"]) + [f"hyq_tvm._data.{d}" for d in DATA],
      package_dir={f"hyq_tvm._data.{d}": d for d in DATA},
      package_data={"hyq_tvm": ["checkpoints/*.safetensors", "checkpoints/*.json"],
                    **{f"hyq_tvm._data.{d}": files for d, files in DATA.items()}})
