"""Phase 3 of PAD: triple experts with frequency-aware gating, fine-tuned on L_REC
(Sec. 3.3, Eq. 8-11, Alg. 1 lines 15-23), with the ablations of Sec. 4.7 (Fig. 5b).

    python finetune.py --data ml-100k [--gate freq] [--experts id,align,llm] [--align PHASE2.pt]

Reads the phase-1 (--pretrain) and phase-2 (--align) checkpoints and writes
runs/NAME/finetune_BACKBONE_GATE_EXPERTS_KERNEL_ANCHOR_gammaG_seedS.pt (the last three name the
phase-2 run it started from; absent without the alignment expert) with a metrics .json,
which also holds the mean gate probability of each expert per frequency bucket on the test users.
"""
import argparse

import torch
import torch.nn.functional as F

from dataset import DEFAULT_ALIGN, GATE_FITS, align_tag, history_before_target, run_path, split_sequences, text_of
from models import ALL_EXPERTS, BACKBONES, EXPERTS, GATE_INITS, GATES, build_model, check_checkpoint, model_from_checkpoint, read_checkpoint
from evaluate import protocol, user_ranks
from trainer import (FLAG_DEFAULTS, K, TEXT_FLAGS, add_text_args, add_training_args, bce_loss, finish, fit,
                     is_main_process, match_text_args, parse_args, rec_loss, reuse_finished, sample_negatives, setup)


