"""Direct preference optimisation (Tulu 3 / SmolTulu stage 2), and a Bradley-Terry reward model.

    python train_dpo.py                     # CPU demo: DPO from runs/sft_demo/final on the synthetic pairs
    torchrun --nproc_per_node=4 train_dpo.py --config=configs/dpo_smoltulu_1130.json \\
        --model=PATH/SmolTulu-SFT --data='PATH/llama-3.1-tulu-3-8b-preference-mixture/data/*.parquet'
    torchrun --nproc_per_node=4 train_dpo.py --config=configs/rm_smoltulu_1130.json --model=... --data=...

(The GPU count must divide the preset's total_batch_size / batch_size: 12 pairs for DPO-1130, 4 for the RM.)

Without --config the demo preset (configs/dpo_demo.json) is the base, and --data is refused (real data needs a
preset of its own); any --key=value overrides it.

DPO: every micro-batch is one forward over [chosen; rejected] (2B rows, right-padded), and the fused kernel
(kernels.fused_linear_dpo_loss) applies the LM head, takes the response log-probs and the loss without ever
materialising [tokens, vocab] logits. --loss_type=dpo|dpo_norm|simpo|ipo (formulas: nanotulu_kernels/reference.py);
the default is Tulu 3's dpo_norm with beta 5. The reference log-probs are computed once, before training, with the
frozen initial model and cached on disk (see reference_logps), so no reference model sits in memory during
training; --reference_in_memory keeps a live frozen copy instead and gives the same losses up to float rounding
(the cached log-probs come from batches of ref_batch_size pairs, padded otherwise than the training batches).
simpo has no reference, and runs no reference pass.

Reward model (--objective=reward_model): the same backbone plus a scalar head (Linear H -> 1, no bias) read at
the last real token of each sequence, trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).
Saved format, for train_rlvr.py's PPO value model:
    run_dir/final/                          the backbone in HF layout (config.json, model.safetensors, tokenizer)
    run_dir/final/value_head.safetensors    {'score.weight': fp32 [1, hidden_size]}
    value(t) = hidden(t) @ score.weight.T, hidden = Transformer(..., return_hidden=True); reward = value at the
    last real token.

Only the final assistant turn is trained. Pairs longer than --max_seq_len are cut from the left of the prompt
(--truncation=left, the default) or each side at its end (--truncation=right, as Tulu 3's DPO and the DPO paper
presets), a pair left without a response token on a side being dropped; or they are dropped (--truncation=drop,
the reward-model preset's choice). The counts are printed at start-up.
"""
import hashlib
import json
import math
import os
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import common
import data
import nanotulu_kernels as kernels
from model import CheckpointError, Transformer

DEMO_MODEL = "runs/sft_demo/final"
IGNORE = data.IGNORE_INDEX


@dataclass
class DPOConfig(common.TrainConfig):
    run_dir: str = "runs/dpo"
    objective: str = "dpo"          # dpo | reward_model
    batch_size: int = 1             # pairs per device per micro-batch (a forward holds 2x rows: chosen, rejected)
    eval_data: str = ""             # held-out pairs ('' = eval_split of data; the demo has its own split)
    eval_split: float = 0.0         # fraction of data held out (seeded) when eval_data is empty
    template: str = ""              # tulu | chatml ('' = the one the model was saved with, tulu when none)
    max_seq_len: int = 2048
    truncation: str = "left"        # pairs over max_seq_len: left = cut the prompt from the left | right = cut each
                                    # side's end (Tulu 3) | drop
    loss_type: str = "dpo_norm"     # dpo | dpo_norm | simpo | ipo
    beta: float = 5.0
    label_smoothing: float = 0.0    # conservative DPO (dpo / dpo_norm)
    simpo_gamma: float = 0.5
    reference_in_memory: bool = False  # keep a frozen reference model instead of the cached log-probs
    ref_batch_size: int = 8         # pairs per forward of the reference pass
    skip_bad_rows: bool = False
    cache_dir: str = "runs/cache"   # tokenization and reference log-prob caches, shared by runs and ranks
    demo_seed: int = 0              # the synthetic demo pairs (when data is empty)


# -----------------------------------------------------------------------------
# Data: tokenized pairs (data.tokenize_preference) -> concatenated [chosen; rejected] batches

