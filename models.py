"""All modelling code of PAD (Wang et al., 2024), built bottom-up.

    attention block -> SASRec / GRU4Rec / Caser sequence encoders (Sec. 2.1, Table 3)
    -> item representations: ID table, f_MLP over the frozen text table (Eq. 7), fused
    -> Expert: one sequential recommender = item representation + encoder (Eq. 8-10)
    -> gates (Eq. 11) -> PAD: triple experts fused by frequency-aware gating (Sec. 3.3)

Shapes: B = batch of users, L = input window (20), d = hidden size (128), N = number of
items (ids 1..N, 0 is padding), K = number of experts, d_text = text embedding size.
Every model exposes the same calls, used by the phase scripts, evaluate.py and serve.py:
    bce_logits(seq, pos, neg)   -> (pos_logits, neg_logits), both (B, L)   # Eq. (1) / (6)
    states(seq), logits_of(h, ids) -> the logits (B, L, C) of C items at every position (--loss ce)
    item_tables()               -> K x (N+1, d) item representations, one per expert
    full_scores(seq, tables)    -> (B, N+1) scores of every item after the last position
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKBONES = ("sasrec", "gru4rec", "caser")
EXPERTS = ("id", "align", "llm")  # the paper's three (Eq. 8-10)
ALL_EXPERTS = (*EXPERTS, "text")  # and the text-similarity expert, beyond the paper
GATES = ("freq", "bucket", "none")
BLOCKS = ("ours", "authors")  # SASRec block variants (--sasrec-block)
GATE_INITS = ("uniform", "ramp")  # --gate-init
MIXES = ("logit", "prob")  # finetune.py --mix: Eq. (11) mixes logits; prob, beyond the paper, distributions
TEXT_NORMS = ("none", "standard")  # --text-norm
TEXT_OUTS = ("gelu", "linear")  # --text-out


# --- Sequence encoders: (B, L, d) item representations -> (B, L, d) states ---------------
# Each is causal: the state at position t depends on items 1..t only.


class SelfAttentionBlock(nn.Module):
    """One SASRec block: causal multi-head self-attention + point-wise feed-forward of width
    ffn, post-LayerNorm residuals (as in the authors' release; Kang & McAuley (2018) and
    SASRec.pytorch normalise before attention). bias: on the attention projections."""

    def __init__(self, d, n_heads, dropout, ffn=None, bias=True):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)
        self.ln_attn = nn.LayerNorm(d)
        ffn = ffn or d
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.ln_ffn = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, attn_mask):
        B, L, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x (B, L, d)
        q, k, v = (t.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d/H)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, L, d)  # (B, L, d)
        x = self.ln_attn(x + self.drop(self.proj(a)))
        return self.ln_ffn(x + self.drop(self.ffn(x)))


class SASRec(nn.Module):
    """SASRec encoder (Kang & McAuley, 2018): item representations + learned positions, then
    causal self-attention blocks; padding positions are zeroed.

    block "ours": items scaled by sqrt(d), feed-forward width d, PyTorch's initialisation.
    block "authors" (the authors' release): LayerNorm on item + position embeddings, no
    scaling, feed-forward width 4d, attention projections without bias, Xavier-normal weights.
    DEVIATION: "ours" is the default (--sasrec-block authors for theirs; README)."""

    def __init__(self, d, L, n_blocks=5, n_heads=2, dropout=0.1, block="ours"):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown SASRec block {block!r}; choose one of {', '.join(BLOCKS)} (--sasrec-block)")
        self.block = block
        self.pos = nn.Embedding(L, d)
        self.drop = nn.Dropout(dropout)
        authors = block == "authors"
        self.ln_in = nn.LayerNorm(d) if authors else None
        self.blocks = nn.ModuleList(SelfAttentionBlock(d, n_heads, dropout, ffn=4 * d if authors else d, bias=not authors)
                                    for _ in range(n_blocks))
        if authors:
            for name, w in self.named_parameters():
                if w.dim() > 1:
                    nn.init.xavier_normal_(w)
                elif name.endswith("bias"):
                    nn.init.zeros_(w)

    def forward(self, e, mask):
        B, L, d = e.shape  # e: (B, L, d), mask: (B, L) True on real items
        pos = self.pos(torch.arange(L, device=e.device))  # (L, d)
        x = self.ln_in(e + pos) if self.ln_in is not None else e * math.sqrt(d) + pos  # (B, L, d)
        x = self.drop(x) * mask.unsqueeze(-1)
        causal = torch.ones(L, L, dtype=torch.bool, device=e.device).tril()  # (L, L) key <= query
        # a query may see real keys up to itself; itself always, so padded rows stay finite
        attn_mask = (causal & mask[:, None, :]) | torch.eye(L, dtype=torch.bool, device=e.device)  # (B, L, L)
        attn_mask = attn_mask.unsqueeze(1)  # (B, 1, L, L), broadcast over heads
        for block in self.blocks:
            x = block(x, attn_mask) * mask.unsqueeze(-1)
        return x  # (B, L, d)


class GRU4Rec(nn.Module):
    """GRU4Rec encoder (Hidasi et al., 2016) as in RecBole: dropout on the inputs, a GRU,
    and a dense layer back to d."""

    def __init__(self, d, L, n_layers=1, dropout=0.1):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(d, d, num_layers=n_layers, batch_first=True)
        self.dense = nn.Linear(d, d)

    def forward(self, e, mask):
        x = self.drop(e) * mask.unsqueeze(-1)  # (B, L, d), padding inputs are zero vectors
        h, _ = self.gru(x)  # (B, L, d)
        return self.dense(h) * mask.unsqueeze(-1)


class Caser(nn.Module):
    """Caser encoder (Tang & Wang, 2018): horizontal convolutions of every height
    h = 1..L with max-pooling over time, and vertical convolutions across the window.

    Caser reads a window of the last L items and predicts the next one. To give it the
    same per-position interface as the other encoders, position t reads the window of
    the L items ending at t (left-padded with zero vectors), so it never sees items after
    t. All windows are computed at once: a convolution over the whole padded sequence,
    then a sliding max over the L - h + 1 starts that fit inside each window.
    DEVIATION: no user embedding P_u (Caser concatenates one); every PAD expert is
    user-agnostic and reads the behaviour sequence only.
    """

    def __init__(self, d, L, n_h=16, n_v=4, dropout=0.1):
        super().__init__()
        self.L = L
        self.conv_v = nn.Conv1d(1, n_v, L)  # one weight per window row, shared by the d dimensions
        self.conv_h = nn.ModuleList(nn.Conv1d(d, n_h, h) for h in range(1, L + 1))  # h rows x d columns
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(n_v * d + n_h * L, d)

    def forward(self, e, mask):
        B, L, d = e.shape
        x = F.pad(e * mask.unsqueeze(-1), (0, 0, self.L - 1, 0)).transpose(1, 2)  # (B, d, L_w - 1 + L)
        o_v = self.conv_v(x.reshape(B * d, 1, -1))  # (B*d, n_v, L): sum_r w_r e_{t-L_w+1+r}
        o_v = o_v.view(B, d, -1, L).permute(0, 3, 2, 1).reshape(B, L, -1)  # (B, L, n_v * d)
        o_h = [F.max_pool1d(F.relu(conv(x)), self.L - h + 1, stride=1)  # (B, n_h, L) max inside each window
               for h, conv in enumerate(self.conv_h, start=1)]
        o_h = torch.cat(o_h, dim=1).transpose(1, 2)  # (B, L, n_h * L_w)
        z = F.relu(self.fc(self.drop(torch.cat([o_v, o_h], dim=-1))))  # (B, L, d)
        return z * mask.unsqueeze(-1)


def make_encoder(backbone, d, L, n_blocks, n_heads, dropout, block="ours"):
    if backbone == "sasrec":
        return SASRec(d, L, n_blocks, n_heads, dropout, block)
    if backbone == "gru4rec":
        return GRU4Rec(d, L, dropout=dropout)
    if backbone == "caser":
        return Caser(d, L, dropout=dropout)
    raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)} (--backbone)")


# --- Item representations: item ids (...) -> (..., d) -------------------------------------


class TextMLP(nn.Module):
    """Eq. (7): f_MLP(SG(h_text), w), the learnable reduction of the frozen text table; with
    its own weights w' it is the LLM expert's item representation (Eq. 10).

    As in the authors' release: d_text -> d with GELU, then n_layers = 4 [dropout, linear,
    GELU] (--text-layers; 0 leaves one linear layer and its GELU). out "linear" (--text-out,
    beyond the paper) drops the last GELU, so item vectors may point anywhere: after a GELU
    every coordinate is >= -0.17, and dot products between items lose their sign.
    The text table is a non-persistent buffer: frozen (stop-gradient) and never copied
    into checkpoints; it is re-attached from the prepared dataset.

    norm "standard" (--text-norm, beyond the paper) standardises each dimension of the input
    over the N items (a fixed, frozen affine map; padding stays zero): MiniLM's unit rows have
    per-dimension spreads of ~0.05, which leave f_MLP's first layer near zero.
    """

    def __init__(self, text_emb, d, dropout, n_layers=4, norm="none", out="gelu", chunk=65536):
        super().__init__()
        if norm not in TEXT_NORMS:
            raise ValueError(f"unknown text norm {norm!r}; choose one of {', '.join(TEXT_NORMS)} (--text-norm)")
        if out not in TEXT_OUTS:
            raise ValueError(f"unknown f_MLP output {out!r}; choose one of {', '.join(TEXT_OUTS)} (--text-out)")
        self.register_buffer("h_text", text_emb, persistent=False)  # (N+1, d_text)
        self.norm = norm
        if norm == "standard":  # statistics of items 1..N in float64, in chunks of rows
            rows = [text_emb[i:i + chunk].double() for i in range(1, len(text_emb), chunk)]
            mean = sum(r.sum(0) for r in rows) / (len(text_emb) - 1)
            var = sum(((r - mean) ** 2).sum(0) for r in rows) / max(len(text_emb) - 2, 1)
            self.register_buffer("mean", mean.float(), persistent=False)  # (d_text,)
            self.register_buffer("std", var.sqrt().clamp_min(1e-8).float(), persistent=False)
        layers = [nn.Linear(text_emb.shape[1], d), nn.GELU()]
        for _ in range(n_layers):
            layers += [nn.Dropout(dropout), nn.Linear(d, d), nn.GELU()]
        if out == "linear":
            layers.pop()  # DEVIATION (--text-out linear): no activation on the item representation
        self.mlp = nn.Sequential(*layers)

    def forward(self, items):
        x = self.h_text[items].float()  # (..., d_text); h_text is never updated
        if self.norm == "standard":
            x = ((x - self.mean) / self.std) * (items != 0).unsqueeze(-1)
        return self.mlp(x)  # (..., d)


class IDItems(nn.Module):
    """Collaborative item embeddings h^c: one learnable row per item id."""

    def __init__(self, n_items, d):
        super().__init__()
        self.h_c = nn.Embedding(n_items + 1, d, padding_idx=0)
        nn.init.normal_(self.h_c.weight, std=d ** -0.5)
        with torch.no_grad():
            self.h_c.weight[0].zero_()

    def forward(self, items):
        return self.h_c(items)  # (..., d)


class AlignedItems(nn.Module):
    """The alignment expert's item representation (Eq. 6, 9): the ID embedding h^c_a and
    the reduced text embedding h^s_a fused as GELU(Linear([h^c_a ; h^s_a])). `parts` gives
    both halves for the MK-MMD of Eq. (5).
    DEVIATION: no dropout before the Linear layer by default; the authors' release has 0.1
    (fuse_dropout, align.py --fuse-dropout 0.1)."""

    def __init__(self, n_items, text_emb, d, dropout, fuse_dropout=0.0, text=None):
        super().__init__()
        self.id = IDItems(n_items, d)
        self.f_mlp = TextMLP(text_emb, d, dropout, **(text or {}))
        self.fuse_drop = nn.Dropout(fuse_dropout) if fuse_dropout else nn.Identity()
        self.fuse = nn.Linear(2 * d, d)

    def parts(self, items):
        return self.id(items), self.f_mlp(items)  # h^c_a, h^s_a: (..., d) each

    def forward(self, items):
        h_c, h_s = self.parts(items)
        return F.gelu(self.fuse(self.fuse_drop(torch.cat([h_c, h_s], dim=-1))))  # (..., d)


class ChunkItems(nn.Module):
    """DisCo's item representation (Du et al., 2024; Table 2 baseline): the embedding is split
    into a collaborative chunk h^c (d/2, an ID table) and a semantic chunk h^s (d/2, f_MLP
    over the frozen text table), concatenated; `parts` gives the chunks for its sufficiency
    and disentanglement losses (disco_losses)."""

    def __init__(self, n_items, text_emb, d, dropout, text=None):
        super().__init__()
        self.id = IDItems(n_items, d // 2)
        self.f_mlp = TextMLP(text_emb, d - d // 2, dropout, **(text or {}))

    def parts(self, items):
        return self.id(items), self.f_mlp(items)  # (..., d/2) each

    def forward(self, items):
        return torch.cat(self.parts(items), dim=-1)  # (..., d)


# --- One expert = item representation + sequence encoder ----------------------------------


class Expert(nn.Module):
    """A sequential recommender f_theta (Sec. 2.1): encode the behaviour sequence, take the
    dot product with the target item's representation to get a logit."""

    def __init__(self, items, encoder, n_items):
        super().__init__()
        self.items, self.encoder, self.n_items = items, encoder, n_items

    def forward(self, seq):
        return self.encoder(self.items(seq), seq != 0)  # (B, L) ids -> (B, L, d) states

    def bce_logits(self, seq, pos, neg):
        h = self(seq)  # (B, L, d)
        return (h * self.items(pos)).sum(-1), (h * self.items(neg)).sum(-1)  # (B, L) each

    def all_logits(self, seq):
        """Logits of every item at every position, (B, L, N+1), for trainer.py's --loss ce."""
        table = self.items(torch.arange(self.n_items + 1, device=seq.device))  # (N+1, d), with gradient
        return self(seq) @ table.T

    def states(self, seq):
        return self(seq)  # (B, L, d): h, what logits_of reads

    def logits_of(self, h, ids):
        """Logits of the items `ids` (C,) at every position of the states h = states(seq): (B, L, C),
        all_logits' columns `ids`; trainer.chunked_ce_loss calls it on chunks of the N items."""
        return h @ self.items(ids).T  # (B, L, C)

    def full_scores(self, seq, tables=None, per_bucket=False):
        """Scores of every item after the last position, (B, N+1); tables: item_tables(),
        computed once and passed in when many batches of users are scored. (per_bucket is
        PAD's serving option; a single expert has no gate.)"""
        h = self(seq)[:, -1]  # (B, d) state after the last item
        table = (tables or self.item_tables())[0]  # (N+1, d)
        return (h.to(table.dtype) @ table.T).float()  # (B, N+1), float32 even from float16 tables

    def item_tables(self, dtype=None, chunk=65536):
        """[(N+1, d)]: every item's representation, the same for every user. Items go through
        in chunks, so an fp16 4096-d text table is never copied whole to float32 (Eq. 7).
        dtype: storage of the table (default float32; float16 halves what serving reads)."""
        ids = torch.arange(self.n_items + 1, device=self.device)
        table = torch.cat([self.items(ids[i:i + chunk]) for i in range(0, len(ids), chunk)])  # (N+1, d)
        return [table.to(dtype or table.dtype)]

    @property
    def device(self):
        return next(self.parameters()).device


