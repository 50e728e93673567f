"""Multi-process training with PyTorch DDP, as a user launches it on several GPUs, here on
CPU with the gloo backend: each phase script under `torchrun --nproc_per_node 2` finishes,
rank 0 alone writes one checkpoint, and both ranks end with the same weights (their
checksums are printed, each rank to its own log file), also with --loss ce --ce-chunk (chunks
recomputed in backward under DDP). The user shards are checked to partition every epoch's users."""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from dataset import atomic_save  # noqa: E402
from trainer import shard  # noqa: E402
from synthetic import make_dataset  # noqa: E402

# without PYTHONUNBUFFERED: under it a print(..., flush=True) is two writes (text, then newline),
# between which another process writing to the same stream could slip its line
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
ENV |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
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
    """Two ranks that print at once on one console can merge their lines, so each rank's stdout and
    stderr go to their own files (--redirects 3), read here: {rank: its stdout}."""
    with tempfile.TemporaryDirectory() as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--log-dir", logs, "--redirects", "3", script, *map(str, args)]
        p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.terminate()  # SIGTERM: torchrun stops its workers (in sessions of their own: a SIGKILL would orphan them)
            p.communicate(timeout=60)
            raise
        files = sorted(Path(logs).glob("*/attempt_*/*/std*.log"))  # LOGS/RUN-ID/attempt_0/RANK/stdout.log, stderr.log
        text = {(int(f.parent.name), f.stem): f.read_text() for f in files}
    assert p.returncode == 0, f"{script} failed:\n{err[-3000:]}" + "".join(f"\n--- rank {rank} {stream}:\n{t[-3000:]}"
                                                                      for (rank, stream), t in text.items())
    assert len(files) == 4, files  # one attempt, two ranks, two streams
    out = {rank: text[rank, "stdout"] for rank in (0, 1)}
    sums = {rank: re.findall(rf"^rank {rank} of 2: trained weights checksum (\S+)$", out[rank], re.M) for rank in out}
    assert all(len(s) == 1 for s in sums.values()), out
    assert sums[0] == sums[1], sums  # DDP kept the two ranks' weights equal
    epochs = {rank: len(re.findall(r"^epoch\s+\d", out[rank], re.M)) for rank in out}
    assert epochs == {0: 2, 1: 0}, out  # rank 0 alone prints the log
    return out


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


def test_chunked_ce_under_torchrun(tmp_path):
    """--loss ce --ce-chunk: each chunk's logits are recomputed in backward (torch.utils.checkpoint)
    while DDP all-reduces the gradients; both ranks still end with equal weights."""
    atomic_save(make_dataset("ddp", 40, 30, 500, 32), tmp_path / "ddp" / "dataset.pt")
    torchrun("pretrain.py", "--data", tmp_path / "ddp", "--loss", "ce", "--ce-chunk", 7, "--hidden-size", "16",
             "--n-blocks", "1", *TRAIN, "--out", tmp_path / "p1.pt")
    assert torch.load(tmp_path / "p1.pt", weights_only=True)["args"]["ce_chunk"] == 7