def load_pairs(cfg, tok, d):
    """Train and held-out pairs as data.tokenize_preference rows {'chosen': (ids, mask), 'rejected': ...}."""
    if cfg.data:
        train_rows = data.load_preference_rows(cfg.data, skip_bad=cfg.skip_bad_rows)
        if cfg.eval_data:
            common.refuse_unused(cfg, ["eval_split"], "not used with --eval_data (which holds the held-out pairs)")
            eval_rows = data.load_preference_rows(cfg.eval_data, skip_bad=cfg.skip_bad_rows)
        else:
            order = np.random.default_rng(cfg.seed).permutation(len(train_rows))
            n_eval = int(round(cfg.eval_split * len(train_rows)))
            eval_rows = [train_rows[i] for i in order[:n_eval]]
            train_rows = [train_rows[i] for i in sorted(order[n_eval:])]
    else:
        common.refuse_unused(cfg, ["eval_data", "eval_split"], "not used without --data (the demo pairs have their "
                             "own held-out split)")
        common.print0("data: the built-in synthetic demo pairs (no --data given)")
        demo = data.make_demo_data(cfg.demo_seed)
        train_rows = [normalize_demo(r) for r in demo["pref_train"]]
        eval_rows = [normalize_demo(r) for r in demo["pref_heldout"]]
    train = tokenize(cfg, tok, train_rows, "train", d)
    if not train:
        raise data.DataError(f"data={cfg.data or 'demo'}", f"none of its {len(train_rows)} training pairs fits "
                             f"max_seq_len={cfg.max_seq_len} (truncation={cfg.truncation}): nothing to train on")
    return train, (tokenize(cfg, tok, eval_rows, "held-out", d) if eval_rows else [])


def normalize_demo(row):
    """The demo pairs are Tulu-format full conversations; split them like data.load_preference_rows does."""
    return {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}


def tokenize(cfg, tok, rows, name, d):
    """The pairs, tokenized by rank 0 first (common.main_rank_first). (data.tokenize_preference warns of the pairs
    its truncation policy dropped or cut.)"""
    pairs = common.main_rank_first(lambda: data.tokenize_preference(
        rows, tok, cfg.template, cfg.max_seq_len, truncation=cfg.truncation, cache_dir=cfg.cache_dir or None,
        progress=d.is_main and cfg.progress, split=name))
    common.print0(f"{name} preference pairs: {len(pairs)} of {len(rows)} kept")
    return pairs


def collate_pairs(pairs, indices, pad_id):
    """Rows 0..B-1 chosen, B..2B-1 rejected, right-padded to the longest. labels are pre-shifted (labels[t] =
    ids[t+1]) and kept on the trained tokens, the final assistant turn (data.tokenize_preference); lengths [2B]."""
    seqs = [pairs[i]["chosen"] for i in indices] + [pairs[i]["rejected"] for i in indices]
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for j, (ids, mask) in enumerate(seqs):
        ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        trained = np.flatnonzero(mask)
        start, end = trained[0], trained[-1] + 1
        if start == 0:  # data.tokenize_preference keeps a prompt token; anything else is a bug upstream
            raise ValueError(f"collate_pairs: pair {indices[j % len(indices)]} has no prompt token before its response")
        input_ids[j, :len(ids)] = ids
        labels[j, start - 1:end - 1] = ids[start:end]
    lengths = torch.tensor([len(ids) for ids, _ in seqs])
    return {"input_ids": input_ids, "labels": labels, "lengths": lengths}


# -----------------------------------------------------------------------------
# Models: the policy is a plain Transformer; the reward model adds a scalar head

class RewardModel(nn.Module):
    """Backbone + score head at each sequence's last real token (right padding: position length - 1)."""

    def __init__(self, backbone):
        super().__init__()
        self.config = backbone.config
        self.backbone = backbone
        if backbone.lm_head is not None:  # unused by the reward; frozen so DDP does not wait for its grad
            backbone.lm_head.requires_grad_(False)
        H = backbone.config.hidden_size
        self.score = nn.Linear(H, 1, bias=False)
        # open-instruct / TRL initialise the head with std 1/sqrt(H+1): initial rewards near 0 for any H
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(H + 1))

    @property
    def layers(self):  # common.wrap_model shards per transformer block
        return self.backbone.layers

    def blank_copy(self):  # (common.save_final under FSDP)
        return RewardModel(self.backbone.blank_copy())

    def forward(self, input_ids, lengths):
        hidden = self.backbone(input_ids, return_hidden=True)
        last = hidden[torch.arange(len(lengths), device=hidden.device), lengths.to(hidden.device) - 1]
        return common.score_readout(last, self.score)

    def save_pretrained(self, path, tokenizer=None):
        self.backbone.save_pretrained(path, tokenizer=tokenizer)
        save_file({"score.weight": self.score.weight.detach().float().cpu().contiguous()},
                  os.path.join(path, common.VALUE_HEAD),
                  metadata={"format": "pt", "readout": "hidden @ score.weight.T"})