class UnitText(nn.Module):
    """The text expert's item representation (beyond the paper, `--experts ...,text`): the
    unit-norm frozen text row of each item, a non-persistent buffer (row 0 stays zero)."""

    def __init__(self, text_emb, chunk=65536):
        super().__init__()
        unit = torch.cat([F.normalize(text_emb[i:i + chunk].float(), dim=-1) for i in range(0, len(text_emb), chunk)])
        self.register_buffer("unit", unit, persistent=False)  # (N+1, d_text)

    def forward(self, items):
        return self.unit[items]  # (..., d_text)


class LastItem(nn.Module):
    """The text expert's sequence encoder: the state after position t is the item at t, times
    a scale s = exp(log_scale), so o_text = s * cos(h_text[last item], h_text[i]): text-kNN
    (baselines.py --method textknn) under the gate. s, started at 1 / 0.07, is the expert's
    only parameter: cosines lie in [-1, 1] while the other experts' logits span tens, and the
    gate's convex weights cannot rescale them."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, e, mask):
        return self.log_scale.exp() * e  # (B, L, d_text); padding rows are zero already


def make_expert(kind, n_items, text_emb, cfg):
    """Build the ID ('id', Eq. 8), alignment ('align', Eq. 9) or LLM ('llm', Eq. 10) expert,
    the text-similarity expert ('text', beyond the paper) or DisCo's chunked single
    recommender ('disco'). cfg holds backbone, d, L, n_blocks,
    n_heads, dropout and optionally block, fuse_dropout, text_norm, text_layers, text_out (the
    model_args of a checkpoint). Trained alone from scratch, 'align' is the Hybrid baseline
    and 'llm' is MoRec (baselines.py)."""
    if kind == "text":  # text-kNN as an expert: unit text rows, "the last item" as encoder
        return Expert(UnitText(text_emb), LastItem(), n_items)
    d = cfg["d"]
    text = {"norm": cfg.get("text_norm", "none"), "n_layers": cfg.get("text_layers", 4),
            "out": cfg.get("text_out", "gelu")}  # f_MLP (Eq. 7)
    if kind == "id":
        items = IDItems(n_items, d)
    elif kind == "align":
        items = AlignedItems(n_items, text_emb, d, cfg["dropout"], cfg.get("fuse_dropout", 0.0), text)
    elif kind == "llm":
        items = TextMLP(text_emb, d, cfg["dropout"], **text)  # h^s = f_MLP(SG(h_text), w'), Eq. (10)
    elif kind == "disco":
        items = ChunkItems(n_items, text_emb, d, cfg["dropout"], text)
    else:
        raise ValueError(f"unknown expert {kind!r}; choose from {', '.join(ALL_EXPERTS)} or disco")
    encoder = make_encoder(cfg["backbone"], d, cfg["L"], cfg["n_blocks"], cfg["n_heads"], cfg["dropout"],
                           cfg.get("block", "ours"))
    return Expert(items, encoder, n_items)


# --- Eq. (11): gates, g(b(i), expert states) -> expert probabilities ----------------------
# Each gate maps the target item's bucket b(i), shape (...), and the K experts' sequence
# states, K x (..., d), to probabilities (..., K) that are positive and sum to 1.


# The authors' release starts its gate from a ramp over the buckets b = 0..B: logit 1 -> 0 for the
# ID expert, 0 -> 1 for the LLM expert, ALIGN_RAMP -> ALIGN_RAMP - 1 for the alignment expert,
# sigmoid-normalised (ALIGN_RAMP is a per-run argument there; -4 gives the alignment expert 1-2%).
ALIGN_RAMP = -4.0


def ramp_logits(experts, n_buckets):
    """(B+1, K) sigmoid-gate logits of the authors' initial ramp, one column per expert name."""
    start = {"id": (1.0, 0.0), "llm": (0.0, 1.0), "align": (ALIGN_RAMP, ALIGN_RAMP - 1.0)}
    if set(experts) - set(start):
        raise ValueError(f"--gate-init ramp: the authors' ramp has no start for the {','.join(set(experts) - set(start))} "
                         f"expert; use --gate-init uniform")
    return torch.stack([torch.linspace(*start[k], n_buckets + 1) for k in experts], dim=1)


