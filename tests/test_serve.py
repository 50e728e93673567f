"""Tests of serve.py: recommend is the top-k of the model's scores without the history, and
top_items from cached (float32) item tables agrees with full ranking."""
import pytest
import torch

from serve import recommend, top_items
from test_evaluate import FixedScores, gen, tiny_model


# --- Serving: recommend ------------------------------------------------------------------


def test_recommend_is_topk_of_the_scores_without_history():
    N, L = 40, 5
    history = [3, 17, 8, 3, 25, 9, 11]  # longer than L, with a repeat
    scores = torch.randn(1, N + 1, generator=gen(8))
    window = torch.tensor([[8, 3, 25, 9, 11]])  # the last L items
    model = FixedScores(window, scores).eval()
    data = {"seqs": torch.zeros(1, L + 3, dtype=torch.long), "max_len": L + 3, "n_items": N,
            "raw_ids": [""] + [f"r{i}" for i in range(1, N + 1)], "titles": [""] + [f"t{i}" for i in range(1, N + 1)]}
    got = recommend(model, data, history, k=6)
    expected = sorted((i for i in range(1, N + 1) if i not in history), key=lambda i: -scores[0, i].item())[:6]
    assert [i for i, *_ in got] == expected
    assert got[0][1:3] == (f"r{expected[0]}", f"t{expected[0]}")
    assert got[0][3] == pytest.approx(scores[0, expected[0]].item())
    assert len(recommend(model, data, history, k=1000)) == N - len(set(history))  # never padding or history


def test_top_items_and_recommend_with_cached_tables():
    model = tiny_model(("id", "align", "llm"))
    seq = torch.randint(1, 58, (4, 6), generator=gen(4))
    exclude = torch.cat([seq, torch.zeros(4, 2, dtype=torch.long)], 1)  # history with padding
    scores, items = top_items(model, model.item_tables(), seq, exclude, 5)
    with torch.no_grad():
        full = model.full_scores(seq)
    for u in range(4):
        allowed = [i for i in range(1, 58) if i not in seq[u].tolist()]
        assert items[u].tolist() == sorted(allowed, key=lambda i: -full[u, i].item())[:5]
        assert torch.allclose(scores[u], full[u, items[u]], rtol=1e-6, atol=1e-6)
    data = {"seqs": torch.zeros(1, 9, dtype=torch.long), "max_len": 9, "n_items": 57,
            "raw_ids": [""] + [f"r{i}" for i in range(1, 58)], "titles": [""] + [f"t{i}" for i in range(1, 58)]}
    history = seq[0].tolist()
    assert recommend(model, data, history, 5, model.item_tables()) == recommend(model, data, history, 5)
    assert [i for i, *_ in recommend(model, data, history, 5)] == items[0].tolist()
