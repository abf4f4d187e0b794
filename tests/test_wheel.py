"""Installed from a wheel, in a folder outside the checkout: train -> evaluate -> predict -> export all work.

The wheel is built from a copy of the sources and installed into a fresh virtual environment that sees this
environment's dependencies (torch, transformers, ...) through a ``.pth`` line but not the checkout, so every file the
commands need (the YAML configs above all) must come from the wheel.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of the checkout, built from a copy (a build writes build/ and *.egg-info beside setup.cfg)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for name in ("drg_llama", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # Without setuptools here (a fresh CI environment), pip fetches it into an isolated build environment.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--quiet", "-w", tmp_path / "dist", src]
    _run(pip, tmp_path, os.environ.copy())
    (wheel,) = (tmp_path / "dist").glob("drg_llama-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A virtual environment with the wheel installed and this environment's packages (not the checkout) visible."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True
    ).stdout.strip()
    # Directories named in a .pth file join sys.path, but their own .pth files are not run: an editable install of the
    # checkout in this environment stays invisible to the venv.
    dependencies = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(purelib, "dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel]
    _run(pip, tmp_path, env)
    return python


@pytest.mark.slow
def test_wheel_ships_configs_and_runs_the_chain_outside_the_checkout(cache, tmp_path):
    wheel = build_wheel(tmp_path)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "drg_llama").rglob("*.py")}
    configs = {"drg_llama/" + p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    assert not (sources | configs) - shipped, "add the missing package to setup.cfg [options] packages"
    data = {p.relative_to(REPO).as_posix() for p in (REPO / "drg_llama").rglob("*") if p.suffix in (".json", ".yaml")}
    assert data and not data - shipped, "add the missing data files to setup.cfg [options.package_data]"

    python = fresh_venv(tmp_path, wheel)
    work = tmp_path / "work"  # outside the checkout, no configs/ here
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"DRG_LLAMA_CACHE": str(cache)}
    where = _run([python, "-c", "import drg_llama; print(drg_llama.__file__)"], work, env).stdout.strip()
    assert where.startswith(str(tmp_path / "venv")), where

    train = ["--variant", "two_label", "--config", "configs/tiny.yaml", "--run_baseline", "false"]
    _run([python, "-m", "drg_llama.train", *train], work, env)
    run = work / "runs" / "two_label" / "version_0"
    _run([python, "-m", "drg_llama.evaluate", "--run", run], work, env)
    assert (run / "eval" / "metrics.json").is_file()
    (work / "notes.csv").write_text("id,text\na,sepsis with acute kidney injury\nb,heart failure\n")
    predict = ["--run", run, "--input", "notes.csv", "--output", "drgs.csv"]
    assert "predicted 2 notes" in _run([python, "-m", "drg_llama.predict", *predict], work, env).stdout
    _run([python, "-m", "drg_llama.export", "--run", run, "--out", "exported"], work, env)
    assert (work / "exported" / "model.safetensors").is_file() and (work / "exported" / "drg_llama.json").is_file()