class FrequencyGate(nn.Module):
    """Eq. (11), `--gate freq`: g_k = softmax_k(a_k[b(i)] + w_k . h_k), a linear gate on
    [one-hot(b(i)); h_k], the bucket of the target item and expert k's state. init "ramp":
    a = log sigmoid(ramp), so that the initial g equals the authors' ramp."""

    def __init__(self, n_buckets, d, experts, init="uniform"):
        super().__init__()
        K = len(experts)
        self.a = nn.Embedding(n_buckets + 1, K)  # bucket part, one column per expert
        nn.init.zeros_(self.a.weight)
        if init == "ramp":
            with torch.no_grad():
                self.a.weight.copy_(F.logsigmoid(ramp_logits(experts, n_buckets)))
        # state part; d may be one width per expert (the text expert's state is d_text wide):
        # row k holds w_k in its first d_k entries, the rest stay unused
        self.w = nn.Parameter(torch.zeros(K, max(d) if isinstance(d, (list, tuple)) else d))

    def forward(self, bucket, h):
        state = torch.stack([h_k @ w_k[:h_k.shape[-1]] for h_k, w_k in zip(h, self.w)], dim=-1)  # (..., K)
        return torch.softmax(self.a(bucket) + state, dim=-1)


class BucketGate(nn.Module):
    """`--gate bucket`, the authors' release: one learnable weight per expert per bucket,
    sigmoid-normalised, g_k = sigmoid(v_k[b]) / sum_j sigmoid(v_j[b]); no expert state.
    init "ramp": v starts from the authors' ramp (ramp_logits)."""

    def __init__(self, n_buckets, d, experts, init="uniform"):
        super().__init__()
        self.v = nn.Embedding(n_buckets + 1, len(experts))
        nn.init.zeros_(self.v.weight)
        if init == "ramp":
            with torch.no_grad():
                self.v.weight.copy_(ramp_logits(experts, n_buckets))

    def forward(self, bucket, h):
        s = torch.sigmoid(self.v(bucket))  # (..., K)
        return s / s.sum(-1, keepdim=True)


