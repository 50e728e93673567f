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

from dataset import DEFAULT_ALIGN, align_tag, run_path, split_sequences, text_of
from models import BACKBONES, EXPERTS, GATE_INITS, GATES, build_model, check_checkpoint, model_from_checkpoint, read_checkpoint
from trainer import (FLAG_DEFAULTS, TEXT_FLAGS, add_text_args, add_training_args, finish, fit, is_main_process,
                     match_text_args, parse_args, reuse_finished, setup)


def parse_experts(text):
    experts = [e for e in text.split(",") if e]
    if not experts or any(e not in EXPERTS for e in experts) or len(set(experts)) != len(experts):
        raise argparse.ArgumentTypeError(f"--experts {text!r}: a comma-separated subset of {','.join(EXPERTS)}, e.g. id,align,llm")
    return [e for e in EXPERTS if e in experts]  # canonical order id, align, llm


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    p.add_argument("--backbone", default="sasrec", choices=BACKBONES, help="backbone of the phase-1/2 checkpoints")
    p.add_argument("--pretrain", default=None, help="phase-1 checkpoint (ID expert); default runs/NAME/pretrain_BACKBONE_seedS.pt")
    p.add_argument("--align", default=None,
                   help="phase-2 checkpoint (alignment expert); default the align.py run with its default flags, "
                        "runs/NAME/align_BACKBONE_gaussian_rec_gamma0.1_seedS.pt")
    p.add_argument("--experts", type=parse_experts, default=list(EXPERTS), help="experts kept, of id,align,llm (Eq. 8-10); paper: all three")
    p.add_argument("--gate", default="freq", choices=GATES,
                   help="freq: Eq. (11) on bucket b(i) and expert state (paper); bucket: authors' release; none: one global weight per expert")
    p.add_argument("--gate-init", default="uniform", choices=GATE_INITS,
                   help="uniform, or the authors' release's ramp over the buckets (ID 1->0, LLM 0->1, alignment "
                        "about 1-2%%); paper: not given")
    p.add_argument("--gate-weight-decay", type=float, default=None,
                   help="AdamW weight decay of the gate's parameters; default --weight-decay (authors' release: 0.01)")
    p.add_argument("--llm-init", default=None,
                   help="a baselines.py --method morec run that seeds the LLM expert (as MAKE does; beyond the paper, "
                        "whose Alg. 1 line 15 loads the ID and alignment experts only); default: a new LLM expert")
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
    if args.llm_init and "llm" not in args.experts:
        raise SystemExit(f"--llm-init {args.llm_init}: seeds the LLM expert, which --experts {','.join(args.experts)} leaves out")
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
    out = args.out or run_path(name, "finetune", backbone=args.backbone, gate=args.gate, experts=args.experts,
                               align=tag, llm_init=bool(args.llm_init), seed=args.seed, **tags, text=text_of(args))
    if reuse_finished(out, data, args):
        return
    model_args = {**ckpts["id"]["model_args"], "kind": "pad", "experts": list(args.experts), "gate": args.gate,
                  "gate_init": args.gate_init}
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
    model, log = fit(model, data, args, out)
    if not is_main_process():  # under torchrun, rank 0 tests and writes
        return
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
                  "init": {k: paths[k] for k in ckpts}})


if __name__ == "__main__":
    main()
