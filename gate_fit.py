"""Beyond the paper: finetune.py --gate-fit valid / valid-only, the gate of Eq. (11) fit on the
validation targets with the experts frozen, and a cross-fitted validation score for it.

Trained with the experts on the training data (Alg. 1), the gate learns which expert fits the
*training* targets best, and a phase-1 ID expert trained to convergence has all but memorised
them (Pantry: training BCE 0.12, the text expert's 0.69), so the gate switches the text experts
off even where they rank held-out targets better. Here the gate alone learns where the experts
are scored on items none of them trained on. The test split is never read.

    valid_ranks, _ = cross_fit_gate(model, data, args)   # the model keeps the gate fit on all users
"""
import torch

from dataset import bucket_groups, history_before_target, split_sequences
from evaluate import mask_seen, summarise_ranks, user_ranks
from models import TextKNN
from trainer import bce_loss, ce_loss, sample_negatives


def gate_params(model):
    """What --gate-fit fits: the gate, the --bucket-bias offsets, the --user-bias offsets, the
    --bucket-temp temperatures, --mix prob's sharpness per expert and the text expert's scale
    (its only parameter)."""
    return [*model.gate.parameters(), *([model.bias] if model.bias is not None else []),
            *(model.user_bias.parameters() if model.user_bias is not None else []),
            *([model.log_temp] if model.log_temp is not None else []),
            *([model.log_sharpness] if model.log_sharpness is not None else []),
            *(model.experts["text"].parameters() if "text" in model.experts else [])]


# --logit-adjust valid: the taus tried (nDCG@10 on validation peaked at 0.1-0.2 on ml-100k,
# Pantry and Beauty; the grid runs on to 1, the balanced-softmax correction)
ADJUST_TAUS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
ADJUST_RULES = ("valid", "valid-1se", "valid-cold")  # --logit-adjust values that choose tau (choose_tau)


def user_ndcg(ranks, k=10):
    """Each user's nDCG@k from 0-based ranks (..., U)."""
    return torch.where(ranks < k, 1 / torch.log2(ranks.double() + 2), 0.0)


def choose_tau(ndcg, rule, cold_hit=None, floor=None):
    """The index into ADJUST_TAUS that `rule` picks from each user's nDCG@10 under each tau,
    (T, U). valid: the highest mean (ties: the smallest tau). valid-1se: the largest tau whose
    mean is within one standard error of the best's, the error of the paired difference over
    the users (the one-standard-error rule, leaning to the stronger correction: cold items rank
    higher at a cost the users cannot tell from noise). valid-cold: the smallest tau whose cold
    HR@10 reaches `floor`, the text-kNN floor's on the same cold users (cold_hit (T, C): their
    hits in the top 10); the tau with the most cold hits when none reaches it, valid's when there
    are no cold users."""
    mean = ndcg.mean(-1)
    best = int(mean.argmax())  # the first of equal maxima: the smallest tau
    if rule == "valid" or (rule == "valid-cold" and cold_hit.shape[-1] == 0):
        return best
    if rule == "valid-cold":
        cold = cold_hit.double().mean(-1)  # (T,)
        reached = (cold >= floor).nonzero()
        return int(reached.min()) if len(reached) else int(cold.argmax())
    diff = ndcg - ndcg[best]  # (T, U), paired per user
    se = diff.std(-1) / diff.shape[-1] ** 0.5
    return int((mean - mean[best] >= -se).nonzero().max())


def cold_targets(data, split="valid"):
    """(U,) bool: the users whose `split` target is a cold item (dataset.bucket_groups)."""
    _, targets = split_sequences(data["seqs"], split)
    cold = torch.tensor(list(bucket_groups(data["n_buckets"])["cold"]))
    return torch.isin(data["item_bucket"][targets], cold)


