"""Phase 2 of PAD: characteristic & recommendation-anchored alignment (Sec. 3.2, Eq. 4-7,
Alg. 1 lines 7-14), with the variants of Sec. 4.4 (Fig. 4) and 4.5 (Fig. 5a).

    python align.py --data ml-100k --gamma 0.1 [--kernel gaussian] [--anchor rec]

Reads the phase-1 checkpoint (--init, default runs/NAME/pretrain_BACKBONE_seedS.pt) and
writes runs/NAME/align_BACKBONE_KERNEL_ANCHOR_gammaG_seedS.pt with a metrics .json.
The alignment expert starts from the phase-1 ID table and encoder; its text side is the
frozen text table through a new reduction MLP f_MLP (Eq. 7).
"""
from functools import partial

import torch

from mmd import KERNELS, TAU, alignment_loss
from models import BACKBONES, make_expert
from runs import DEFAULT_ALIGN, model_from_checkpoint, read_checkpoint, reuse_finished, run_path, text_of
from trainer import (add_text_args, add_training_args, finish, fit, is_main_process, parse_args, parser,
                     rec_loss, setup)

ANCHORS = ("rec", "none", "frozen")


def mmd_rows(seq, pos, neg, rows, sample):
    """The rows of the MMD in a batch, a fixed number S of slots with a mask of the real ones,
    so that a compiled step has one shape for every batch: (item ids (S,), real (S,) bool).

    rows "items": the slots of the batch windows seq (B, L), real where not padding; "batch":
    every slot (window, last target, negatives), padding included, all real. Above `sample`
    slots, S = sample: a uniform random subset of min(n_real, sample) real rows, padded with
    slots of weight 0, the rows that a random subset of the n_real real rows alone would give."""
    if rows == "items":
        # DEVIATION: the batch's real behaviour items; the authors' release feeds every slot
        # (window, last target, negatives, padding): --mmd-rows batch
        items = seq.flatten()  # (B·L,)
        real = items != 0  # padding slots weigh 0 in the MMD
    else:
        items = torch.cat([seq, pos[:, -1:], neg], 1).flatten()  # (B·(2L+1),) every slot, padding 0 included
        real = torch.ones_like(items, dtype=torch.bool)
    if len(items) > sample:
        # DEVIATION: a random subset of --mmd-sample rows keeps the 2S x 2S kernel matrix small.
        # The `sample` smallest of uniform keys, a padding slot keyed after every real one: with
        # n_real >= sample a uniform random subset of the real rows, else all of them
        keys = torch.rand(len(items), dtype=torch.float64, device=items.device).masked_fill(~real, 2.0)  # (B·L,)
        keep = keys.topk(sample, largest=False).indices  # (S,)
        items, real = items[keep], real[keep]
    return items, real


def phase2_loss(model, seq, pos, neg, mask, gamma, kernel="gaussian", anchor="rec", rows="items", sample=512,
                tau=TAU, loss="bce", ce_chunk=0):
    """Alg. 1 lines 10-12, Eq. (4): L = L_REC + γ · D_k²({h^s}, {h^c}), the MK-MMD (Eq. 5) between
    the alignment expert's text side h^s = f_MLP(SG(h_text)) (Eq. 7) and its ID side h^c, over the
    batch's items (mmd_rows). anchor (Sec. 4.4): rec, Eq. (4); frozen, SG(h^c) in the MMD;
    none, γ · MMD alone (L_REC still logged). -> (loss, {name: value to log})"""
    with torch.set_grad_enabled(anchor != "none"):
        l_rec = rec_loss(model, seq, pos, neg, mask, loss, ce_chunk)  # Eq. (6)
    items, real = mmd_rows(seq, pos, neg, rows, sample)  # (S,) each
    h_c, h_s = model.items.parts(items)  # (S, d) each
    if anchor == "frozen":
        h_c = h_c.detach()  # SG(D_rec): the collaborative side is not moved by the MMD
    with torch.autocast(items.device.type, enabled=False):  # kernels in float32, also under bf16 autocast
        l_mmd = alignment_loss(kernel, h_s.float(), h_c.float(), mask=real, **({"tau": tau} if kernel == "infonce" else {}))
    logs = {loss: l_rec.detach(), kernel: l_mmd}
    if anchor == "none":
        return gamma * l_mmd, logs  # Non-Anchored
    return l_rec + gamma * l_mmd, logs  # Eq. (4)