class GlobalGate(nn.Module):
    """`--gate none`, the "w/o frequency-aware gating" ablation (Sec. 4.7): one global
    learnable weight per expert, softmax-normalised, the same for every item."""

    def __init__(self, n_buckets, d, experts, init="uniform"):
        super().__init__()
        if init != "uniform":
            raise ValueError(f"--gate-init {init} needs a per-bucket gate (--gate freq or bucket)")
        self.v = nn.Parameter(torch.zeros(len(experts)))

    def forward(self, bucket, h):
        return torch.softmax(self.v, dim=0).expand(*bucket.shape, -1)  # (..., K)


def make_gate(gate, n_buckets, d, experts, init="uniform"):
    """The gate over the named experts (in order), initialised uniform or as the authors' ramp."""
    gates = {"freq": FrequencyGate, "bucket": BucketGate, "none": GlobalGate}
    if gate not in gates:
        raise ValueError(f"unknown gate {gate!r}; choose one of {', '.join(GATES)} (--gate)")
    return gates[gate](n_buckets, d, list(experts), init)


# --- PAD: triple experts with frequency-aware gating (Sec. 3.3) ---------------------------


class PAD(nn.Module):
    """Phase 3 model: experts o_id, o_align, o_LLM (Eq. 8-10), each with its own embedding
    tables, fused into Phi = sum_k g_k(b(i), h_k) * o_k (Eq. 11). Any subset of experts
    may be kept (--experts), for the ablations of Fig. 5(b).

    bucket_bias (finetune.py --bucket-bias, beyond the paper): Phi + beta[b(i)], one learned
    offset per frequency bucket, zero at the start: the log-prior of a bucket's items that
    logit adjustment (Menon et al., 2021) adds by hand, here fit with the gate.

    mix (finetune.py --mix, beyond the paper): "logit", Eq. (11), mixes the experts' logits (a
    product of their distributions); "prob" mixes their distributions over the items instead,
    Phi = log sum_k g_k p_k(i) with p_k = softmax of t_k o_k over items 1..N (mix_probabilities),
    so that an item one expert is sure of ranks high though the others are not; t_k = exp(s_k),
    one learned sharpness per expert (log_sharpness, zero at the start), fit with the gate.

    bucket_temp (finetune.py --bucket-temp, beyond the paper): t[b(i)] * Phi, one learned
    temperature per frequency bucket, t = exp(tau) with tau zero at the start: the gate's weights
    sum to one, so without it every bucket's scores keep the experts' spread; with it a bucket's
    scores can be sharpened or flattened against the others' (with --bucket-bias: an affine map
    per bucket), e.g. cold items ranked by text similarity on a wider scale.

    user_bias (finetune.py --user-bias, beyond the paper): Phi + c[b(i)] + v[b(i)] . h_1(u), an
    offset per frequency bucket that moves with the user, linear in the first expert's state h_1
    (the ID expert's wherever it is kept), zero at the start: so that a user whose window leans to
    cold items can have them lifted and another not, which one offset per bucket cannot do.
    `user_bias` is h_1's width (None: off).

    logit_adjust (finetune.py --logit-adjust, beyond the paper): the ranking scores Phi(i) -
    tau * log(1 + n_i), n_i the item's training interactions: post-hoc logit adjustment (Menon
    et al., 2021) against the popularity that L_REC teaches; tau is a persistent buffer (chosen
    on validation by gate_fit.cross_fit_gate, or given), read by full_scores only, so training
    and the gate fit see Phi unchanged."""

    def __init__(self, experts, gate, item_bucket, n_buckets, bucket_bias=False, mix="logit", bucket_temp=False,
                 item_freq=None, logit_adjust=False, user_bias=None):
        super().__init__()
        if mix not in MIXES:
            raise ValueError(f"unknown mix {mix!r}; choose one of {', '.join(MIXES)} (--mix)")
        self.experts = nn.ModuleDict(experts)  # name -> Expert, in order id, align, llm
        self.gate, self.n_buckets, self.n_items, self.mix = gate, n_buckets, len(item_bucket) - 1, mix
        self.register_buffer("bucket", item_bucket, persistent=False)  # (N+1,) b(i)
        self.bias = nn.Parameter(torch.zeros(n_buckets + 1)) if bucket_bias else None  # DEVIATION: beta per bucket
        self.log_sharpness = nn.Parameter(torch.zeros(len(experts))) if mix == "prob" else None  # --mix prob: s_k
        self.log_temp = nn.Parameter(torch.zeros(n_buckets + 1)) if bucket_temp else None  # DEVIATION: tau per bucket
        self.user_bias = nn.Linear(user_bias, n_buckets + 1) if user_bias else None  # DEVIATION: c + v . h_1 per bucket
        if self.user_bias is not None:
            nn.init.zeros_(self.user_bias.weight)
            nn.init.zeros_(self.user_bias.bias)
        # DEVIATION (--logit-adjust): tau (saved), and log(1 + n_i) per item, (N+1,); None without it
        tau = None if not logit_adjust else torch.tensor(0.0 if isinstance(logit_adjust, str) else float(logit_adjust))
        self.register_buffer("adjust_tau", tau)
        self.register_buffer("log_freq", torch.log1p(item_freq.float()) if logit_adjust else None, persistent=False)

    def states(self, seq):
        return [expert(seq) for expert in self.experts.values()]  # K x (B, L, d)

    # --- Eq. (11): Phi = sum_k g_k(b(i), h_k) * o_k, the one place the experts are fused ---
    def fuse(self, o, h, bucket, per_bucket=False):
        """Eq. (11) for target items whose buckets b(i) are `bucket` (B, T): expert logits
        o = K x (B, T), expert states h = K x (B, T or 1, d) -> Phi, (B, T). (B may be
        several leading dimensions, e.g. (B, L) in all_logits.)

        per_bucket (serving, --loss ce): the gate g_k(b, h_k) is evaluated once per bucket b, (B, B_b+1, K),
        and looked up per item, so memory is O(B x T) instead of O(B x T x K); vectorised exp and
        division then round differently in the last bit."""
        if self.mix == "prob":  # DEVIATION (--mix prob, beyond the paper): the experts' distributions mixed
            phi = self.mix_probabilities(o, h, bucket, per_bucket)
        elif not per_bucket:
            g = self.gate(bucket, h)  # (B, T, K)
            phi = (g * torch.stack(o, -1)).sum(-1)
        else:
            buckets = torch.arange(self.n_buckets + 1, device=bucket.device).expand(*bucket.shape[:-1], -1)  # (B, B_b+1)
            g = self.gate(buckets, h)  # (B, B_b+1, K)
            phi = sum(g[..., k].gather(-1, bucket) * o_k for k, o_k in enumerate(o))
        if self.log_temp is not None:  # --bucket-temp: t[b(i)] * Phi
            phi = self.log_temp[bucket].exp() * phi
        if self.bias is not None:  # --bucket-bias: + beta[b(i)]
            phi = phi + self.bias[bucket]
        if self.user_bias is not None:  # --user-bias: + c[b(i)] + v[b(i)] . h_1, each user's offset per bucket
            offsets = self.user_bias(h[0])  # (..., T or 1, B_b+1), lined up with bucket (..., T)
            phi = phi + torch.take_along_dim(offsets, bucket[..., None], dim=-1).squeeze(-1)
        return phi

    def mix_probabilities(self, o, h, bucket, per_bucket=False):
        """--mix prob (beyond the paper): log sum_k g_k(b(i), h_k) p_k(i), with p_k the softmax of
        expert k's logits o_k, times its sharpness exp(s_k), over the items 1..N (column 0, padding,
        left out). o must hold every item's logit, columns 0..N; the sum runs in log space
        (logaddexp) over the experts."""
        if o[0].shape[-1] != self.n_items + 1:
            raise ValueError("--mix prob mixes distributions over all items: it needs every item's logit "
                             "(--loss ce, without --ce-chunk)")
        padding = torch.arange(self.n_items + 1, device=bucket.device) == 0
        sharp = self.log_sharpness.exp()
        log_p = [torch.log_softmax((o_k.float() * sharp[k]).masked_fill(padding, -1e9), -1)
                 for k, o_k in enumerate(o)]  # K x (..., N+1)
        if per_bucket:  # g per bucket (B, B_b+1, K), looked up per item
            buckets = torch.arange(self.n_buckets + 1, device=bucket.device).expand(*bucket.shape[:-1], -1)
            g = self.gate(buckets, h)
            log_g = [g[..., k].clamp_min(1e-30).log().gather(-1, bucket) for k in range(len(o))]
        else:
            g = self.gate(bucket, h)  # (..., N+1, K)
            log_g = [g[..., k].clamp_min(1e-30).log() for k in range(len(o))]
        mixed = log_g[0] + log_p[0]
        for lg, lp in zip(log_g[1:], log_p[1:]):
            mixed = torch.logaddexp(mixed, lg + lp)
        return mixed

    def bce_logits(self, seq, pos, neg):
        if self.mix == "prob":
            raise ValueError("--mix prob needs every item's logit: train it with --loss ce")
        h = self.states(seq)  # K x (B, L, d)
        logits = []
        for items in (pos, neg):  # (B, L) targets: Phi of each, positive first
            o = [(h_k * e.items(items)).sum(-1) for h_k, e in zip(h, self.experts.values())]  # K x (B, L): o_k
            logits.append(self.fuse(o, h, self.bucket[items]))
        return tuple(logits)

    def all_logits(self, seq):
        """Phi of every item at every position, (B, L, N+1), for trainer.py's --loss ce; the gate
        is evaluated once per bucket (per_bucket), so memory is K x (B, L, N+1), not a
        (B, L, N+1, K) gate and its softmax."""
        return self.logits_of(self.states(seq), torch.arange(len(self.bucket), device=seq.device))

    def logits_of(self, h, ids):
        """Phi of the items `ids` (C,) at every position of the states h = states(seq), K x (B, L, d):
        (B, L, C), all_logits' columns `ids` (trainer.chunked_ce_loss calls it on chunks of the N items)."""
        o = [h_k @ e.items(ids).T for h_k, e in zip(h, self.experts.values())]  # K x (B, L, C)
        return self.fuse(o, [h_k[:, :, None] for h_k in h], self.bucket[ids].expand(*o[0].shape), per_bucket=True)

    def full_scores(self, seq, tables=None, per_bucket=False):
        """Phi for every item after the last position, (B, N+1); tables: item_tables()."""
        tables = tables or self.item_tables()
        h = [h_k[:, -1] for h_k in self.states(seq)]  # K x (B, d)
        o = [(h_k.to(t.dtype) @ t.T).float() for h_k, t in zip(h, tables)]  # K x (B, N+1)
        phi = self.fuse(o, [h_k[:, None] for h_k in h], self.bucket.expand(len(seq), -1), per_bucket)
        return phi if self.adjust_tau is None else phi - self.adjust_tau * self.log_freq  # --logit-adjust

    def item_tables(self, dtype=None):
        """K x (N+1, d): each expert's item representations (Expert.item_tables)."""
        return [e.item_tables(dtype)[0] for e in self.experts.values()]

    def gate_per_bucket(self, seq):
        """Mean gate probability of each expert for a target item of each bucket, (B_buckets, K)."""
        h = [h_k[:, -1, None] for h_k in self.states(seq)]  # K x (B, 1, d)
        buckets = torch.arange(1, self.n_buckets + 1, device=seq.device)
        return self.gate(buckets.expand(len(seq), -1), h).mean(0)


