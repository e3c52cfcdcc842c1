"""Data-parallel training under torchrun (gloo, 2 processes on loopback) equals one process."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_main import base_args, weights

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def torchrun(args, cwd, nproc=2, script=None, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script or ROOT / "main.py"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def single(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=240)


def max_diff(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_two_processes_and_resume_equal_one_process_float64(tiny_imdb):
    tmp = tiny_imdb["tmp"]
    common = base_args(tiny_imdb, "--dtype", "float64", "--save", "--lr-decay", "--word-dropout", "0.2")
    one = single(common + ["--epochs", "2", "--results-dir", str(tmp / "one")], tmp)
    assert one.returncode == 0, one.stderr
    # two processes for one epoch, then resumed under torchrun for the second
    first = torchrun(common + ["--epochs", "1", "--results-dir", str(tmp / "two")], tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    # resuming needs no data options: val split and vectors come from the run folder
    second = torchrun(["--load-path", str(tmp / "two"), "--epochs", "2", "--save",
                       "--data-dir", str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"])], tmp)
    assert second.returncode == 0, second.stderr[-3000:]
    assert max_diff(tmp / "one" / "final_model.pt", tmp / "two" / "final_model.pt") < 1e-5
    m1 = json.loads((tmp / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp / "two" / "metrics.json").read_text())
    assert m1["train_acc"] == pytest.approx(m2["train_acc"]) and m1["val_acc"] == pytest.approx(m2["val_acc"])
    assert m1["test_accuracy"] == pytest.approx(m2["test_accuracy"])
    # sharded test set, all-reduced count: the same accuracy as one process
    test = torchrun(["--execute", "test", "--load-path", str(tmp / "two"), "--data-dir", str(tiny_imdb["data"]),
                     "--cache-dir", str(tiny_imdb["cache"])], tmp)
    assert test.returncode == 0, test.stderr[-3000:]
    assert f"test accuracy {m2['test_accuracy']:.4f}" in test.stdout + test.stderr


def test_uneven_shards_and_only_rank0_writes(tiny_imdb):
    tmp = tiny_imdb["tmp"]
    # batch 7 over 2 ranks: parts of 4 and 3, so the per-rank estimates must be size-weighted
    # float64: one batch and two shards sum in different orders; in float32 Adam can turn those
    # last-bit differences of near-zero gradient entries into lr-sized weight differences
    common = base_args(tiny_imdb, "--epochs", "2", "--save", "--dtype", "float64")
    common[common.index("--batch_size") + 1] = "7"
    one = single(common + ["--results-dir", str(tmp / "one")], tmp)
    assert one.returncode == 0, one.stderr[-3000:]
    work = tmp / "work"
    work.mkdir()
    two = torchrun(common + ["--results-dir", str(tmp / "two")], work)
    assert two.returncode == 0, two.stderr[-3000:]
    diff = max_diff(tmp / "one" / "final_model.pt", tmp / "two" / "final_model.pt")
    assert diff < 1e-6, diff
    assert list(work.iterdir()) == []          # nothing written beside the run folder
    assert sorted(p.name for p in (tmp / "two").iterdir()) == sorted(p.name for p in (tmp / "one").iterdir())
    assert (tmp / "two" / "command.txt").read_text().count("main.py") == 1   # written once, by rank 0
    assert two.stdout.count("epoch 2/2:") + two.stderr.count("epoch 2/2:") == 1, two.stderr[-3000:]  # rank 0 logs


def test_failure_on_one_rank_stops_both_with_the_error(tiny_imdb):
    tmp = tiny_imdb["tmp"]
    wrapper = tmp / "fail_on_rank1.py"
    wrapper.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
sys.argv[0] = {str(ROOT / 'main.py')!r}
import main, loops
real = loops.train_epoch
def train_epoch(*args, **kw):
    if os.environ["RANK"] == "1" and kw.get("desc") == "epoch 2":
        raise RuntimeError("injected failure on rank 1")
    return real(*args, **kw)
loops.train_epoch = train_epoch
sys.exit(main.main())
""")
    res = torchrun(base_args(tiny_imdb, "--epochs", "3", "--save", "--results-dir", str(tmp / "run"),
                             "--dist-timeout", "60"), tmp, script=wrapper, timeout=200)
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr
    assert (tmp / "run" / "checkpoint.pt").exists()           # epoch 1 stays saved
    assert not (tmp / "run" / "final_model.pt").exists()