def parse_experts(text):
    experts = [e for e in text.split(",") if e]
    if not experts or any(e not in ALL_EXPERTS for e in experts) or len(set(experts)) != len(experts):
        raise argparse.ArgumentTypeError(f"--experts {text!r}: a comma-separated subset of {','.join(ALL_EXPERTS)}, "
                                         f"e.g. id,align,llm")
    return [e for e in ALL_EXPERTS if e in experts]  # canonical order id, align, llm, text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    p.add_argument("--backbone", default="sasrec", choices=BACKBONES, help="backbone of the phase-1/2 checkpoints")
    p.add_argument("--pretrain", default=None, help="phase-1 checkpoint (ID expert); default runs/NAME/pretrain_BACKBONE_seedS.pt")
    p.add_argument("--align", default=None,
                   help="phase-2 checkpoint (alignment expert); default the align.py run with its default flags, "
                        "runs/NAME/align_BACKBONE_gaussian_rec_gamma0.1_seedS.pt")
    p.add_argument("--experts", type=parse_experts, default=list(EXPERTS), help="experts kept, of id,align,llm (Eq. 8-10; paper: all three) and text (beyond the paper: "
                        "text-kNN under the gate, models.UnitText, models.LastItem)")
    p.add_argument("--gate", default="freq", choices=GATES,
                   help="freq: Eq. (11) on bucket b(i) and expert state (paper); bucket: authors' release; none: one global weight per expert")
    p.add_argument("--gate-init", default="uniform", choices=GATE_INITS,
                   help="uniform, or the authors' release's ramp over the buckets (ID 1->0, LLM 0->1, alignment "
                        "about 1-2%%); paper: not given")
    p.add_argument("--gate-weight-decay", type=float, default=None,
                   help="AdamW weight decay of the gate's parameters; default --weight-decay (authors' release: 0.01)")
    p.add_argument("--expert-lr", type=float, default=None,
                   help="beyond the paper: the experts' learning rate in phase 3, the gate keeping --lr; default --lr "
                        "(paper: not given)")
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="beyond the paper: add this weight times each expert's own L_REC to the mixture's in phase 3 "
                        "(paper: 0)")
    p.add_argument("--bucket-bias", action="store_true",
                   help="beyond the paper: add one learned offset per frequency bucket to Eq. (11)'s Phi (logit "
                        "adjustment fit with the gate); paper: none")
    p.add_argument("--gate-fit", default="train", choices=tuple(GATE_FITS),
                   help="train: the gate learns with the experts on the training data (Alg. 1); valid (beyond the "
                        "paper): after that, the gate alone is refit on the validation targets, experts frozen, "
                        "because on training data the memorised ID expert always wins; valid-only (beyond the paper): "
                        "no training on the training data, the experts keep the weights phases 1-2 and --llm-init gave "
                        "them and the gate is fit on the validation targets alone (--llm-init needed for an LLM expert); "
                        "either way the run's validation score is cross-fitted (--gate-fit-folds)")
    p.add_argument("--gate-fit-epochs", type=int, default=5, help="--gate-fit valid: passes over the validation users")
    p.add_argument("--gate-fit-lr", type=float, default=1e-2, help="--gate-fit valid: Adam's learning rate")
    p.add_argument("--gate-fit-batch-size", type=int, default=512, help="--gate-fit valid: validation users per step")
    p.add_argument("--gate-fit-negatives", type=int, default=16,
                   help="--gate-fit valid, --loss bce: negatives per validation target, drawn each pass")
    p.add_argument("--gate-fit-folds", type=int, default=2,
                   help="--gate-fit valid: the metrics' validation score is cross-fitted: each of this many folds of "
                        "the validation users is ranked by a gate fit on the others (the model kept is fit on all)")
    p.add_argument("--llm-init", default=None,
                   help="a baselines.py --method morec run that seeds the LLM expert (as MAKE does; beyond the paper, "
                        "whose Alg. 1 line 15 loads the ID and alignment experts only), or 'morec': that run of this "
                        "seed, loss, text flags and preset under runs/NAME/; default: a new LLM expert")
    add_text_args(p, inherit=True)
    args = parse_args(p, "finetune")

    data, device = setup(args)
    name = data["name"]
    tags = {"loss": args.loss, "preset": args.preset}  # the inputs of a CE or preset pipeline are named alike
    args.pretrain = str(args.pretrain or run_path(name, "pretrain", backbone=args.backbone, seed=args.seed, **tags))
    if "align" in args.experts:  # by default the phase-2 run of the text flags given here
        args.align = str(args.align or run_path(name, "align", backbone=args.backbone, seed=args.seed, **tags,
                                                 **DEFAULT_ALIGN, text=text_of(args)))
    else:
        args.align = None
    if args.llm_init == "morec":  # the MoRec run of this seed, loss, text flags and preset
        args.llm_init = str(run_path(name, "baseline", method="morec", backbone=args.backbone, seed=args.seed, **tags,
                                     text=text_of(args)))
    if args.llm_init and "llm" not in args.experts:
        raise SystemExit(f"--llm-init {args.llm_init}: seeds the LLM expert, which --experts {','.join(args.experts)} leaves out")
    if args.gate_fit == "valid-only" and "llm" in args.experts and not args.llm_init:
        raise SystemExit("--gate-fit valid-only trains no expert, so the LLM expert would stay random: pass --llm-init "
                         "MOREC.pt (a baselines.py --method morec run), or leave llm out of --experts")
    if args.gate_fit != "train" and args.gate_fit_folds < 2:
        raise SystemExit(f"--gate-fit-folds {args.gate_fit_folds}: the cross-fitted validation score needs at least 2 folds")
    paths = {"id": args.pretrain, "align": args.align, "llm": args.llm_init}
    ckpts = {k: read_checkpoint(paths[k]) for k in ("id", "align", "llm") if paths[k]}
    # every expert takes phase 1's encoder configuration, so phase 1 is checked even without the ID expert
    check_checkpoint(ckpts["id"], data, paths["id"], phase=1, backbone=args.backbone)
    tag = ""
    if "align" in ckpts:
        check_checkpoint(ckpts["align"], data, paths["align"], phase=2, backbone=args.backbone, like=ckpts["id"]["model_args"])
        tag = align_tag(*(ckpts["align"]["args"][k] for k in ("kernel", "anchor", "gamma")))
        match_text_args(args, ckpts["align"]["model_args"], paths["align"])  # both text experts read the table alike
    if "llm" in ckpts:
        check_checkpoint(ckpts["llm"], data, paths["llm"], phase="baseline morec", backbone=args.backbone,
                         like=ckpts["id"]["model_args"])
        match_text_args(args, ckpts["llm"]["model_args"], paths["llm"])
    FLAG_DEFAULTS.update({key: default for _, key, default in TEXT_FLAGS})  # what a run made before these flags used
    for _, key, default in TEXT_FLAGS:
        setattr(args, key, default if getattr(args, key) is None else getattr(args, key))
    gate_name = args.gate + "-bias" * args.bucket_bias + GATE_FITS[args.gate_fit]  # e.g. finetune_sasrec_freq-validfit_...
    out = args.out or run_path(name, "finetune", backbone=args.backbone, gate=gate_name, experts=args.experts,
                               align=tag, llm_init=bool(args.llm_init), seed=args.seed, **tags, text=text_of(args))
    if reuse_finished(out, data, args):
        return
    model_args = {**ckpts["id"]["model_args"], "kind": "pad", "experts": list(args.experts), "gate": args.gate,
                  "gate_init": args.gate_init, "bucket_bias": args.bucket_bias}
    if "align" in ckpts:
        model_args["fuse_dropout"] = ckpts["align"]["model_args"].get("fuse_dropout", 0.0)
    model_args.update({key: getattr(args, key) for _, key, _ in TEXT_FLAGS})
    model_args.pop("expert")

    # --- Eq. (8)-(10): ID expert from phase 1, alignment expert from phase 2, new LLM expert ---
    model = build_model(model_args, data)
    for kind, phase in (("id", 1), ("align", 2), ("llm", "baseline morec")):
        if kind in args.experts and kind in ckpts:
            seeded = model_from_checkpoint(ckpts[kind], data, paths[kind], phase=phase, backbone=args.backbone)
            model.experts[kind].load_state_dict(seeded.state_dict())
    model.to(device)

    # --- Eq. (11): Phi = sum_k g_k(b(i), h_k) o_k, trained with BCE on Phi (MMD removed) ---
    print(f"phase 3: experts {','.join(args.experts)}, gate {args.gate}, from {', '.join(paths[k] for k in ckpts)}")
    if args.gate_fit == "valid-only":  # DEVIATION (beyond the paper): the experts as phases 1-2 left them
        print(protocol(data, K, args.keep_repeated_targets))
        log = []
    else:
        model, log = fit(model, data, args, out, extra_loss=expert_losses(args) if args.aux_weight else None)
    if not is_main_process():  # under torchrun, rank 0 tests and writes
        return
    valid_ranks = None
    if args.gate_fit != "train":
        valid_ranks = cross_fit_gate(model, data, args)
    model.eval()
    with torch.no_grad():
        test_in, _ = split_sequences(data["seqs"], "test")
        gate = model.gate_per_bucket(test_in.to(device)).cpu()  # (B, K)
    print("mean gate probability per target bucket (1 = warmest):")
    print("bucket " + " ".join(f"{k:>6}" for k in args.experts))
    for b, row in enumerate(gate.tolist(), start=1):
        print(f"{b:6d} " + " ".join(f"{v:6.3f}" for v in row))
    finish(model, model_args, data, args, 3, log, out,
           extra={"gate_per_bucket": {b: dict(zip(args.experts, row)) for b, row in enumerate(gate.tolist(), start=1)},
                  "init": {k: paths[k] for k in ckpts}}, valid_ranks=valid_ranks)