def flags():
    p, g = parser(__doc__, "align", "phase 2: Eq. (4)-(7), Alg. 1 lines 7-14")
    e = g["equation"]
    e.add_argument("--gamma", type=float, default=DEFAULT_ALIGN["gamma"],
                   help="γ of Eq. (4), the MK-MMD's weight; paper: not given (README: Deviations); 0: SMEM")
    e.add_argument("--kernel", default=DEFAULT_ALIGN["kernel"], choices=KERNELS,
                   help="Eq. (12), (17), (14), (15) or InfoNCE (16); paper: gaussian")
    e.add_argument("--anchor", default=DEFAULT_ALIGN["anchor"], choices=ANCHORS,
                   help="rec: Eq. (4); none: MMD only; frozen: MMD(h_s, SG(h_c)) (Sec. 4.4); paper: rec")
    e.add_argument("--backbone", default="sasrec", choices=BACKBONES, help="backbone of the phase-1 run")
    e.add_argument("--init", default=None, help="phase-1 checkpoint; default runs/NAME/pretrain_BACKBONE_seedS.pt")
    add_training_args(p, g)
    add_text_args(p, g)
    g["authors"].add_argument("--mmd-rows", default="items", choices=("items", "batch"),
                              help="the MMD's rows: the batch's real items; authors' release: batch (every slot)")
    g["authors"].add_argument("--fuse-dropout", type=float, default=0.0,
                              help="dropout before the fusion layer; authors' release: 0.1")
    g["authors"].add_argument("--tau", type=float, default=TAU, help="InfoNCE τ of Eq. (16); authors' release: 0.1")
    g["beyond"].add_argument("--mmd-sample", type=int, default=512, help="at most this many rows enter the MMD")
    args = parse_args(p, "align")
    if args.anchor == "none" and args.gamma == 0:
        raise SystemExit("--anchor none with --gamma 0 leaves no loss to train; use --gamma > 0 or --anchor rec")
    return args


def main():
    args = flags()
    data, device = setup(args)
    args.init = str(args.init or run_path(data["name"], "pretrain", backbone=args.backbone, seed=args.seed,
                                          loss=args.loss, preset=args.preset))
    out = args.out or run_path(data["name"], "align", backbone=args.backbone, kernel=args.kernel, anchor=args.anchor,
                               gamma=args.gamma, seed=args.seed, loss=args.loss, preset=args.preset, text=text_of(args))
    if reuse_finished(out, data, args):
        return
    ckpt1 = read_checkpoint(args.init)
    phase1 = model_from_checkpoint(ckpt1, data, args.init, phase=1, backbone=args.backbone)
    model_args = {**ckpt1["model_args"], "expert": "align", "fuse_dropout": args.fuse_dropout,
                  "text_norm": args.text_norm, "text_layers": args.text_layers, "text_out": args.text_out}

    # --- Alg. 1 line 7, Eq. (6)-(7): the alignment expert, phase 1's ID table h^c and encoder, a new f_MLP ---
    model = make_expert("align", data["n_items"], data["text_emb"], model_args)
    model.items.id.load_state_dict(phase1.items.state_dict())
    model.encoder.load_state_dict(phase1.encoder.state_dict())
    model.to(device)

    # --- Alg. 1 lines 8-13, Eq. (4): L_REC + γ · MK-MMD(h^s, h^c) ---
    print(f"phase 2: kernel {args.kernel}, anchor {args.anchor}, gamma {args.gamma:g}, from {args.init}")
    loss_fn = partial(phase2_loss, gamma=args.gamma, kernel=args.kernel, anchor=args.anchor, rows=args.mmd_rows,
                      sample=args.mmd_sample, tau=args.tau, loss=args.loss, ce_chunk=args.ce_chunk)
    model, log = fit(model, data, args, out, loss_fn)
    if is_main_process():  # under torchrun, rank 0 tests and writes
        finish(model, model_args, data, args, 2, log, out, extra={"init": args.init})


if __name__ == "__main__":
    main()
