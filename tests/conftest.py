"""Shared fixtures: one temporary DRG_LLAMA_CACHE per test session, so the tiny synthetic corpus is built once."""

import os

import pytest


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A fresh cache folder for the embedded synthetic corpus and converted models, set as DRG_LLAMA_CACHE."""
    folder = tmp_path_factory.mktemp("drg_cache")
    old = os.environ.get("DRG_LLAMA_CACHE")
    os.environ["DRG_LLAMA_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("DRG_LLAMA_CACHE")
    else:
        os.environ["DRG_LLAMA_CACHE"] = old