def expert_losses(args):
    """DEVIATION (--aux-weight w, beyond the paper): phase 3's extra term w * sum_k L_REC(o_k),
    each expert's own loss on the batch beside the loss of Eq. (11)'s mixture, so that an expert
    the gate turns down still learns to rank on its own. The text expert is left out: it has no
    representation to keep, only its scale, which is fit with the gate."""
    def term(model, seq, pos, neg):
        mask = (seq != 0) & (pos != 0)  # trainer.fit's real positions
        losses = {k: rec_loss(e, seq, pos, neg, mask, args.loss, args.ce_chunk) for k, e in model.experts.items()
                  if k != "text"}
        return args.aux_weight * sum(losses.values()), {f"{k}-{args.loss}": v.detach() for k, v in losses.items()}
    return term


def gate_params(model):
    """What --gate-fit fits: the gate, the --bucket-bias offsets and the text expert's scale (its only parameter)."""
    return [*model.gate.parameters(), *([model.bias] if model.bias is not None else []),
            *(model.experts["text"].parameters() if "text" in model.experts else [])]


def cross_fit_gate(model, data, args):
    """Fit the gate on the validation users (fit_gate), and score validation honestly: the
    users are cut into --gate-fit-folds random folds, each ranked by a gate fit on the other
    folds from the same start. Returns those cross-fitted validation ranks (U,); the model
    keeps the gate fit on every validation user."""
    start = [w.detach().clone() for w in gate_params(model)]
    n_users = len(data["seqs"])
    folds = torch.randperm(n_users, generator=torch.Generator().manual_seed(args.seed)).chunk(args.gate_fit_folds)
    ranks = torch.empty(n_users, dtype=torch.long)
    for i, fold in enumerate(folds):
        fit_gate(model, data, args, users=torch.cat([f for j, f in enumerate(folds) if j != i]))
        ranks[fold] = user_ranks(model, data, "valid", args.eval_batch_size, args.keep_repeated_targets, users=fold)
        with torch.no_grad():
            for w, w0 in zip(gate_params(model), start):
                w.copy_(w0)
    fit_gate(model, data, args)
    return ranks


