"""Phase 1 of PAD: pre-train a sequential recommender on item ids alone (Sec. 2.1 Eq. 1,
Sec. 3.1, Alg. 1 lines 1-6). Its checkpoint seeds the ID and alignment experts later; on
its own it is the SASRec baseline of Table 2 (and Table 3's "Origin" for GRU4Rec, Caser).

    python pretrain.py --data ml-100k --backbone sasrec

Reads data/NAME/dataset.pt (prepare_data.py); writes runs/NAME/pretrain_BACKBONE_seedS.pt
and a metrics .json beside it. The training loop is trainer.fit, shared by every phase.
"""
import argparse

from dataset import run_path
from models import BACKBONES, make_expert
from trainer import (add_model_args, add_training_args, finish, fit, is_main_process, model_config, parse_args,
                     reuse_finished, setup)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    p.add_argument("--backbone", default="sasrec", choices=BACKBONES, help="sequential recommender f_theta; paper: sasrec (Table 3: gru4rec, caser)")
    add_model_args(p)
    p.set_defaults(lr=None)
    args = parse_args(p, "pretrain")
    if args.lr is None:  # GRU4Rec from scratch plateaus within the patience window at 1e-3 on ml-100k
        args.lr = 3e-3 if args.backbone == "gru4rec" else 1e-3

    data, device = setup(args)
    out = args.out or run_path(data["name"], "pretrain", backbone=args.backbone, seed=args.seed, loss=args.loss,
                               preset=args.preset)
    if reuse_finished(out, data, args):
        return
    model_args = {"kind": "expert", "expert": "id", **model_config(data, args)}

    # --- Phase 1: the ID expert f_id on collaborative embeddings only, BCE of Eq. (1) ---
    model = make_expert("id", data["n_items"], data["text_emb"], model_args).to(device)
    model, log = fit(model, data, args, out)
    if is_main_process():  # under torchrun, rank 0 tests and writes
        finish(model, model_args, data, args, 1, log, out)


if __name__ == "__main__":
    main()