def build_model(cfg, d):
    policy = Transformer.from_pretrained(cfg.model, dtype=torch.float32, device="cpu")
    model = RewardModel(policy) if cfg.objective == "reward_model" else policy
    policy.gradient_checkpointing = cfg.gradient_checkpointing
    return model.to(d.device)


# -----------------------------------------------------------------------------
# Reference log-probs: one pass with the frozen initial model, cached on disk keyed by model + data + settings

def batch_logps(model, batch, device, precision="auto"):
    """Summed log-probs of each row's trained tokens [2B] (fp32), with the fused kernel."""
    with common.autocast(device, precision):  # the LM head too: the residual stream (hence hidden) is fp32
        hidden = model(batch["input_ids"].to(device), return_hidden=True)
        logps, _ = kernels.sequence_logprobs(hidden, model.output_weight, batch["labels"].to(device))
    return logps.float()


def fingerprint(weights, pairs, settings):
    """Any change to the weights, the tokenized pairs or the settings that move the numbers gives a new key."""
    h = hashlib.sha256(json.dumps({"weights": weights, **settings}, sort_keys=True).encode())
    for p in pairs:
        for ids, mask in (p["chosen"], p["rejected"]):
            h.update(np.asarray(ids, np.int32).tobytes() + b"|" + np.asarray(mask, np.uint8).tobytes() + b";")
    return h.hexdigest()[:24]


@torch.no_grad()
def reference_logps(model, weights, pairs, cfg, d, pad_id, name):
    """[N, 2] fp32 summed (chosen, rejected) reference log-probs of `model` (the policy before its first update, in
    its wrapper; `weights`: its weights_digest). Fixed chunks of ref_batch_size pairs are dealt round-robin to the
    ranks (so the numbers do not depend on the world size), an all-reduce gives every rank the whole table, and
    rank 0 writes it atomically to cache_dir, where later runs and resumed runs find it."""
    # "chunks": how pairs are grouped into padded forwards moves the numbers by rounding, so it is part of the key
    settings = {"ref_batch_size": cfg.ref_batch_size, "chunks": "by length", "device": d.device.type,
                "precision": cfg.precision, "fsdp": cfg.fsdp and d.is_distributed,
                "kernels": kernels.backend_for(torch.empty(0, device=d.device)),
                **({"compile": True} if cfg.compile else {})}  # (so the tables of uncompiled runs keep their key)
    path = os.path.join(cfg.cache_dir or os.path.join(cfg.run_dir, "cache"),
                        f"ref_logps-{fingerprint(weights, pairs, settings)}.safetensors")
    # all ranks or none take the cached table: another run finishing it between two ranks' checks would otherwise
    # leave the ranks that computed waiting in the all-reduce below for the one that did not
    found = torch.tensor([float(os.path.exists(path))], device=d.device)
    if common.all_reduce_sum(found).item() == d.world_size:
        common.print0(f"reference log-probs ({name}): cached in {path}")
        try:
            table = load_file(path)["logps"]
        except Exception as e:  # a disk that broke the file after its atomic write
            raise data.DataError(path, f"the cached reference log-probs cannot be read ({type(e).__name__}: {e}); "
                                 "delete the file to compute them again") from e
        if table.shape != (len(pairs), 2):
            raise data.DataError(path, f"holds a {list(table.shape)} table for {len(pairs)} pairs; delete the file "
                                 "to compute them again")
        return table
    table = torch.zeros(len(pairs), 2, dtype=torch.float32, device=d.device)
    # Chunks of pairs of similar length, longest first: a chunk pads its 2 x ref_batch_size rows to the longest,
    # which in dataset order is long however short the others are (sorted, the demo's pass computes 15-20% fewer
    # positions). Longest first shows an out-of-memory in the first forward, not the last.
    order = sorted(range(len(pairs)), key=lambda i: -max(len(pairs[i]["chosen"][0]), len(pairs[i]["rejected"][0])))
    chunks = [order[lo:lo + cfg.ref_batch_size] for lo in range(0, len(order), cfg.ref_batch_size)]
    model.eval()
    # every rank runs the same number of forwards (FSDP gathers weights in each); a rank out of chunks re-runs the
    # last (shortest) one and does not keep it
    rounds = math.ceil(len(chunks) / d.world_size)
    for r in tqdm(range(rounds), desc=f"reference log-probs ({name})", disable=not (d.is_main and cfg.progress)):
        j = r * d.world_size + d.rank
        idx = chunks[j] if j < len(chunks) else chunks[-1]
        logps = batch_logps(model, collate_pairs(pairs, idx, pad_id), d.device, cfg.precision).view(2, -1).T
        if j < len(chunks):
            table[idx] = logps
    common.all_reduce_sum(table)
    table = table.cpu()
    if d.is_main:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data.write_atomic(path, lambda tmp: save_file({"logps": table}, tmp))  # two runs may share the cache
        common.print0(f"reference log-probs ({name}): wrote {path}")
    common.barrier()
    return table


