"""The Table 2 baselines of baselines.py / models.py: DisCo's two losses against a plain loop
and numpy, CTRL's contrastive stage, and the refusals of MAKE's MoRec checkpoint. Each
baseline also runs end to end through the real script in test_experiments.py (table2)."""
import argparse
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from baselines import ctrl_stage1
from models import disco_losses, make_expert
from test_phases import ENV, MODEL, ROOT, TRAIN, dataset, refused, work  # noqa: F401  (module fixtures)

CFG = {"backbone": "sasrec", "d": 8, "L": 5, "n_blocks": 1, "n_heads": 2, "dropout": 0.0}


def test_disco_losses_match_a_loop():
    torch.manual_seed(0)
    n_items = 12
    model = make_expert("disco", n_items, torch.randn(n_items + 1, 6), CFG).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 6], [0, 7, 8, 3, 9]])
    pos = torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 6, 10], [0, 8, 3, 9, 11]])  # items 3, 4, 6 recur
    sufficiency, disentangle = disco_losses(model, seq, pos)

    h = model(seq).detach()
    pairs = [(b, t) for b in range(3) for t in range(5) if pos[b, t] != 0]
    items = [int(pos[b, t]) for b, t in pairs]
    c, s = (x.detach() for x in model.items.parts(torch.tensor(items)))
    expected = 0.0
    for state_part, table in ((h[..., :4], c), (h[..., 4:], s)):
        for a, (b, t) in enumerate(pairs):
            logits = [float(state_part[b, t] @ table[j]) for j in range(len(items)) if j == a or items[j] != items[a]]
            target = float(state_part[b, t] @ table[a])
            expected += (math.log(sum(math.exp(v) for v in logits)) - target) / len(pairs)
    assert sufficiency.item() == pytest.approx(expected, rel=1e-5)
    corr = np.corrcoef(c.numpy().T, s.numpy().T)[:4, 4:]  # (4, 4) collaborative x semantic dimensions
    assert disentangle.item() == pytest.approx(float((corr ** 2).mean()), rel=1e-3)


def test_ctrl_stage1_aligns_the_tables_and_leaves_the_encoder():
    torch.manual_seed(0)
    n_items, U = 30, 24
    seqs = torch.randint(1, n_items + 1, (U, CFG["L"] + 3))
    data = {"seqs": seqs, "n_items": n_items}
    model = make_expert("align", n_items, torch.randn(n_items + 1, 10), {**CFG, "dropout": 0.0})
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    items = torch.arange(1, n_items + 1)

    def loss():
        with torch.no_grad():
            h_c, h_s = model.items.parts(items)
            return torch.nn.functional.cosine_similarity(h_c, h_s).mean().item()

    before = loss()
    args = argparse.Namespace(lr=1e-2, weight_decay=0.0, seed=0, ctrl_epochs=30, batch_size=8, ctrl_tau=0.07)
    ctrl_stage1(model, data, args, torch.device("cpu"))
    assert loss() > before + 0.3  # paired ID and text rows become similar
    assert all(torch.equal(v, encoder[k]) for k, v in model.encoder.state_dict().items())


def run(*args):
    return subprocess.run([sys.executable, "baselines.py", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_make_needs_a_morec_checkpoint(work, dataset):
    refused(run("--data", dataset, "--method", "make", "--morec", work / "missing.pt", *TRAIN, *MODEL),
            "missing.pt: no such checkpoint")
    hybrid = work / "hybrid.pt"
    assert run("--data", dataset, "--method", "hybrid", "--out", hybrid, *TRAIN, *MODEL).returncode == 0
    refused(run("--data", dataset, "--method", "make", "--morec", hybrid, *TRAIN, *MODEL),
            "phase-baseline hybrid checkpoint", "phase-baseline morec")
    morec = work / "morec.pt"
    assert run("--data", dataset, "--method", "morec", "--out", morec, *TRAIN, *MODEL).returncode == 0
    refused(run("--data", dataset, "--method", "make", "--morec", morec, *TRAIN, "--d", "8", "--n-blocks", "1"),
            "d=16", "d=8")


# --- The text-similarity floor --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_text_knn_scores_are_cosines_by_loop(mode):
    from models import TextKNN

    g = torch.Generator().manual_seed(0)
    text = torch.randn(13, 6, generator=g)
    text[0] = 0
    seq = torch.tensor([[0, 0, 3, 7, 5], [1, 2, 3, 4, 9]])
    scores = TextKNN(text, mode).full_scores(seq)  # (2, 13)
    for u, row in enumerate(seq.tolist()):
        items = [i for i in row if i]
        query = text[items[-1]] if mode == "last" else sum(text[i] / text[i].norm() for i in items)
        for j in range(1, 13):
            cos = float(query @ text[j] / (query.norm() * text[j].norm()))
            assert scores[u, j].item() == pytest.approx(cos, abs=1e-6)
        assert scores[u, 0].item() == 0.0  # padding row: zero vector


def test_text_knn_baseline_and_checkpoint_free_path_agree(work, dataset):
    """baselines.py --method textknn writes a run (nothing trained) whose test metrics equal
    evaluate.py --text-knn on the dataset, with no checkpoint."""
    out = work / "textknn.pt"
    r = run("--data", dataset, "--method", "textknn", "--knn", "last", "--out", out)
    assert r.returncode == 0 and "nothing trained" in r.stdout, r.stderr[-2000:]
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert metrics["best_epoch"] == 0 and metrics["epochs"] == []
    e = subprocess.run([sys.executable, "evaluate.py", "--text-knn", "last", "--data", dataset, "--json"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert json.loads(e.stdout)["HR@10"] == pytest.approx(metrics["test"]["HR@10"])
    e = subprocess.run([sys.executable, "evaluate.py", "--ckpt", out, "--json"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert json.loads(e.stdout)["nDCG@10"] == pytest.approx(metrics["test"]["nDCG@10"])