def fit_gate(model, data, args, users=None):
    """DEVIATION (--gate-fit valid, valid-only): fit the gate of Eq. (11) alone on the validation split.

    Trained with the experts on the training data (Alg. 1), the gate learns which expert fits
    the *training* targets best, and a phase-1 ID expert trained to convergence has all but
    memorised them (Pantry: training BCE 0.12, the text expert's 0.69), so the gate switches the
    text experts off even where they rank held-out targets better. Here the experts are frozen
    and the gate's parameters are fit, from where training (or, valid-only, the gate's
    initialisation) left them, by Adam on the run's L_REC for each user's validation target: BCE
    against `negatives` items drawn uniformly outside the user's earlier items each pass (--loss
    bce), or the softmax over all items with those items masked (--loss ce). A target that
    repeats an earlier item is skipped (it is a miss whatever the gate does). The test split is
    never seen; validation also picked the experts' epoch (cross_fit_gate gives the metrics
    a held-out validation score). users: the validation rows to fit on (default: all);
    --gate-fit-lr, --gate-fit-batch-size, --gate-fit-negatives set Adam's step, the users per
    step and the BCE negatives."""
    model.eval()
    for w in model.parameters():
        w.requires_grad_(False)
    params = gate_params(model)
    for w in params:
        w.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=args.gate_fit_lr)
    batch_size, negatives = args.gate_fit_batch_size, args.gate_fit_negatives
    device = next(model.parameters()).device
    inputs, targets = split_sequences(data["seqs"], "valid")
    history = history_before_target(data["seqs"], "valid")
    if users is not None:
        inputs, targets, history = inputs[users], targets[users], history[users]
    keep = ~(history == targets[:, None]).any(1)
    inputs, targets, history = inputs[keep], targets[keep], history[keep]
    with torch.no_grad():
        tables = model.item_tables()  # K x (N+1, d), frozen (the text expert's scale sits in its states)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.gate_fit_epochs + 1):
        neg = sample_negatives(torch.cat([history, targets[:, None]], 1), data["n_items"], (len(targets), negatives), gen)
        total = 0.0
        for idx in torch.randperm(len(inputs), generator=gen).split(batch_size):
            seq, tgt, hist = inputs[idx].to(device), targets[idx].to(device), history[idx].to(device)
            with torch.set_grad_enabled("text" in model.experts):  # the text expert's scale is fit too
                h = [h_k[:, -1] for h_k in model.states(seq)]  # K x (b, d)
            states = [h_k[:, None] for h_k in h]  # K x (b, 1, d)
            if args.loss == "ce":
                o = [h_k @ t.T for h_k, t in zip(h, tables)]  # K x (b, N+1): o_k, fixed
                phi = model.fuse(o, states, model.bucket.expand(len(seq), -1), per_bucket=True)
                phi = phi.scatter(1, hist, -torch.inf)  # earlier items and padding out of the softmax
                phi[:, 0] = -torch.inf
                loss = F.cross_entropy(phi, tgt)
            else:
                items = torch.cat([tgt[:, None], neg[idx].to(device)], 1)  # (b, 1 + negatives): target first
                o = [(h_k[:, None] * t[items]).sum(-1) for h_k, t in zip(h, tables)]  # K x (b, 1 + negatives)
                phi = model.fuse(o, states, model.bucket[items])
                loss = bce_loss(phi[:, :1].expand(-1, negatives), phi[:, 1:], torch.ones_like(phi[:, 1:], dtype=torch.bool))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if users is None and (not args.quiet or epoch == args.gate_fit_epochs):  # the fit kept, not the folds'
            print(f"gate fit on validation, pass {epoch}: {args.loss} {total / len(inputs):.4f}", flush=True)
    for w in model.parameters():
        w.requires_grad_(True)


if __name__ == "__main__":
    main()
