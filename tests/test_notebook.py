"""The seed's workflow as a notebook: it runs top to bottom on the synthetic raw CSV against a loopback server."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

pytestmark = pytest.mark.slow  # an end-to-end run


def test_dealdata_notebook_runs(tmp_path, monkeypatch):
    nb = nbformat.read(REPO / "form_data" / "dealData_wukong.ipynb", as_version=4)
    monkeypatch.setenv("WUKONG_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("WUKONG_N", "120")
    monkeypatch.delenv("WUKONG_RAW", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    work = Path(tmp_path / "work")
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "kept" in outputs and "images downloaded" in outputs
    assert (work / "images" / "train_clip.csv").is_file()
    assert (work / "samples.png").stat().st_size > 1000
    assert os.environ.get("WUKONG_RAW") is None
