"""The baselines of Table 2 (Sec. 4.1.3) that are not a PAD phase, each one small recommender
trained with the shared loop of trainer.py (same data, negatives, early stopping, test).

    python baselines.py --data ml-100k --method morec

  hybrid  Hybrid encoding (CoLLM, LLaRA): the ID embedding and the reduced text embedding
          concatenated (then GELU(Linear), as the alignment expert) into one SASRec, from scratch.
  morec   MoRec (Yuan et al., 2023): the reduced text embedding f_MLP(SG(h_text)) alone.
  ctrl    CTRL (Li et al., 2023): stage 1 aligns the ID table with a text tower f_MLP by
          symmetric InfoNCE (cosine, tau 0.07) for --ctrl-epochs; stage 2 fine-tunes the ID
          SASRec from that table on BCE alone (the text tower is dropped).
  make    MAKE (the paper's two-expert baseline): an ID expert from scratch and an LLM expert
          initialised from the morec run, outputs fused with one learned weight per expert.
  disco   DisCo (Du et al., 2024): the item embedding in two chunks (ID | reduced text), BCE
          plus --sufficiency x (each chunk alone predicts the next item) plus
          --disentangle x (the chunks' cross-correlation).
  textknn the text-similarity floor (beyond the paper): every item ranked by the cosine of its
          frozen text embedding to the last item of the window (--knn last) or to the window's
          mean (--knn mean); nothing is trained, the run only scores and writes its metrics.

SASRec is pretrain.py and SMEM is align.py --gamma 0 then finetune.py (experiments.py runs
both). Writes runs/NAME/baseline_METHOD_BACKBONE_seedS.pt and a metrics .json beside it
(CTRL also its stage-1 table, OUT.stage1.pt). The choices each baseline pins down where the
paper is brief are in results/experiments.md.
"""
from functools import partial
from pathlib import Path

import torch

from dataset import atomic_save, split_sequences
from mmd import TAU, info_nce
from models import BACKBONES, build_model, disco_losses, make_expert
from runs import (check_checkpoint, match_text_args, model_from_checkpoint, read_checkpoint, reuse_finished, run_path,
                  text_of)
from trainer import (add_model_args, add_training_args, finish, fit, is_main_process, model_config,
                     parse_args, parser, rec_loss, setup)

METHODS = ("hybrid", "morec", "ctrl", "make", "disco", "textknn")