# -----------------------------------------------------------------------------
# One micro-batch: the loss and its statistics

# pair_loss's statistics, each a sum over pairs (accuracy: chosen reward > rejected; policy_accuracy: chosen mean
# response log-prob > rejected, as eval.py's pref_acc). One tensor carries them, so that micro-batches add up and one
# all-reduce sums them over ranks; PairStats(*tensor.tolist()) reads them back by name.
PairStats = namedtuple("PairStats", "loss rewards_chosen rewards_rejected accuracy policy_accuracy pairs")


def pair_loss(model, batch, ref, cfg):
    """-> (loss: mean over the B pairs, stats: the PairStats sums as one float64 tensor).
    ref: [B, 2] summed reference log-probs (DPO) or None (reward model, simpo)."""
    B = batch["input_ids"].shape[0] // 2
    if cfg.objective == "reward_model":
        with common.autocast(batch["input_ids"].device, cfg.precision):
            r = model(batch["input_ids"], batch["lengths"])
        loss = -F.logsigmoid(r[:B] - r[B:]).mean()  # Bradley-Terry
        chosen, rejected = r[:B].detach(), r[B:].detach()
        policy_acc = torch.zeros(())
    else:
        if ref is None:  # simpo: the loss reads no reference
            ref = torch.zeros(B, 2, device=batch["input_ids"].device)
        # the LM head inside autocast as well, as the reference pass (batch_logps) runs it: the hidden states
        # come out fp32 (the residual stream is), and outside autocast the head would be an fp32 GEMM
        with common.autocast(batch["input_ids"].device, cfg.precision):
            hidden = model(batch["input_ids"], return_hidden=True)
            out = kernels.fused_linear_dpo_loss(hidden, common.unwrap(model).output_weight, batch["labels"],
                                                ref[:, 0], ref[:, 1], loss_type=cfg.loss_type, beta=cfg.beta,
                                                label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma)
        loss, chosen, rejected = out.loss, out.chosen_rewards, out.rejected_rewards
        n = (batch["labels"] != IGNORE).sum(1).clamp(min=1)
        policy_acc = (out.chosen_logps.detach() / n[:B] > out.rejected_logps.detach() / n[B:]).sum()
    stats = PairStats(loss=loss.detach() * B, rewards_chosen=chosen.sum(), rewards_rejected=rejected.sum(),
                      accuracy=(chosen > rejected).sum(), policy_accuracy=policy_acc.to(chosen.device),
                      pairs=torch.tensor(float(B), device=chosen.device))
    return loss, torch.stack(stats).double()


def summarize(stats, objective="dpo"):
    """The per-pair means of a summed PairStats tensor, and the reward margin."""
    s = PairStats(*stats.tolist())
    n = max(s.pairs, 1.0)
    rc, rr = s.rewards_chosen / n, s.rewards_rejected / n
    out = {"loss": s.loss / n, "rewards_chosen": rc, "rewards_rejected": rr, "margins": rc - rr,
           "accuracy": s.accuracy / n}
    if objective == "dpo":
        out["policy_accuracy"] = s.policy_accuracy / n
    return out


class Reference:
    """The reference log-probs of a batch: rows of the cached table, or a live frozen copy of the initial model."""

    def __init__(self, table=None, model=None, precision="auto"):
        self.table, self.model, self.precision = table, model, precision

    @torch.no_grad()
    def __call__(self, indices, batch, device):
        if self.model is None:
            return None if self.table is None else self.table[indices].to(device)
        return batch_logps(self.model, batch, device, self.precision).view(2, -1).T