# --- Baselines' extra losses (Table 2; trained by baselines.py) ---------------------------


def disco_losses(model, seq, pos, tau=1.0):
    """DisCo's two regularisers for a 'disco' expert, on a batch of sequences (B, L) and next
    items (B, L), over the real positions:

    sufficiency: each chunk alone must single out the next item. With the state and the
        item embedding cut into the same chunks (h^c | h^s), in-batch softmax cross-entropy
        of the chunk score <state chunk, item chunk> against the batch's other next items.
    disentanglement: the two chunks of an item carry different information. The mean
        squared cross-correlation between the standardised chunks over the batch's items
        (zero when every collaborative dimension is uncorrelated with every semantic one).
    DEVIATION: DisCo's dual-side attentive network and its MI estimators are not built;
    these are the two constraints in their simplest form, on one SASRec (README)."""
    mask = pos != 0
    h = model(seq)[mask]  # (n, d) states before each real next item
    items = pos[mask]  # (n,)
    chunks = model.items.parts(items)  # (n, d/2) x 2
    cut = chunks[0].shape[-1]
    states = (h[:, :cut], h[:, cut:])
    same = items[:, None] == items[None, :]  # (n, n) the same item at another position is not a negative
    eye = torch.eye(len(items), dtype=torch.bool, device=items.device)
    sufficiency = 0.0
    for s, e in zip(states, chunks):
        logits = (s @ e.T / tau).masked_fill(same & ~eye, float("-inf"))  # (n, n), positives on the diagonal
        sufficiency = sufficiency + F.cross_entropy(logits, torch.arange(len(items), device=items.device))
    z = [F.normalize(c - c.mean(0), dim=0) for c in chunks]  # centred, unit-norm columns over the batch
    cross = z[0].T @ z[1]  # (d/2, d/2) Pearson correlations
    return sufficiency, cross.pow(2).mean()


