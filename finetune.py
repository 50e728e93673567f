"""Phase 3 of PAD: triple experts with frequency-aware gating, fine-tuned on L_REC
(Sec. 3.3, Eq. 8-11, Alg. 1 lines 15-23), with the ablations of Sec. 4.7 (Fig. 5b).

    python finetune.py --data ml-100k [--gate freq] [--experts id,align,llm] [--align PHASE2.pt]

Reads the phase-1 (--pretrain) and phase-2 (--align) checkpoints and writes
runs/NAME/finetune_BACKBONE_GATE_EXPERTS_KERNEL_ANCHOR_gammaG_seedS.pt (the last three name the
phase-2 run it started from; absent without the alignment expert) with a metrics .json,
which also holds the mean gate probability of each expert per frequency bucket on the test users.
"""
import argparse
from functools import partial

import torch

from dataset import split_sequences
from evaluate import protocol
from gate_fit import ADJUST_RULES, cross_fit_gate
from models import ALL_EXPERTS, BACKBONES, EXPERTS, GATE_INITS, GATES, MIXES, build_model
from runs import GATE_FITS, TEXT_FLAGS, adjust_tag, model_from_checkpoint, phase3_inputs, reuse_finished, run_path, text_of
from trainer import (K, add_text_args, add_training_args, finish, fit, is_main_process, parse_args, parser, rec_loss,
                     setup)


def parse_experts(text):
    experts = [e for e in text.split(",") if e]
    if not experts or any(e not in ALL_EXPERTS for e in experts) or len(set(experts)) != len(experts):
        raise argparse.ArgumentTypeError(f"--experts {text!r}: a comma-separated subset of {','.join(ALL_EXPERTS)}, "
                                         f"e.g. id,align,llm")
    return [e for e in ALL_EXPERTS if e in experts]  # canonical order id, align, llm, text


