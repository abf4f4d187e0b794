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


@pytest.fixture(scope="session")
def tiny_runs(cache, tmp_path_factory):
    """One tiny training run per classifier variant (train -> best on val -> test -> baseline), shared by the session.

    Returns ``{variant: (run folder, results)}``. Tests that change a run work on a copy of it.
    """
    from drg_llama.train import CONFIG_DIR, main

    out = {}
    for variant in ("single_label", "two_label"):
        workdir = tmp_path_factory.mktemp(variant)
        cwd = os.getcwd()
        os.chdir(workdir)
        try:
            results = main(["--variant", variant, "--config", str(CONFIG_DIR / "tiny.yaml")])
        finally:
            os.chdir(cwd)
        out[variant] = (workdir / "runs" / variant / "version_0", results)
    return out