# --- The text-similarity floor (a baseline beyond the paper; baselines.py --method textknn) --


class TextKNN(nn.Module):
    """Ranks every item by the cosine similarity of its frozen text embedding h_text to the
    user's last item ('last') or to the mean of the input window's items ('mean'). Nothing is
    trained: a model that uses the text and ranks below this floor is not using the text."""

    def __init__(self, text_emb, mode="last"):
        super().__init__()
        if mode not in ("last", "mean"):
            raise ValueError(f"unknown text-kNN mode {mode!r}; choose last or mean")
        self.mode = mode
        self.register_buffer("h_text", text_emb, persistent=False)  # (N+1, d_text), row 0 zeros

    def item_tables(self, dtype=None, chunk=65536):
        """[(N+1, d_text)]: the unit-norm text rows (row 0 stays zero), normalised in chunks."""
        table = torch.cat([F.normalize(self.h_text[i:i + chunk].float(), dim=-1)
                           for i in range(0, len(self.h_text), chunk)])
        return [table.to(dtype or table.dtype)]

    def full_scores(self, seq, tables=None, per_bucket=False):
        """Cosine of every item to the query, (B, N+1); padding rows are zero, so they drop out
        of the window's sum."""
        table = (tables or self.item_tables())[0]  # (N+1, d_text)
        if self.mode == "last":
            query = table[seq[:, -1]]  # (B, d_text): left-padded, the last column is the latest item
        else:
            query = F.normalize(table[seq].float().sum(1), dim=-1)  # (B, d_text): the window's mean direction
        return (query.to(table.dtype) @ table.T).float()  # (B, N+1)


