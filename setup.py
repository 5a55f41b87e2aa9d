"""Kept for tools that still call setup.py; the package's metadata lives in pyproject.toml."""

from setuptools import setup

setup()