def ctrl_stage1(model, data, args, device):
    """CTRL stage 1: symmetric InfoNCE between the ID table h^c and the text tower f_MLP
    over the distinct items of each batch of training sequences (no recommendation loss;
    the encoder is not trained). model: a 'align'-kind expert whose items.parts gives both.
    DEVIATION: CTRL contrasts whole samples (a tabular model vs a language model reading the
    sample as a prompt); with only item texts, the contrast here is item-level."""
    seqs, _ = split_sequences(data["seqs"], "train")
    params = list(model.items.id.parameters()) + list(model.items.f_mlp.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for epoch in range(1, args.ctrl_epochs + 1):
        order, total = torch.randperm(len(seqs), generator=gen), 0.0
        batches = range(0, len(order), args.batch_size)
        for i in batches:
            items = seqs[order[i:i + args.batch_size]].unique().to(device)
            items = items[items != 0]  # (n,) distinct items: a repeat would be a false negative
            h_c, h_s = model.items.parts(items)  # (n, d) each
            loss = (info_nce(h_c, h_s, args.ctrl_tau) + info_nce(h_s, h_c, args.ctrl_tau)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        print(f"ctrl stage 1 epoch {epoch:3d}  infonce {total / len(batches):.4f}", flush=True)
    return model


def baseline_loss(model, seq, pos, neg, mask, loss="bce", ce_chunk=0, disco=None):
    """A baseline's training loss: L_REC (Eq. 1, or --loss ce); DisCo adds, with
    disco = (sufficiency, disentangle) weights, its two terms (models.disco_losses).
    -> (loss, {name: value to log})"""
    l_rec = rec_loss(model, seq, pos, neg, mask, loss, ce_chunk)
    if disco is None:
        return l_rec, {loss: l_rec.detach()}
    sufficiency, disentangle = disco_losses(model, seq, pos)
    return (l_rec + (disco[0] * sufficiency + disco[1] * disentangle),
            {loss: l_rec.detach(), "sufficiency": sufficiency, "disentangle": disentangle})


def flags():
    p, g = parser(__doc__, "baselines", "the baseline (Sec. 4.1.3, Table 2)")
    e = g["equation"]
    e.add_argument("--method", required=True, choices=METHODS, help="which Table 2 baseline")
    e.add_argument("--backbone", default="sasrec", choices=BACKBONES, help="sequential recommender; paper: sasrec")
    e.add_argument("--ctrl-epochs", type=int, default=20, help="ctrl: epochs of the contrastive stage 1")
    e.add_argument("--ctrl-tau", type=float, default=TAU, help="ctrl: InfoNCE temperature")
    e.add_argument("--morec", default=None, help="make: the morec run seeding the LLM expert; default: this seed's")
    e.add_argument("--sufficiency", type=float, default=0.1, help="disco: weight of the sufficiency loss")
    e.add_argument("--disentangle", type=float, default=0.1, help="disco: weight of the disentanglement loss")
    e.add_argument("--knn", default="last", choices=("last", "mean"),
                   help="textknn: the query is the window's last item or its mean")
    add_training_args(p, g)
    add_model_args(p, g)
    return parse_args(p, "baselines")


def main():
    args = flags()
    data, device = setup(args)
    name = data["name"]
    tags = {"loss": args.loss, "preset": args.preset, "text": {} if args.method == "textknn" else text_of(args)}
    if args.method == "make":
        args.morec = str(args.morec or run_path(name, "baseline", method="morec", backbone=args.backbone, seed=args.seed,
                                                **tags))
    method = f"textknn-{args.knn}" if args.method == "textknn" else args.method
    out = args.out or run_path(name, "baseline", method=method, backbone=args.backbone, seed=args.seed, **tags)
    if reuse_finished(out, data, args):
        return
    if args.method == "textknn":  # nothing to train: score and write
        model_args = {"kind": "textknn", "mode": args.knn}
        model = build_model(model_args, data).to(device)
        print(f"baseline text-kNN ({args.knn}): cosine of frozen text embeddings, nothing trained")
        finish(model, model_args, data, args, "baseline textknn", [], out)
        return
    cfg = {"kind": "expert", **model_config(data, args), "fuse_dropout": 0.0}  # complete model_args (runs.MODEL_ARGS)
    phase, disco, extra = f"baseline {args.method}", None, {}

    if args.method in ("hybrid", "morec", "disco"):
        model_args = {**cfg, "expert": {"hybrid": "align", "morec": "llm", "disco": "disco"}[args.method]}
        model = make_expert(model_args["expert"], data["n_items"], data["text_emb"], model_args)
        if args.method == "disco":
            disco = (args.sufficiency, args.disentangle)
    elif args.method == "ctrl":
        stage1_path = Path(out).with_suffix(".stage1.pt")
        stage1_args = {**cfg, "expert": "align"}
        stage1 = make_expert("align", data["n_items"], data["text_emb"], stage1_args).to(device)
        if stage1_path.is_file():  # a finished stage 1 is reused, as any finished run
            stage1.load_state_dict(model_from_checkpoint(read_checkpoint(stage1_path), data, stage1_path).state_dict())
            print(f"ctrl stage 1: reusing {stage1_path}")
        else:
            ctrl_stage1(stage1, data, args, device)  # under torchrun every rank runs it alike (same seed)
            if is_main_process():
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                atomic_save({"phase": "ctrl stage 1", "model_args": stage1_args, "dataset": name,
                             "state": {k: v.cpu() for k, v in stage1.state_dict().items()},
                             "args": vars(args), "n_items": data["n_items"], "fingerprint": data["fingerprint"]}, stage1_path)
        model_args = {**cfg, "expert": "id"}
        model = make_expert("id", data["n_items"], data["text_emb"], model_args)
        model.items.load_state_dict(stage1.items.id.state_dict())  # stage 2 starts from the aligned table
        extra = {"stage1": str(stage1_path)}
    else:  # make
        morec = args.morec
        ckpt = read_checkpoint(morec)
        check_checkpoint(ckpt, data, morec, phase="baseline morec", backbone=args.backbone, like=cfg)
        match_text_args(args, ckpt["model_args"], morec)
        model_args = {**cfg, "kind": "pad", "experts": ["id", "llm"], "gate": "none", "gate_init": "uniform",
                      "bucket_bias": False}
        model = build_model(model_args, data)
        model.experts["llm"].load_state_dict(model_from_checkpoint(ckpt, data, morec).state_dict())
        extra = {"init": morec}
    model.to(device)

    print(f"baseline {args.method} on {args.backbone}")
    model, log = fit(model, data, args, out, partial(baseline_loss, loss=args.loss, ce_chunk=args.ce_chunk, disco=disco))
    if args.method == "make":
        extra["expert_weights"] = dict(zip(model.experts, torch.softmax(model.gate.v, 0).tolist()))
        print(f"fused expert weights: {extra['expert_weights']}")
    if is_main_process():  # under torchrun, rank 0 tests and writes
        finish(model, model_args, data, args, phase, log, out, extra=extra)


if __name__ == "__main__":
    main()