def cross_fit_gate(model, data, args):
    """Fit the gate on the validation users (fit_gate), and score validation honestly: the
    users are cut into --gate-fit-folds random folds, each ranked by a gate fit on the other
    folds from the same start. The model keeps the gate fit on every validation user.

    --logit-adjust valid / valid-1se / valid-cold (models.PAD.logit_adjust): each fold is ranked
    under the tau of ADJUST_TAUS that the rule (choose_tau) picks from the other folds' users,
    under the gate fit on them, so the choice of tau is cross-fitted too; the model keeps the tau
    the rule picks from every user's cross-fitted rank. valid-cold's floor is text-kNN's
    (models.TextKNN, nothing fit) cold HR@10 on the same users. Returns (the cross-fitted
    validation ranks (U,), None or, per metric, {tau: its cross-fitted validation value}:
    nDCG@10 and cold HR@10, "text-kNN cold HR@10": the floor's, one number, and "fold taus":
    the tau each fold was ranked under, in fold order)."""
    start = [w.detach().clone() for w in gate_params(model)]
    n_users = len(data["seqs"])
    folds = torch.randperm(n_users, generator=torch.Generator().manual_seed(args.seed)).chunk(args.gate_fit_folds)
    adjust = getattr(args, "logit_adjust", 0) in ADJUST_RULES
    if adjust:
        model.adjust_tau.zero_()
        offsets = -torch.tensor(ADJUST_TAUS)[:, None] * model.log_freq  # (T, N+1)
        per_tau = torch.empty(len(ADJUST_TAUS), n_users, dtype=torch.long)  # cross-fitted, under each tau
        cold = cold_targets(data, "valid")
        text_hit = user_ranks(TextKNN(data["text_emb"]).to(model.log_freq.device), data, "valid",
                              args.eval_batch_size, args.keep_repeated_targets) < 10  # (U,), the floor's

        def choose(r, users):  # the rule's tau index from the ranks r (T, len(users)) of `users`
            c = cold[users]
            return choose_tau(user_ndcg(r), args.logit_adjust, r[:, c] < 10, text_hit[users][c].double().mean())
    ranks, fold_taus = torch.empty(n_users, dtype=torch.long), []
    for i, fold in enumerate(folds):
        fit_users = torch.cat([f for j, f in enumerate(folds) if j != i])
        fit_gate(model, data, args, users=fit_users)
        if adjust:  # every user under every tau: the fit users choose tau, the fold is ranked with it
            r = user_ranks(model, data, "valid", args.eval_batch_size, args.keep_repeated_targets, offsets=offsets)
            per_tau[:, fold] = r[:, fold]
            t = choose(r[:, fit_users], fit_users)
            ranks[fold], fold_taus = r[t, fold], fold_taus + [ADJUST_TAUS[t]]
        else:
            ranks[fold] = user_ranks(model, data, "valid", args.eval_batch_size, args.keep_repeated_targets, users=fold)
        with torch.no_grad():
            for w, w0 in zip(gate_params(model), start):
                w.copy_(w0)
    fit_gate(model, data, args)
    if not adjust:
        return ranks, None
    ndcg = user_ndcg(per_tau)  # (T, U)
    model.adjust_tau.fill_(ADJUST_TAUS[choose(per_tau, torch.arange(n_users))])
    cold_hr = [summarise_ranks(r, data, "valid")["groups"]["cold"]["HR@10"] for r in per_tau]  # in %
    curves = {"nDCG@10": dict(zip(ADJUST_TAUS, (100 * ndcg.mean(-1)).tolist())), "cold HR@10": dict(zip(ADJUST_TAUS, cold_hr)),
              "text-kNN cold HR@10": 100 * text_hit[cold].double().mean().item(), "fold taus": fold_taus}
    print(f"--logit-adjust {args.logit_adjust}: tau {model.adjust_tau.item():g}; cross-fitted validation "
          "nDCG@10 / cold HR@10 per tau " + " ".join(f"{t:g}:{v:.2f}/{curves['cold HR@10'][t]:.2f}"
                                                      for t, v in curves["nDCG@10"].items())
          + f"; text-kNN's cold HR@10 {curves['text-kNN cold HR@10']:.2f}; the folds' tau "
          + " ".join(f"{t:g}" for t in fold_taus), flush=True)
    return ranks, curves


def fit_gate(model, data, args, users=None):
    """DEVIATION (--gate-fit valid, valid-only): fit the gate of Eq. (11) alone on the validation
    split, the experts frozen, from where training (valid-only: the gate's initialisation) left
    it, by Adam on the run's L_REC of each user's validation target: BCE against
    --gate-fit-negatives items drawn outside the user's earlier items each pass (--loss bce), or
    the softmax over all items with those items masked (--loss ce: trainer.ce_loss after
    evaluate.mask_seen, the ranking's mask). A target that repeats an earlier item is skipped
    (a miss whatever the gate does). users: the validation rows to fit on (default: all);
    --gate-fit-lr and --gate-fit-batch-size set Adam's step and the users per step."""
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
    fitted = {id(w) for w in params}
    frozen = [not any(id(w) in fitted for w in e.parameters()) for e in model.experts.values()]
    with torch.no_grad():
        tables = model.item_tables()  # K x (N+1, d), frozen (the text expert's scale sits in its states)
        # the frozen experts' states after each user's window, computed once: a user's state does not
        # depend on the other users of its batch (the same bits), and every pass reads them
        last = [torch.cat([e(inputs[i:i + batch_size].to(device))[:, -1] for i in range(0, len(inputs), batch_size)])
                if f else None for e, f in zip(model.experts.values(), frozen)]  # K x (U, d) or None
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.gate_fit_epochs + 1):
        neg = sample_negatives(torch.cat([history, targets[:, None]], 1), data["n_items"], (len(targets), negatives), gen)
        total = 0.0
        for idx in torch.randperm(len(inputs), generator=gen).split(batch_size):
            seq, tgt, hist = inputs[idx].to(device), targets[idx].to(device), history[idx].to(device)
            # the text expert's scale is fit too: its states are recomputed, with their gradient
            h = [s[idx.to(device)] if s is not None else e(seq)[:, -1]
                 for s, e in zip(last, model.experts.values())]  # K x (b, d)
            states = [h_k[:, None] for h_k in h]  # K x (b, 1, d)
            if args.loss == "ce":
                o = [h_k @ t.T for h_k, t in zip(h, tables)]  # K x (b, N+1): o_k, fixed
                phi = model.fuse(o, states, model.bucket.expand(len(seq), -1), per_bucket=True)
                phi = mask_seen(phi, hist)  # earlier items and padding out of the softmax
                loss = ce_loss(phi[:, None], tgt[:, None], torch.ones_like(tgt[:, None], dtype=torch.bool))
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
