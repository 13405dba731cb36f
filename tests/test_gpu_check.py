"""bench/gpu_check.py --tiny: every stage of the GPU check runs at toy sizes on the CPU through the same code as the
full GPU run (so the script cannot rot while no GPU is at hand), and writes its JSON and Markdown results."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

TRAINING = ("dvae", "vqgan", "dalle", "clip", "styled_vq", "torchrun", "resume")


@pytest.mark.slow
def test_gpu_check_tiny_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((out / "gpu_results.json").read_text(encoding="utf-8"))
    stages = doc["stages"]
    assert list(stages) == ["dvae", "vqgan", "dalle", "clip", "styled_vq", "fp16", "torchrun", "fsdp", "resume",
                            "generate", "rerank"]
    assert doc["meta"]["mode"] == "tiny" and doc["meta"]["peak_flops"] > 0 and doc["meta"]["bandwidth"] > 0
    # fp16 needs CUDA: skipped with the toolkit's own refusal as the reason; every other stage ran
    assert stages["fp16"]["status"] == "skipped" and "needs CUDA" in stages["fp16"]["reason"]
    assert all(r["status"] == "ok" for name, r in stages.items() if name != "fp16"), {
        n: r.get("error") for n, r in stages.items()}
    for name in TRAINING:
        r = stages[name]
        assert r["loss_finite"] and r["loss_falls"] and r["loss_last"] < r["loss_first"], (name, r["losses"])
        assert r["steps_per_s"] > 0 and r["samples_per_s"] > 0 and r["peak_memory_bytes"] > 0, name
        if name != "resume":
            assert r["flops_per_step"] > 0 and r["flop_formula"] and 0 < r["mfu"] < math.inf, name
    assert stages["dalle"]["tokens_per_s"] > stages["dalle"]["samples_per_s"]
    assert stages["vqgan"]["gan_on_from_step"] is not None
    assert stages["resume"]["identical"] and stages["resume"]["checkpoints_at_kill"] == ["ckpt-00000004.pt"]
    assert stages["torchrun"]["world_size"] == 1 and stages["torchrun"]["backend"] == "gloo"  # joined, even alone
    fsdp = stages["fsdp"]
    assert fsdp["loss_finite"] and fsdp["loss_falls"] and fsdp["eval"] and fsdp["world_size"] == 1
    gen = stages["generate"]
    assert gen["images"] == 8 and gen["images_per_s"] > 0
    assert gen["decode_tokens_per_s"] > 0 and 0 < gen["decode_ratio_to_bound"] and gen["decode_bytes_per_token"] > 0
    rerank = stages["rerank"]
    for model in ("clip zh-tiny", "brivl brivl_tiny"):
        rows = rerank[model]
        assert rows["fp32_batch1"]["images_per_s"] > 0
        assert rows["bf16_batch32"]["ratio_to_fp32_batch1"] > 0
        assert "needs CUDA" in rows["fp16_batch32"]["skipped"]
    md = (out / "gpu_results.md").read_text(encoding="utf-8")
    assert "| stage | status | steps/s |" in md and "MFU" in md
    for name in stages:
        assert f"| {name} |" in md
    # --tiny never writes over the committed full-size results
    assert not (REPO / "bench" / "gpu_results.json").exists() or (
        json.loads((REPO / "bench" / "gpu_results.json").read_text(encoding="utf-8"))["meta"]["mode"] == "full")
