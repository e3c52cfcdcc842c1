"""The shipped checkpoints in saved_models/: complete, small, loadable safely, and (with the real
data under ../shared/data and SEQLEARN_EP_SLOW=1) reproducing their recorded test accuracy."""
import json
import os
import subprocess
import sys

import pytest
import torch

import main
from conftest import REAL_DATA as SHARED_DATA  # ./data or ../shared/data
from conftest import ROOT

SAVED = ROOT / "saved_models"
FOLDERS = sorted(p for p in SAVED.glob("test_*") if p.is_dir()) if SAVED.is_dir() else []
RUN_SLOW = os.environ.get("SEQLEARN_EP_SLOW") == "1"


def test_the_seed_readme_folder_ships():
    names = [p.name for p in FOLDERS]
    assert "test_SNLI_25_300" in names and any(n.startswith("test_IMDB_") for n in names)


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_shipped_folder_is_complete_small_and_loads_safely(folder):
    files = {p.name for p in folder.iterdir()}
    assert {"best_model.pt", "config.json", "command.txt", "metrics.json", "accuracy.png",
            "embeddings.npz"} <= files
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 50 * 2**20
    ckpt = main.load_checkpoint(str(folder / "best_model.pt"))   # weights_only=True
    model = main.restore_model(ckpt, str(folder))
    dataset, seq_len, dim = folder.name.split("_")[1:]
    cfg = ckpt["config"]["model"]
    assert (cfg["dataset"], cfg["seq_len"], cfg["embed_dim"]) == (dataset, int(seq_len), int(dim))
    if dataset == "SNLI":
        assert cfg["fc_layers"] == [400, 3]          # the paper's SNLI architecture
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0 < metrics["test_accuracy"] < 1 and metrics["val_acc"]
    hyper = ckpt["config"]["hyper"]
    assert hyper["alg"] == "EP" and hyper["thirdphase"] is True
    assert "--thirdphase" in (folder / "command.txt").read_text()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.skipif(not RUN_SLOW, reason="slow (minutes): set SEQLEARN_EP_SLOW=1")
@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_shipped_checkpoint_reproduces_its_recorded_test_accuracy(folder):
    dataset = folder.name.split("_")[1]
    if not (SHARED_DATA / dataset.lower()).is_dir():
        pytest.skip(f"{dataset} data absent in ./data and ../shared/data")
    metrics = json.loads((folder / "metrics.json").read_text())
    res = subprocess.run([sys.executable, str(ROOT / "main.py"), "--execute", "test", "--load-path", str(folder),
                          "--data-dir", str(SHARED_DATA)], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (f"test accuracy {metrics['test_accuracy']:.4f} ({metrics['test_correct']}/"
            f"{metrics['test_samples']} correct") in res.stdout + res.stderr


def test_read_only_commands_change_nothing_in_the_loaded_folder(tmp_path):
    """The original tool's test and gducheck commands (shortened) and predict on a copy of the
    shipped SNLI folder: every file is byte for byte unchanged; gducheck writes elsewhere."""
    import shutil
    src = SAVED / "test_SNLI_25_300"
    if not (SHARED_DATA / "snli").is_dir():
        pytest.skip("SNLI data absent in ./data and ../shared/data")
    copy = tmp_path / "test_SNLI_25_300"
    shutil.copytree(src, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    common = ["--dataset", "SNLI", "--seqLen", "25", "--load-path", str(copy), "--data-dir", str(SHARED_DATA),
              "--cache-dir", str(tmp_path / "cache")]
    runs = [["--execute", "test", "--T", "5", "--thirdphase", "--batch_size", "200", "--max-test", "40"],
            ["--execute", "gducheck", "--T", "6", "--K", "3", "--thirdphase", "--batch_size", "200", "--save",
             "--gdu-samples", "2", "--gdu-max-entries", "1000"],
            ["--execute", "predict", "--premise", "A man plays a guitar.", "--hypothesis", "A person makes music."]]
    for extra in runs:
        proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *common, *extra], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert list((tmp_path / "results" / "SNLI").glob("*/*_gducheck/gdu_metrics.json"))
