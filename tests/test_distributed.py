"""Multi-process training with PyTorch DDP, as a user launches it on several GPUs, here on
CPU with the gloo backend: each phase script under `torchrun --nproc_per_node 2` finishes,
rank 0 alone writes one checkpoint, and both ranks end with the same weights (their
checksums are printed). The user shards are checked to partition every epoch's users."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from dataset import atomic_save  # noqa: E402
from trainer import shard  # noqa: E402
from synthetic import make_dataset  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TRAIN = ["--epochs", "2", "--quiet", "--batch-size", "8", "--eval-batch-size", "16"]


@pytest.mark.parametrize("users,world", [(10, 1), (10, 2), (11, 2), (7, 3), (2, 4)])
def test_shards_cover_every_user_with_equal_steps(users, world):
    order = torch.randperm(users, generator=torch.Generator().manual_seed(users))
    shards = [shard(order, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # as many steps on every rank
    assert set(torch.cat(shards).tolist()) == set(range(users))
    assert len(shards[0]) == -(-users // world)  # at most world - 1 users repeated
    if world == 1:
        assert torch.equal(shards[0], order)  # a single process sees the same order as before


def torchrun(script, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    sums = re.findall(r"rank (\d) of 2: trained weights checksum (\S+)", r.stdout)
    assert sorted(rank for rank, _ in sums) == ["0", "1"], r.stdout[-3000:]
    assert sums[0][1] == sums[1][1], sums  # DDP kept the two ranks' weights equal
    assert len(re.findall(r"^epoch\s+\d", r.stdout, re.M)) == 2  # rank 0 alone prints the log
    return r


def test_every_phase_under_torchrun_with_two_processes(tmp_path):
    data = make_dataset("ddp", 40, 30, 500, 32)
    atomic_save(data, tmp_path / "ddp" / "dataset.pt")
    model = ["--hidden-size", "16", "--n-blocks", "1"]  # torchrun would take --d for its own --duplicate-*
    torchrun("pretrain.py", "--data", tmp_path / "ddp", *model, *TRAIN, "--out", tmp_path / "p1.pt")
    # --anchor none leaves the encoder without gradients: DDP must allow unused parameters
    torchrun("align.py", "--data", tmp_path / "ddp", "--anchor", "none", "--init", tmp_path / "p1.pt", *TRAIN,
             "--out", tmp_path / "p2.pt")
    torchrun("finetune.py", "--data", tmp_path / "ddp", "--pretrain", tmp_path / "p1.pt", "--align", tmp_path / "p2.pt",
             *TRAIN, "--out", tmp_path / "p3.pt")
    written = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert written == ["p1.json", "p1.pt", "p2.json", "p2.pt", "p3.json", "p3.pt"]  # no OUT.last.pt left, no extras
    ckpt = torch.load(tmp_path / "p3.pt", weights_only=True)
    assert ckpt["phase"] == 3 and ckpt["args"]["batch_size"] == 8


def test_a_two_stage_baseline_under_torchrun(tmp_path):
    """baselines.py --method ctrl: stage 1 on every rank alike, rank 0 writes both files."""
    atomic_save(make_dataset("ddp", 40, 30, 500, 32), tmp_path / "ddp" / "dataset.pt")
    torchrun("baselines.py", "--data", tmp_path / "ddp", "--method", "ctrl", "--ctrl-epochs", "2", "--hidden-size", "16",
             "--n-blocks", "1", *TRAIN, "--out", tmp_path / "ctrl.pt")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["ctrl.json", "ctrl.pt", "ctrl.stage1.pt"]
