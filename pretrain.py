"""Phase 1 of PAD: pre-train a sequential recommender on item ids alone (Sec. 2.1 Eq. 1,
Sec. 3.1, Alg. 1 lines 1-6). Its checkpoint seeds the ID and alignment experts later; on
its own it is the SASRec baseline of Table 2 (and Table 3's "Origin" for GRU4Rec, Caser).

    python pretrain.py --data ml-100k --backbone sasrec

Reads data/NAME/dataset.pt (prepare_data.py); writes runs/NAME/pretrain_BACKBONE_seedS.pt
and a metrics .json beside it. The training loop is trainer.fit, shared by every phase.
"""
from functools import partial

from models import BACKBONES, make_expert
from runs import reuse_finished, run_path
from trainer import (add_model_args, add_training_args, finish, fit, is_main_process, model_config, parse_args,
                     parser, rec_loss, setup)


def phase1_loss(model, seq, pos, neg, mask, loss="bce", ce_chunk=0):
    """Alg. 1 line 4: L_REC of the ID expert, Eq. (1)'s BCE with one sampled negative per
    position (--loss ce: softmax over all items). -> (loss, {name: value to log})"""
    l_rec = rec_loss(model, seq, pos, neg, mask, loss, ce_chunk)  # Eq. (1)
    return l_rec, {loss: l_rec.detach()}


def flags():
    p, g = parser(__doc__, "pretrain", "phase 1: Eq. (1), Alg. 1 lines 1-6")
    g["equation"].add_argument("--backbone", default="sasrec", choices=BACKBONES,
                               help="sequential recommender f_theta; paper: sasrec (Table 3: gru4rec, caser)")
    add_training_args(p, g)
    add_model_args(p, g)
    p.set_defaults(lr=None)
    args = parse_args(p, "pretrain")
    if args.lr is None:  # GRU4Rec from scratch plateaus within the patience window at 1e-3 on ml-100k
        args.lr = 3e-3 if args.backbone == "gru4rec" else 1e-3
    return args


def main():
    args = flags()
    data, device = setup(args)
    out = args.out or run_path(data["name"], "pretrain", backbone=args.backbone, seed=args.seed, loss=args.loss,
                               preset=args.preset)
    if reuse_finished(out, data, args):
        return
    model_args = {"kind": "expert", "expert": "id", **model_config(data, args)}

    # --- Alg. 1 lines 1-6, Eq. (1): the ID expert f_id on item ids alone, trained on L_REC ---
    model = make_expert("id", data["n_items"], data["text_emb"], model_args).to(device)
    model, log = fit(model, data, args, out, partial(phase1_loss, loss=args.loss, ce_chunk=args.ce_chunk))
    if is_main_process():  # under torchrun, rank 0 tests and writes
        finish(model, model_args, data, args, 1, log, out)


if __name__ == "__main__":
    main()