def flags():
    p, g = parser(__doc__, "finetune", "phase 3: Eq. (8)-(11), Alg. 1 lines 15-23")
    e, beyond = g["equation"], g["beyond"]
    e.add_argument("--experts", type=parse_experts, default=list(EXPERTS),
                   help="experts of Eq. (8)-(10) kept, of id,align,llm (paper: all) and text (beyond)")
    e.add_argument("--gate", default="freq", choices=GATES,
                   help="freq: Eq. (11) (paper); bucket: authors' release; none: one weight per expert")
    e.add_argument("--backbone", default="sasrec", choices=BACKBONES, help="backbone of the phase-1/2 runs")
    e.add_argument("--pretrain", default=None, help="phase-1 checkpoint (ID expert); default: this seed's")
    e.add_argument("--align", default=None, help="phase-2 checkpoint (alignment expert); default: align.py's defaults")
    add_training_args(p, g)
    add_text_args(p, g, inherit=True)
    g["authors"].add_argument("--gate-init", default="uniform", choices=GATE_INITS,
                              help="the gate's start; authors' release: ramp over the buckets")
    g["authors"].add_argument("--gate-weight-decay", type=float, default=None,
                              help="the gate's weight decay (default --weight-decay); authors' release: 0.01")
    beyond.add_argument("--llm-init", default=None, help="a baselines.py --method morec run seeding the LLM expert, "
                        "or 'morec': this seed's")
    beyond.add_argument("--gate-fit", default="train", choices=tuple(GATE_FITS),
                        help="train: Alg. 1; valid: then the gate alone refit on validation; valid-only: only that")
    beyond.add_argument("--gate-fit-epochs", type=int, default=5, help="--gate-fit: passes over the validation users")
    beyond.add_argument("--gate-fit-lr", type=float, default=1e-2, help="--gate-fit: Adam's learning rate")
    beyond.add_argument("--gate-fit-batch-size", type=int, default=512, help="--gate-fit: validation users per step")
    beyond.add_argument("--gate-fit-negatives", type=int, default=16, help="--gate-fit, bce: negatives per target")
    beyond.add_argument("--gate-fit-folds", type=int, default=2,
                        help="--gate-fit: folds of users of the cross-fitted validation score")
    beyond.add_argument("--expert-lr", type=float, default=None, help="the experts' learning rate (default --lr)")
    beyond.add_argument("--aux-weight", type=float, default=0.0, help="weight of each expert's own L_REC")
    beyond.add_argument("--bucket-bias", action="store_true", help="one learned offset per bucket added to Phi")
    beyond.add_argument("--user-bias", action="store_true",
                        help="an offset per bucket added to Phi that moves with the user: linear in the first expert's state")
    beyond.add_argument("--bucket-temp", action="store_true", help="one learned temperature per bucket multiplying Phi")
    beyond.add_argument("--mix", default="logit", choices=MIXES,
                        help="logit: Eq. (11), the gate mixes the experts' logits; prob: their softmax distributions "
                             "over all items (models.PAD.mix_probabilities; needs --loss ce)")
    beyond.add_argument("--logit-adjust", type=parse_adjust, default=0, metavar="TAU|valid|valid-1se|valid-cold",
                        help="rank by Phi - TAU * log(1 + training count) (0: off); valid: the TAU of gate_fit.ADJUST_TAUS "
                             "best on validation, valid-1se: the largest within one standard error of it, valid-cold: the "
                             "smallest whose cold HR@10 reaches text-kNN's (cross-fitted; each needs --gate-fit valid or "
                             "valid-only)")
    args = parse_args(p, "finetune")
    if args.llm_init and "llm" not in args.experts:
        raise SystemExit(f"--llm-init {args.llm_init}: seeds the LLM expert, which --experts {','.join(args.experts)} leaves out")
    if args.gate_fit == "valid-only" and "llm" in args.experts and not args.llm_init:
        raise SystemExit("--gate-fit valid-only trains no expert, so the LLM expert would stay random: pass --llm-init "
                         "MOREC.pt (a baselines.py --method morec run), or leave llm out of --experts")
    if args.mix == "prob" and (args.loss != "ce" or args.ce_chunk):
        raise SystemExit("--mix prob mixes distributions over all items: it needs --loss ce without --ce-chunk")
    if args.logit_adjust in ADJUST_RULES and args.gate_fit == "train":
        raise SystemExit(f"--logit-adjust {args.logit_adjust} chooses tau in the gate's cross-fit on validation: add "
                         f"--gate-fit valid (or valid-only), or give tau as a number")
    if args.gate_fit != "train" and args.gate_fit_folds < 2:
        raise SystemExit(f"--gate-fit-folds {args.gate_fit_folds}: the cross-fitted validation score needs at least 2 folds")
    return args


def parse_adjust(text):
    """--logit-adjust: a rule of gate_fit.ADJUST_RULES or a tau >= 0."""
    if text in ADJUST_RULES:
        return text
    try:
        tau = float(text)
    except ValueError:
        tau = -1.0
    if not tau >= 0:
        raise argparse.ArgumentTypeError(f"--logit-adjust {text!r}: a number >= 0 (0: off), {' or '.join(map(repr, ADJUST_RULES))}")
    return tau


def phase3_loss(model, seq, pos, neg, mask, loss="bce", ce_chunk=0, aux_weight=0.0):
    """Alg. 1 lines 19-21: L_REC of Eq. (11)'s mixture Phi = sum_k g_k o_k (the MMD removed).
    DEVIATION (--aux-weight w, beyond the paper): plus w * sum_k L_REC(o_k), each expert's own
    loss beside the mixture's, so that an expert the gate turns down still learns to rank on its
    own; the text expert is left out (it has no representation to keep, only its scale, which is
    fit with the gate). -> (loss, {name: value to log})"""
    l_rec = rec_loss(model, seq, pos, neg, mask, loss, ce_chunk)  # L_REC of Phi
    if not aux_weight:
        return l_rec, {loss: l_rec.detach()}
    own = {k: rec_loss(e, seq, pos, neg, mask, loss, ce_chunk) for k, e in model.experts.items() if k != "text"}
    return l_rec + aux_weight * sum(own.values()), {loss: l_rec.detach(), **{f"{k}-{loss}": v.detach() for k, v in own.items()}}