class Blend(nn.Module):
    """A fixed mixture of two trained models' scores, each standardised per user over the N
    items: weight * z(A) + (1 - weight) * z(B). Nothing is trained; an evaluation-only probe
    (evaluate.py --blend) of whether two models, e.g. an ID and a text model, carry signal
    that the other lacks, with no gate to learn it."""

    def __init__(self, a, b, weight):
        super().__init__()
        self.a, self.b, self.weight = a, b, weight

    def item_tables(self, dtype=None):
        return [self.a.item_tables(dtype), self.b.item_tables(dtype)]  # each model's own tables

    def full_scores(self, seq, tables=None, per_bucket=False):
        tables = tables or self.item_tables()
        z = []
        for model, t in zip((self.a, self.b), tables):
            s = model.full_scores(seq, t)[:, 1:]  # (B, N): padding left out of the statistics
            z.append((s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-12))
        mix = self.weight * z[0] + (1 - self.weight) * z[1]
        return torch.cat([mix.new_zeros(len(seq), 1), mix], dim=1)  # (B, N+1); evaluate drops column 0


# --- Rebuilding any phase's model from its checkpoint -------------------------------------


def build_model(model_args, data):
    """model_args (stored in every checkpoint) + prepared dataset -> model.

    {"kind": "expert", "expert": "id"|"align"|"llm", backbone, d, L, ...} is a single
    expert (phase 1: "id", phase 2: "align"); {"kind": "pad", "experts": [...],
    "gate": ...} is the phase-3 model; {"kind": "textknn", "mode": ...} the text floor."""
    text_emb, n_items = data["text_emb"], data["n_items"]
    if model_args["kind"] == "textknn":
        return TextKNN(text_emb, model_args["mode"])
    if model_args["kind"] == "expert":
        return make_expert(model_args["expert"], n_items, text_emb, model_args)
    experts = {k: make_expert(k, n_items, text_emb, model_args) for k in model_args["experts"]}
    widths = [text_emb.shape[1] if k == "text" else model_args["d"] for k in experts]  # each expert's state width
    gate = make_gate(model_args["gate"], data["n_buckets"], widths if "text" in experts else model_args["d"], experts,
                     model_args.get("gate_init", "uniform"))
    return PAD(experts, gate, data["item_bucket"], data["n_buckets"], model_args.get("bucket_bias", False),
               model_args.get("mix", "logit"), model_args.get("bucket_temp", False),
               data["item_freq"] if model_args.get("logit_adjust") else None, model_args.get("logit_adjust", 0),
               widths[0] if model_args.get("user_bias") else None)