@torch.no_grad()
def evaluate(model, pairs, reference, cfg, pad_id, d):
    """Held-out loss, rewards and accuracies over all pairs (each rank takes every world_size-th pair)."""
    model.eval()
    totals = torch.zeros(len(PairStats._fields), dtype=torch.float64, device=d.device)
    mine = list(range(d.rank, len(pairs), d.world_size))
    # every rank runs the same number of forwards (FSDP gathers weights in each); a rank out of pairs runs a
    # throwaway batch
    for k in range(math.ceil(math.ceil(len(pairs) / d.world_size) / cfg.batch_size)):
        idx = mine[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        batch = {key: v.to(d.device) for key, v in collate_pairs(pairs, idx or [0], pad_id).items()}
        stats = pair_loss(model, batch, reference(idx or [0], batch, d.device), cfg)[1]
        if idx:
            totals += stats
    model.train()
    return summarize(common.all_reduce_sum(totals), cfg.objective)


# -----------------------------------------------------------------------------
# The loop

def main(argv=None):
    cfg = common.parse_trainer_config(DPOConfig, argv, "dpo_demo.json", "dpo_smoltulu_1130.json")
    if cfg.objective not in ("dpo", "reward_model"):
        raise common.ConfigError(f"objective={cfg.objective!r}: expected dpo or reward_model")
    if cfg.objective == "reward_model":
        common.refuse_unused(cfg, ["reference_in_memory"], "a reward model has no reference")
    elif cfg.loss_type == "simpo":
        common.refuse_unused(cfg, ["reference_in_memory"], "simpo's loss has no reference model")
    if cfg.objective == "reward_model" or cfg.loss_type != "simpo":
        common.refuse_if_given(cfg, "simpo_gamma", "only --objective=dpo with --loss_type=simpo uses it")
    data.check_template_name(cfg.template)
    if cfg.truncation not in data.TRUNCATIONS:
        raise common.ConfigError(f"truncation={cfg.truncation!r}: expected one of {', '.join(data.TRUNCATIONS)}")
    try:
        kernels.reference.check_preference_args(cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma)
    except ValueError as e:
        raise common.ConfigError(str(e)) from None
    if not cfg.model:
        raise common.ConfigError("--model=PATH is required (an HF-layout folder, e.g. the SFT run's final/)")
    common.check_folder(cfg, "model", " (the SFT demo's output: run `python train_sft.py` first)"
                        if cfg.model == DEMO_MODEL else "")
    d = common.setup_distributed(cfg.device)
    kernels.backend_on(d.device)
    cfg.precision = common.resolved_precision(cfg.precision, d.device)
    effective_batch = common.resolve_batch(cfg, d.world_size)
    common.seed_all(cfg.seed)
    common.prepare_run_dir(cfg, d)

    tok = data.Tokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    cfg.template = data.resolve_template(cfg.template, tok)
    tok.use_chat_template(cfg.template)  # final/ records the template the pairs were rendered with
    raw = build_model(cfg, d)
    data.check_vocab(tok, raw.config.vocab_size, cfg.tokenizer or cfg.model)
    weights = common.weights_digest(raw)  # before wrapping, which shards in place
    common.check_resume(cfg, start_weights=weights)  # a refused resume, before tokenizing and the reference pass
    train_pairs, eval_pairs = load_pairs(cfg, tok, d)
    common.check_resume(cfg, start_weights=weights, data_digest=train_pairs.digest)  # the rows, now known
    total_steps = common.total_steps_for(cfg, len(train_pairs), effective_batch)  # too few pairs: before the reference
    common.check_positions(max(len(p[k][0]) for p in train_pairs + eval_pairs for k in ("chosen", "rejected")), raw,
                           cfg.data or "demo data")
    has_reference = cfg.objective == "dpo" and cfg.loss_type != "simpo"
    live = has_reference and cfg.reference_in_memory
    # a sharded reference keeps fp32 weights and is wrapped as the policy is (below): FSDP2 casts each shard to bf16
    # once per all-gather, so there is no per-matmul cast to save
    sharded = cfg.fsdp and d.is_distributed
    frozen = common.frozen_copy(raw, "fp32" if sharded else cfg.precision, d.device) if live else None
    model = common.wrap_model(raw, d, fsdp=cfg.fsdp, compile=cfg.compile, precision=cfg.precision)
    # The reference is the initial policy computed the way the policy computes (FSDP2 under bf16 computes with
    # bf16 parameters, unlike autocast over fp32 ones), so that at step 0 every reward is 0: exactly with a live
    # reference, up to float rounding with the cached one (computed in other batches, so with other padding).
    if live:
        if sharded:  # sharded alike (never DDP: it has nothing to train), and compiled alike
            frozen = common.wrap_model(frozen, d, fsdp=True, compile=cfg.compile, precision=cfg.precision)
        elif cfg.compile:
            common.compile_blocks(frozen)
        reference = eval_reference = Reference(model=frozen, precision=cfg.precision)
    elif has_reference:  # the wrapped model before any update (FSDP2 wraps in place; DDP's wrapper adds nothing here)
        policy = common.unwrap(model)
        reference = Reference(reference_logps(policy, weights, train_pairs, cfg, d, tok.pad_id, "train"))
        eval_reference = Reference(reference_logps(policy, weights, eval_pairs, cfg, d, tok.pad_id, "held-out")) \
            if eval_pairs else None  # (no held-out pairs: no evaluation, and no reference pass for them)
    else:  # the reward model and simpo read no reference
        reference = eval_reference = Reference()
    raw.train()
    sampler = data.EpochSampler(len(train_pairs), seed=cfg.seed, rank=d.rank, world_size=d.world_size)
    optimizer = common.build_optimizer(model, cfg, d.device)

    step = common.maybe_resume(cfg, model, optimizer, sampler, start_weights=weights,
                               data_digest=train_pairs.digest)
    common.write_run_config(cfg)
    logger = common.MetricsLogger(cfg.run_dir, enabled=d.is_main, resume_step=step if cfg.resume else None)
    what = "reward model (Bradley-Terry)" if cfg.objective == "reward_model" else \
        f"{cfg.loss_type} beta={cfg.beta} reference=" + \
        ("none" if not has_reference else "in memory" if live else "cached")
    common.print0(f"{what}: {len(train_pairs)} train pairs, {len(eval_pairs)} held out; "
                  f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params; effective batch "
                  f"{effective_batch} pairs ({cfg.batch_size} x {cfg.grad_accum} accum x {d.world_size} ranks), "
                  f"lr {cfg.lr:.3g}, {total_steps} steps")

    def run_eval():
        if eval_pairs:
            metrics = evaluate(model, eval_pairs, eval_reference, cfg, tok.pad_id, d)
            logger.log({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
            common.print0(f"step {step}: held-out " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    if step == 0:
        run_eval()
    bar = common.progress_bar(total_steps, step, d.is_main and cfg.progress, cfg.objective)
    while step < total_steps:
        lr = common.lr_at(step, total_steps, cfg.lr, cfg.schedule, cfg.warmup_ratio, cfg.min_lr_ratio)
        common.set_lr(optimizer, lr)
        totals = torch.zeros(len(PairStats._fields), dtype=torch.float64, device=d.device)
        for i in range(cfg.grad_accum):
            idx = sampler.next_batch(cfg.batch_size)
            batch = {k: v.to(d.device) for k, v in collate_pairs(train_pairs, idx, tok.pad_id).items()}
            with common.grad_sync(model, i == cfg.grad_accum - 1):
                loss, stats = pair_loss(model, batch, reference(idx, batch, d.device), cfg)
                # every micro-batch holds batch_size pairs and DDP/FSDP average over ranks: / grad_accum makes the
                # update the mean over all pairs of the global batch
                (loss / cfg.grad_accum).backward()
            totals += stats
        grad_norm = common.clip_grad(model, cfg.grad_clip, step + 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        metrics = summarize(common.all_reduce_sum(totals), cfg.objective)
        if step % cfg.log_every == 0 or step == total_steps:
            logger.log({"step": step, **metrics, "lr": lr, "grad_norm": grad_norm,
                        "epoch": step * effective_batch / len(train_pairs)})
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}",
                        margin=f"{metrics['margins']:.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
            run_eval()
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total_steps):
            common.save_checkpoint(cfg.run_dir, step, model, optimizer, keep=cfg.keep_checkpoints,
                                   extra={"sampler": sampler.state_dict(), "config": common.config_dict(cfg),
                                          "start_weights": weights, "data_digest": train_pairs.digest})
    bar.close()
    path = common.save_final(cfg.run_dir, model, tok)
    common.print0(f"saved {path}" + (f" (+ {common.VALUE_HEAD})" if cfg.objective == "reward_model" else ""))
    common.teardown_distributed()
    return cfg


if __name__ == "__main__":
    common.run_script(main, data.DataError, CheckpointError, FileNotFoundError, kernels.BackendError,
                      resumable=True)