def pad_config(args, ckpts):
    """The phase-3 model's model_args: phase 1's encoder, the experts and gate of the flags, the
    text flags both text experts share."""
    model_args = {**ckpts["id"]["model_args"], "kind": "pad", "experts": list(args.experts), "gate": args.gate,
                  "gate_init": args.gate_init, "bucket_bias": args.bucket_bias, "user_bias": args.user_bias,
                  "mix": args.mix, "bucket_temp": args.bucket_temp, "logit_adjust": args.logit_adjust}
    model_args["fuse_dropout"] = ckpts["align"]["model_args"]["fuse_dropout"] if "align" in ckpts else 0.0
    model_args.update({key: getattr(args, key) for _, key, _ in TEXT_FLAGS})
    model_args.pop("expert")
    return model_args


def gate_shares(model, data, experts):
    """The mean gate probability of each expert per frequency bucket of the test targets,
    printed and returned as {bucket: {expert: share}}."""
    model.eval()
    with torch.no_grad():
        test_in, _ = split_sequences(data["seqs"], "test")
        gate = model.gate_per_bucket(test_in.to(next(model.parameters()).device)).cpu()  # (B, K)
    print("mean gate probability per target bucket (1 = warmest):")
    print("bucket " + " ".join(f"{k:>6}" for k in experts))
    for b, row in enumerate(gate.tolist(), start=1):
        print(f"{b:6d} " + " ".join(f"{v:6.3f}" for v in row))
    return {b: dict(zip(experts, row)) for b, row in enumerate(gate.tolist(), start=1)}


def main():
    args = flags()
    data, device = setup(args)
    paths, ckpts, align = phase3_inputs(args, data)  # the runs the experts start from, checked
    gate = (args.gate + "-bias" * args.bucket_bias + "-ubias" * args.user_bias + "-temp" * args.bucket_temp
            + "-prob" * (args.mix == "prob") + adjust_tag(args.logit_adjust) + GATE_FITS[args.gate_fit])  # e.g. freq-validfit
    out = args.out or run_path(data["name"], "finetune", backbone=args.backbone, gate=gate, experts=args.experts,
                               align=align, llm_init=bool(args.llm_init), seed=args.seed, loss=args.loss,
                               preset=args.preset, text=text_of(args))
    if reuse_finished(out, data, args):
        return
    model_args = pad_config(args, ckpts)

    # --- Alg. 1 line 15, Eq. (8)-(10): ID expert from phase 1, alignment expert from phase 2, new LLM expert ---
    model = build_model(model_args, data)
    for kind, phase in (("id", 1), ("align", 2), ("llm", "baseline morec")):
        if kind in args.experts and kind in ckpts:
            seeded = model_from_checkpoint(ckpts[kind], data, paths[kind], phase=phase, backbone=args.backbone)
            model.experts[kind].load_state_dict(seeded.state_dict())
    model.to(device)

    # --- Alg. 1 lines 16-22, Eq. (11): Phi = sum_k g_k(b(i), h_k) o_k, trained on L_REC of Phi ---
    print(f"phase 3: experts {','.join(args.experts)}, gate {args.gate}, from {', '.join(paths.values())}")
    log = []
    if args.gate_fit != "valid-only":  # DEVIATION (valid-only, beyond the paper): the experts as phases 1-2 left them
        model, log = fit(model, data, args, out, partial(phase3_loss, loss=args.loss, ce_chunk=args.ce_chunk,
                                                         aux_weight=args.aux_weight))
    else:
        print(protocol(data, K, args.keep_repeated_targets))
    if not is_main_process():  # under torchrun, rank 0 tests and writes
        return
    # DEVIATION (--gate-fit valid, valid-only; beyond the paper): the gate refit on validation (gate_fit.py)
    valid_ranks, curves = cross_fit_gate(model, data, args) if args.gate_fit != "train" else (None, None)
    adjust = {} if model.adjust_tau is None else {"logit_adjust_tau": model.adjust_tau.item(),
                                                   **{f"logit_adjust_valid_{m}": c for m, c in (curves or {}).items()}}
    finish(model, model_args, data, args, 3, log, out, valid_ranks=valid_ranks,
           extra={"gate_per_bucket": gate_shares(model, data, args.experts), "init": paths, **adjust})


if __name__ == "__main__":
    main()
