"""Phase 2 of PAD: characteristic & recommendation-anchored alignment (Sec. 3.2, Eq. 4-7,
Alg. 1 lines 7-14), with the variants of Sec. 4.4 (Fig. 4) and 4.5 (Fig. 5a).

    python align.py --data ml-100k --gamma 0.1 [--kernel gaussian] [--anchor rec]

Reads the phase-1 checkpoint (--init, default runs/NAME/pretrain_BACKBONE_seedS.pt) and
writes runs/NAME/align_BACKBONE_KERNEL_ANCHOR_gammaG_seedS.pt with a metrics .json.
The alignment expert starts from the phase-1 ID table and encoder; its text side is the
frozen text table through a new reduction MLP f_MLP (Eq. 7).
"""
import argparse

import torch

from dataset import DEFAULT_ALIGN, run_path, text_of
from mmd import KERNELS, TAU, alignment_loss
from models import BACKBONES, make_expert, model_from_checkpoint, read_checkpoint
from trainer import add_text_args, add_training_args, finish, fit, is_main_process, parse_args, reuse_finished, setup

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


def mmd_term(args):
    """The extra loss of phase 2 for fit(): (model, seq, pos, neg) -> (γ · MMD, {kernel: MMD})."""

    # --- Eq. (4)-(5): L = L_REC + γ · D_k²({h^s}_a, {h^c}_a) over the batch's items ---
    def term(model, seq, pos, neg):
        items, real = mmd_rows(seq, pos, neg, args.mmd_rows, args.mmd_sample)  # (S,) each
        h_c, h_s = model.items.parts(items)  # (S, d) each
        if args.anchor == "frozen":
            h_c = h_c.detach()  # SG(D_rec): the collaborative side is not moved by the MMD
        with torch.autocast(items.device.type, enabled=False):  # kernels in float32, also under bf16 autocast
            tau = {"tau": args.tau} if args.kernel == "infonce" else {}
            mmd = alignment_loss(args.kernel, h_s.float(), h_c.float(), mask=real, **tau)
        return args.gamma * mmd, {args.kernel: mmd}

    return term


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    p.add_argument("--backbone", default="sasrec", choices=BACKBONES, help="backbone of the phase-1 checkpoint to start from")
    p.add_argument("--init", default=None, help="phase-1 checkpoint; default runs/NAME/pretrain_BACKBONE_seedS.pt")
    p.add_argument("--gamma", type=float, default=DEFAULT_ALIGN["gamma"], help="γ in Eq. (4), weight of the MK-MMD loss; not given in the paper (the authors' release hard-codes 0.2); 0 = no alignment (SMEM)")
    p.add_argument("--kernel", default=DEFAULT_ALIGN["kernel"], choices=KERNELS, help="alignment loss: MK-MMD kernel (Eq. 12, 17, 14, 15) or InfoNCE (Eq. 16); paper: gaussian")
    p.add_argument("--anchor", default=DEFAULT_ALIGN["anchor"], choices=ANCHORS,
                   help="rec: L_REC + γ·MMD (paper); none: MMD only (Non-Anchored); frozen: L_REC + γ·MMD(h_s, SG(h_c)) (Sec. 4.4)")
    p.add_argument("--mmd-rows", default="items", choices=("items", "batch"),
                   help="rows of the MMD: the batch's real behaviour items, or every slot of the batch (window, last "
                        "target, negatives, padding: the authors' release); paper: not given")
    p.add_argument("--fuse-dropout", type=float, default=0.0,
                   help="dropout before the alignment expert's fusion layer (authors' release: 0.1; paper: not given)")
    add_text_args(p)
    p.add_argument("--tau", type=float, default=TAU, help="InfoNCE temperature τ of Eq. (16) (--kernel infonce); "
                   "paper: not given; authors' release: 0.1")
    p.add_argument("--mmd-sample", type=int, default=512, help="at most this many real behaviour items per batch enter the MMD (not in the paper; the authors' release feeds every slot of the batch: inputs, targets, negatives and padding)")
    args = parse_args(p, "align")
    if args.anchor == "none" and args.gamma == 0:
        raise SystemExit("--anchor none with --gamma 0 leaves no loss to train; use --gamma > 0 or --anchor rec")

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

    # --- The alignment expert: phase-1 ID table h^c and encoder, new f_MLP over SG(h_text) ---
    model = make_expert("align", data["n_items"], data["text_emb"], model_args)
    model.items.id.load_state_dict(phase1.items.state_dict())
    model.encoder.load_state_dict(phase1.encoder.state_dict())
    model.to(device)

    print(f"phase 2: kernel {args.kernel}, anchor {args.anchor}, gamma {args.gamma:g}, from {args.init}")
    model, log = fit(model, data, args, out, extra_loss=mmd_term(args), use_rec_loss=args.anchor != "none")
    if is_main_process():  # under torchrun, rank 0 tests and writes
        finish(model, model_args, data, args, 2, log, out, extra={"init": args.init})


if __name__ == "__main__":
    main()
