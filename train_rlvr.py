"""Reinforcement learning with verifiable rewards (Tulu 3 / SmolTulu stage 3): GRPO and PPO.

    python train_rlvr.py                      # CPU demo: GRPO from runs/dpo_demo/final (else runs/sft_demo/final)
    torchrun --nproc_per_node=8 train_rlvr.py --config=configs/rlvr_smoltulu.json \\
        --model=PATH/SmolTulu-DPO --value_model=PATH/SmolTulu-RM/final \\
        --data='PATH/RLVR-GSM-MATH-IF-Mixed-Constraints/data/*.parquet'

Without --config the demo preset (configs/rlvr_demo.json) is the base, and --data is refused (real data needs a
preset of its own); any --key=value overrides it.

One step = one rollout + one update. Each rank takes its own prompts_per_step / world_size prompts, samples
num_samples responses to each with the KV-cache generator, and scores them: verification_reward when
verifiers.verify accepts the decoded response, else 0; a response that hit max_response_len without eos gets
non_stop_penalty instead (open-instruct replaces the score rather than adding to it). Then:

  --algo=grpo  advantage (r - mean_group) / (std_group + eps) per prompt (--advantage_norm=center: r - mean),
               the same for every token of a response; loss = clipped ratio + beta * k3 KL to the reference, per
               token. Groups whose rewards are all equal have no advantage and are counted and skipped, with no
               forward run on them (--skip_equal_groups=false keeps them, as Tulu 3.1's script did: their KL term
               still acts); the logged KL is over the responses trained on.
  --algo=ppo   a value model (from the reward model at --value_model, else a copy of the policy with a zero head);
               per-token reward -beta * (logp_old - logp_ref) with the score added at the last response token;
               GAE (gamma, lam), the value after that token 0; advantages whitened over the global batch; clipped
               policy and value losses. (Tulu 3's PPO script puts the score one position past the eos and trains a
               value there too, so its advantages take one more GAE step, through that value; we keep the
               textbook placement.)

A minibatch's loss is the mean over its response tokens (--loss_reduction=token), or over its responses, each
the mean over its own tokens (=sequence: the GRPO paper's form; open-instruct's Tulu 3 scripts take a token mean
per micro-batch of 2 responses per GPU, which weighs responses equally up to that pairing, so the paper presets
use sequence). The rollout is then reused for ppo_epochs passes of num_minibatches optimizer steps each (the
learning-rate schedule counts those optimizer steps, as open-instruct's does). All log-probs (old, reference,
current) come from the training forward with the fused LM head + cross-entropy kernel, so the [tokens, vocab]
logits never exist; the generator's own log-probs are not reused because they come from a different code path (KV
cache, other kernels) and would put a small bias into the first ratio. The update trims each micro-batch's right
padding, so its forward runs other shapes than the rollout's: in fp32 the first ratio is 1 to ~1e-6, in bf16 it
carries bf16 rounding noise (on CPU up to ~1e-3 for a small random model with logits of a trained model's size,
small beside the 0.2 clip), the price of not computing padding.

Per-token tensors are stored in "label layout", like the SFT collator: column t holds the quantity of token t+1
(labels[t] = ids[t+1] on response tokens, -100 elsewhere), so hidden[:, t] is the state that produced it.
"""
import copy
import json
import math
import os
import time
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import load_file

import common
import data
import nanotulu_kernels as kernels
import verifiers
from model import CheckpointError, Transformer, generate


@dataclass
class RLVRConfig(common.TrainConfig):
    run_dir: str = "runs/rlvr"
    algo: str = "grpo"              # grpo | ppo
    eval_data: str = ""             # held-out RLVR rows for verified accuracy ('' = none; the demo has its own)
    template: str = ""              # tulu | chatml ('' = the one the tokenizer was saved with, else tulu)
    skip_bad_rows: bool = False
    demo_seed: int = 0              # data.make_demo_data seed (demo only)
    # TrainConfig's settings that RLVR refuses
    fsdp: bool = False              # not supported: generation needs the full weights on every rank
    grad_accum: int = 1             # not used: the rollout is split by num_minibatches and batch_size
    total_batch_size: int = 0       # not used: the batch is prompts_per_step x num_samples
    # rollouts
    prompts_per_step: int = 8       # global, split over ranks
    num_samples: int = 4            # responses per prompt (GRPO's group size G)
    max_prompt_len: int = 2048      # longer prompts are dropped (and counted)
    max_response_len: int = 64
    temperature: float = 1.0
    gen_batch_size: int = 0         # sequences per generate() call (0 = all of a rank's at once)
    verification_reward: float = 10.0
    non_stop_penalty: float = -10.0
    apply_non_stop_penalty: bool = True
    ifeval_partial: bool = False    # IFEval rows: reward x fraction of constraints met instead of all-or-nothing
    # update
    batch_size: int = 1             # rollout sequences per device per micro-batch of the update's forwards
    ppo_epochs: int = 1
    num_minibatches: int = 1        # optimizer steps per epoch over the rollout
    loss_reduction: str = "token"   # token: every response token of a minibatch weighs the same | sequence: every
                                    # response does (a mean over its tokens, then over the minibatch's responses)
    clip_eps: float = 0.2
    beta: float = 0.01              # KL coefficient (0 = no reference model at all)
    advantage_norm: str = "std"     # grpo: std | center
    skip_equal_groups: bool = True  # grpo: leave out groups whose rewards are all equal (only their KL would act)
    adv_eps: float = 1e-8
    # ppo
    value_model: str = ""           # reward-model folder (train_dpo.py --objective=reward_model); '' = the policy
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    value_coef: float = 0.1
    # evaluation and logging
    eval_max_new_tokens: int = 128
    eval_batch_size: int = 64
    samples_per_step: int = 2       # rollouts written to run_dir/samples.jsonl each step (rank 0)


# ----------------------------------------------------------------------------------------------------------
# Rewards

def compute_reward(dataset, response, ground_truth, stopped, cfg):
    """(reward, verified) of one response. verified is the all-or-nothing check (for accuracy metrics); the
    reward may use IFEval partial credit. A response cut at the length limit gets the non-stop penalty instead."""
    verified = verifiers.verify(dataset, response, ground_truth)
    credit = verifiers.verify(dataset, response, ground_truth, partial=True) \
        if cfg.ifeval_partial and str(dataset).lower() == "ifeval" else verified
    reward = cfg.verification_reward * credit
    if cfg.apply_non_stop_penalty and not stopped:
        reward = cfg.non_stop_penalty
    return reward, verified


# ----------------------------------------------------------------------------------------------------------
# Advantages and losses (pure functions of tensors; tests check them against hand-worked examples)

def grpo_advantages(rewards, norm="std", eps=1e-8):
    """rewards [P, G] -> (advantages [P, G], keep [P]). std is the population std (numpy's default, as
    open-instruct's grpo_fast); keep is False for groups whose rewards are all equal (zero advantage)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    adv = rewards - mean
    if norm == "std":
        adv = adv / (std + eps)
    elif norm != "center":
        raise ValueError(f"advantage_norm={norm!r}: expected std or center")
    return adv, (rewards != rewards[:, :1]).any(dim=1)


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over right-padded rows. rewards, values, mask [B, T] (mask 1 on response
    tokens). The value after the last response token is 0 (the episode ends). Returns (advantages, returns)."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries of every rank (unbiased std, as open-instruct's whiten). Two passes
    in float64: E[x^2] - mean^2 in float32 loses the std when the mean is far larger (a value model on another
    scale)."""
    xd, md = x.double(), mask.double()
    s, n = common.all_reduce_sum(torch.stack([(xd * md).sum(), md.sum()])).tolist()
    mean = s / max(n, 1)
    var = common.all_reduce_sum(((xd - mean).square() * md).sum()).item() / max(n - 1, 1)
    return (x - mean) / math.sqrt(var + eps) * mask


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(policy || ref): exp(-d) - 1 + d with d = logp - ref_logp (>= 0, unbiased).
    expm1, as exp(-d) - 1 cancels to noise in fp32 at the small d of a policy near its reference (negative at
    d = 1e-4); d clamped to +-40, as in Tulu 3.1's GRPO, as exp(-d) is inf past d = -88, and so would the loss be."""
    d = (logp - ref_logp).clamp(-40, 40)
    return torch.expm1(-d) + d


def policy_loss(logp, old_logp, adv, clip_eps):
    """Per-token clipped surrogate max(-A r, -A clip(r, 1 -+ eps)) and where the clipped branch was taken."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def value_loss(values, old_values, returns, value_clip):
    """Per-token 0.5 max((v - R)^2, (v_clipped - R)^2), v_clipped within value_clip of the rollout's value."""
    clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.maximum(a, b), (b > a).float()


# ----------------------------------------------------------------------------------------------------------
# Models: per-token log-probs through the fused kernel, and the value model

def token_logprobs(model, ids, labels, temperature=1.0):
    """[B, T] log-prob of labels[:, t] (0 where ignored) at the sampling temperature: dividing the hidden states
    by T divides the logits by T, so the fused kernel still never builds them."""
    hidden = model(ids, return_hidden=True)
    weight = common.unwrap(model).output_weight
    nll = kernels.fused_linear_cross_entropy((hidden / temperature).flatten(0, 1), weight, labels.flatten(),
                                             reduction="none")
    return -nll.view(labels.shape)


class ValueModel(nn.Module):
    """A backbone and a scalar head read at every position: value(t) = hidden(t) @ score.weight.T, the reward
    model's readout (train_dpo.py) applied to every state instead of the last one only."""

    def __init__(self, backbone, score_weight):
        super().__init__()
        self.backbone = backbone
        if backbone.lm_head is not None:  # an untied LM head plays no part in a value
            backbone.lm_head.requires_grad_(False)
        self.score = nn.Linear(backbone.config.hidden_size, 1, bias=False)
        with torch.no_grad():
            self.score.weight.copy_(score_weight)

    def forward(self, ids):
        return common.score_readout(self.backbone(ids, return_hidden=True), self.score)


def build_value_model(cfg, policy):
    if not cfg.value_model:
        # no reward model: start from the policy's features; a zero head makes every initial value 0
        return ValueModel(copy.deepcopy(policy), torch.zeros(1, policy.config.hidden_size))
    head_path = os.path.join(cfg.value_model, common.VALUE_HEAD)
    if not os.path.isfile(head_path):
        raise FileNotFoundError(f"value_model={cfg.value_model}: no {common.VALUE_HEAD} (train a reward model "
                                f"with train_dpo.py --objective=reward_model, or leave value_model empty)")
    backbone = Transformer.from_pretrained(cfg.value_model, dtype=torch.float32)
    if backbone.config.vocab_size != policy.config.vocab_size:
        raise CheckpointError(f"value_model={cfg.value_model}: vocab_size {backbone.config.vocab_size} differs from "
                              f"the policy's {policy.config.vocab_size} (they must share the tokenizer)")
    try:
        head = load_file(head_path)
    except Exception as e:  # safetensors' errors (a file cut short: "header too small") name no file
        raise CheckpointError(f"{head_path}: not a readable safetensors file ({e})") from None
    if "score.weight" not in head:
        raise CheckpointError(f"{head_path}: no score.weight tensor (holds {sorted(head)})")
    weight = head["score.weight"]
    if weight.shape != (1, backbone.config.hidden_size):
        raise CheckpointError(f"{head_path}: score.weight has shape {tuple(weight.shape)}, expected "
                              f"(1, {backbone.config.hidden_size})")
    return ValueModel(backbone, weight)


def sync_gradients(params, d):
    """Sum gradients over ranks. Not DDP: after zero-variance groups are skipped, ranks hold different numbers of
    sequences and so run different numbers of backward passes, which DDP's per-backward hooks cannot handle."""
    if not d.is_distributed:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        common.all_reduce_sum(p.grad)


# ----------------------------------------------------------------------------------------------------------
# Data, rollouts, held-out accuracy

def logged_start_accuracy(metrics_path):
    """The held-out accuracies logged at step 0, for a resumed run's before -> after lines ({} if none)."""
    if not os.path.exists(metrics_path):
        return {}
    with open(metrics_path) as f:
        for record in map(json.loads, f):
            if record["step"] == 0 and any(k.startswith("eval_acc_") for k in record):
                return {k: v for k, v in record.items() if k.startswith("eval_acc_")}
    return {}


def default_demo_model():
    for path in ("runs/dpo_demo/final", "runs/sft_demo/final"):
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise FileNotFoundError("the RLVR demo starts from runs/dpo_demo/final or runs/sft_demo/final and neither "
                            "exists: run `python train_sft.py` first (and optionally `python train_dpo.py`)")


def load_prompts(cfg, tok, template, positions):
    """(train rows, held-out rows), each row with its rendered prompt ids under 'prompt_ids'. Prompts longer than
    max_prompt_len, or too long for their longest continuation (max_response_len in training, eval_max_new_tokens
    held out) to fit the model's positions, are dropped and counted."""
    if cfg.data:
        def check(dataset, truth):  # once on an empty response, so that a bad truth fails here, naming its row
            verifiers.verify(dataset, "", truth)
        train = data.load_rlvr_rows(cfg.data, skip_bad=cfg.skip_bad_rows, check_ground_truth=check)
        heldout = data.load_rlvr_rows(cfg.eval_data, skip_bad=cfg.skip_bad_rows, check_ground_truth=check) \
            if cfg.eval_data else []
    else:
        common.refuse_unused(cfg, ["eval_data"], "not used without --data (the demo prompts have their own "
                             "held-out split)")
        common.print0("data: the built-in synthetic demo prompts (no --data given)")
        demo = data.make_demo_data(cfg.demo_seed)
        train, heldout = demo["rlvr_train"], demo["rlvr_heldout"]

    def render(rows, what, source, room, why):
        max_len = min(cfg.max_prompt_len, positions - room)
        limit = f"max_prompt_len={cfg.max_prompt_len}" if max_len == cfg.max_prompt_len else \
            f"{max_len} tokens (the model's {positions} positions less {why})"
        out = []
        for row in rows:
            ids = data.render_chat(tok, row["messages"], template, add_generation_prompt=True)[0]
            if len(ids) <= max_len:
                out.append({**row, "prompt_ids": ids})
        if rows and not out:
            raise data.DataError(source, f"no {what} prompts left (every prompt is longer than {limit})")
        if len(out) < len(rows):
            common.print0(f"{what}: dropped {len(rows) - len(out)} of {len(rows)} prompts longer than {limit}")
        return out

    # The learner's forward reads prompt + whole response; held out, the last new token is never fed back.
    return (render(train, "train", f"data={cfg.data or 'demo'}", cfg.max_response_len,
                   f"max_response_len={cfg.max_response_len}"),
            render(heldout, "held-out", f"eval_data={cfg.eval_data or 'demo'}", cfg.eval_max_new_tokens - 1,
                   f"eval_max_new_tokens={cfg.eval_max_new_tokens} - 1"))


def response_text(tok, tokens, stopped):
    """The text a response is verified on: without its stop token, which decoding keeps where the tokenizer does not
    mark it special (an end-of-response check would then see '<|im_end|>' at the end)."""
    return tok.decode(tokens[:-1] if stopped else tokens)


def rollout(policy, tok, rows, cfg, stop_ids, device):
    """Sample num_samples responses per row (consecutive) and score them. Returns a list of dicts."""
    prompts = [r["prompt_ids"] for r in rows for _ in range(cfg.num_samples)]
    owners = [r for r in rows for _ in range(cfg.num_samples)]
    chunk = cfg.gen_batch_size or len(prompts)
    out = []
    for i in range(0, len(prompts), chunk):
        with common.autocast(device, cfg.precision):
            gen = generate(policy, prompts[i:i + chunk], cfg.max_response_len, temperature=cfg.temperature,
                           stop_token_ids=stop_ids, pad_token_id=tok.pad_id)
        for prompt, row, tokens, stopped in zip(prompts[i:i + chunk], owners[i:i + chunk], gen.tokens, gen.stopped):
            text = response_text(tok, tokens, stopped)
            reward, verified = compute_reward(row["dataset"], text, row["ground_truth"], stopped, cfg)
            out.append({"prompt_ids": prompt, "response_ids": tokens, "response": text, "stopped": stopped,
                        "reward": reward, "verified": verified, "dataset": row["dataset"],
                        "ground_truth": row["ground_truth"]})
    return out


def collate_rollouts(samples, pad_id, device):
    """ids [N, T] (prompt + response, right-padded), labels [N, T] in label layout (response tokens only)."""
    T = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), data.IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        ids[i, :p + r] = torch.tensor(s["prompt_ids"] + s["response_ids"])
        labels[i, p - 1:p + r - 1] = torch.tensor(s["response_ids"])
    return ids.to(device), labels.to(device)


def micro_batches(rows, lengths, batch_size):
    """(rows[i:i + batch_size], T) for each micro-batch of `rows` (indices of right-padded rollout rows, on the
    device), T the length of its longest row (lengths: prompt + response of each rollout row): the columns from T on
    are padding in every row of the micro-batch, so they are not computed."""
    host = rows.tolist()  # one device sync for all the micro-batches
    for i in range(0, len(host), batch_size):
        yield rows[i:i + batch_size], max(lengths[j] for j in host[i:i + batch_size])


@torch.no_grad()
def heldout_accuracy(policy, tok, rows, cfg, stop_ids, d):
    """Greedy verified accuracy per dataset on the held-out rows (sharded over ranks, then summed) -- the same
    check as eval.evaluate_demo's arith_acc / constraint_acc."""
    names = sorted({r["dataset"] for r in rows})
    tally = torch.zeros(len(names), 2, dtype=torch.float64, device=d.device)
    mine = rows[d.rank::d.world_size]
    for i in range(0, len(mine), cfg.eval_batch_size):
        batch = mine[i:i + cfg.eval_batch_size]
        with common.autocast(d.device, cfg.precision):
            gen = generate(policy, [r["prompt_ids"] for r in batch], cfg.eval_max_new_tokens, temperature=0.0,
                           stop_token_ids=stop_ids, pad_token_id=tok.pad_id)
        for row, tokens, stopped in zip(batch, gen.tokens, gen.stopped):
            k = names.index(row["dataset"])
            tally[k, 0] += verifiers.verify(row["dataset"], response_text(tok, tokens, stopped), row["ground_truth"])
            tally[k, 1] += 1
    common.all_reduce_sum(tally)
    return {f"eval_acc_{n}": (c / max(t, 1)) for n, (c, t) in zip(names, tally.tolist())}


# ----------------------------------------------------------------------------------------------------------
# Training

# A step's sums, read back by name; each set is one float64 tensor, which one all-reduce sums over ranks.
# The rollout's (kl and kl_k3 are over the rows trained on, as open-instruct's grpo_fast measures them):
StepSums = namedtuple("StepSums", "reward rollouts response_tokens non_stop kl kl_k3 zero_std_groups trained_rows "
                      "trained_tokens")
# The update's, over the response tokens of every micro-batch it ran:
UpdateSums = namedtuple("UpdateSums", "pg_loss clip_frac vf_loss vf_clip_frac tokens")


def summed(sums, device):
    """A namedtuple of this rank's sums (tensors or numbers) -> the same namedtuple of floats, summed over ranks:
    one all-reduce of one float64 tensor, one host copy."""
    total = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in sums])
    return type(sums)(*common.all_reduce_sum(total).tolist())


def check_config(cfg, d):
    if cfg.algo not in ("grpo", "ppo"):
        raise common.ConfigError(f"algo={cfg.algo!r}: expected grpo or ppo")
    for name in ("prompts_per_step", "num_samples", "max_prompt_len", "max_response_len", "ppo_epochs",
                 "num_minibatches", "eval_max_new_tokens", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise common.ConfigError(f"{name}={getattr(cfg, name)}: must be at least 1")
    for name in ("gen_batch_size", "samples_per_step", "beta", "clip_eps", "value_clip", "value_coef"):
        if getattr(cfg, name) < 0:
            raise common.ConfigError(f"{name}={getattr(cfg, name)}: must be at least 0")
    if cfg.prompts_per_step % d.world_size:
        raise common.ConfigError(f"prompts_per_step={cfg.prompts_per_step} is not a multiple of the "
                                 f"{d.world_size} ranks")
    if cfg.algo == "grpo" and cfg.num_samples < 2:
        raise common.ConfigError(f"num_samples={cfg.num_samples}: GRPO needs at least 2 samples per prompt")
    if cfg.fsdp:
        raise common.ConfigError("fsdp: not supported by train_rlvr.py (generation needs the full weights)")
    common.refuse_unused(cfg, ["total_batch_size"] + (["grad_accum"] if cfg.grad_accum != 1 else []),
                         "RLVR batches are prompts_per_step x num_samples, split into num_minibatches optimizer "
                         "steps of batch_size micro-batches")
    if cfg.temperature <= 0:
        raise common.ConfigError(f"temperature={cfg.temperature}: RLVR samples, it must be > 0")
    if not cfg.adv_eps > 0:  # a group whose rewards are all equal has std 0: 0 / 0 would make every weight nan
        raise common.ConfigError(f"adv_eps={cfg.adv_eps}: must be > 0")
    data.check_template_name(cfg.template)
    if cfg.value_model and cfg.algo != "ppo":
        raise common.ConfigError(f"value_model={cfg.value_model}: only --algo=ppo has a value model")
    if cfg.loss_reduction not in ("token", "sequence"):
        raise common.ConfigError(f"loss_reduction={cfg.loss_reduction!r}: expected token or sequence")
    if cfg.advantage_norm not in ("std", "center"):  # now, not after the first rollout
        raise common.ConfigError(f"advantage_norm={cfg.advantage_norm!r}: expected std or center")


def main(argv=None):
    cfg = common.parse_trainer_config(RLVRConfig, argv, "rlvr_demo.json", "rlvr_smoltulu.json")
    d = common.setup_distributed(cfg.device)
    kernels.backend_on(d.device)
    cfg.precision = common.resolved_precision(cfg.precision, d.device)
    check_config(cfg, d)
    if not cfg.model:
        cfg.model = default_demo_model()
    common.check_folder(cfg, "model")
    common.check_folder(cfg, "value_model")
    rollout_batch = cfg.prompts_per_step * cfg.num_samples
    if cfg.lr_bs_ratio > 0:
        cfg.lr = cfg.lr_bs_ratio * rollout_batch
    common.prepare_run_dir(cfg, d)
    samples_path = os.path.join(cfg.run_dir, "samples.jsonl")
    if d.is_main and not cfg.resume and os.path.exists(samples_path):
        os.remove(samples_path)
    # every rank samples its own responses: different seeds, else ranks would draw the same noise
    common.seed_all((cfg.seed + d.rank) % 2**32)

    tok = data.Tokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    template = data.resolve_template(cfg.template, tok)
    tok.use_chat_template(template)  # final/ records the template the policy was trained with
    stop_ids = data.stop_token_ids(tok, template)
    policy = Transformer.from_pretrained(cfg.model, dtype=torch.float32).to(d.device)
    data.check_vocab(tok, policy.config.vocab_size, cfg.tokenizer or cfg.model)
    train_rows, eval_rows = load_prompts(cfg, tok, template, policy.config.max_position_embeddings)
    rows_digest = data.fingerprint_rows(train_rows, ["prompt_ids", "ground_truth", "dataset"])
    per_rank = cfg.prompts_per_step // d.world_size
    sampler = data.EpochSampler(len(train_rows), seed=cfg.seed, rank=d.rank, world_size=d.world_size)
    total_steps = common.total_steps_for(cfg, len(train_rows), cfg.prompts_per_step)
    datasets = sorted({r["dataset"] for r in train_rows})

    policy.gradient_checkpointing = cfg.gradient_checkpointing
    # the reference is the initial policy: a frozen copy (rebuilt from cfg.model on resume)
    ref = common.frozen_copy(policy, cfg.precision, d.device) if cfg.beta > 0 else None
    start_weights = common.weights_digest(policy) if ref is not None else None
    value = build_value_model(cfg, policy).to(d.device) if cfg.algo == "ppo" else None
    if value is not None:
        value.backbone.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.compile:  # the reference too: compiled kernels round otherwise than eager ones, and the two must agree
        for transformer in (policy, ref, value.backbone if value is not None else None):
            if transformer is not None:
                common.compile_blocks(transformer)
    # one optimizer (and one checkpoint) over everything trained; gradients are clipped per model, as open-instruct's
    # separate policy and value engines do, so that the critic's large early gradients do not shrink the policy's
    trained = nn.ModuleDict({"policy": policy, "value": value}) if value is not None else policy
    optimizer = common.build_optimizer(trained, cfg, d.device)
    params = [p for p in trained.parameters() if p.requires_grad]

    step = common.maybe_resume(cfg, trained, optimizer, sampler, start_weights=start_weights, data_digest=rows_digest)
    # (the template resolved for config.json only: checkpoints keep --template as given, so older ones resume)
    common.write_run_config(cfg, template=template)
    if cfg.resume and d.is_main:  # samples logged after the checkpoint (all of them, when none was reached) are redone
        common.drop_records_after(samples_path, step)
    logger = common.MetricsLogger(cfg.run_dir, enabled=d.is_main, resume_step=step if cfg.resume else None)
    common.print0(f"{cfg.algo.upper()} from {cfg.model}: {len(train_rows)} prompts, {len(eval_rows)} held out; "
                  f"{policy.num_params() / 1e6:.2f}M params; {cfg.prompts_per_step} prompts x {cfg.num_samples} "
                  f"samples per step over {d.world_size} ranks, lr {cfg.lr:.3g}, beta {cfg.beta}, {total_steps} steps")
    # the MATH and IFEval checks run other code when sympy, langdetect or nltk are missing: say which this run has
    common.print0("reward checkers: " + "; ".join(f"{k}: {v}" for k, v in verifiers.BACKENDS.items()))
    if cfg.algo == "ppo":  # Tulu 3 starts the value model from a reward model; say so when it does not
        common.print0(f"value model: the reward model at {cfg.value_model}" if cfg.value_model else
                      "value model: a copy of the policy with a zero value head (no --value_model given; Tulu 3 "
                      "starts it from a reward model: train_dpo.py --objective=reward_model)")

    def evaluate():
        if not eval_rows:
            return {}
        acc = heldout_accuracy(policy, tok, eval_rows, cfg, stop_ids, d)
        logger.log({"step": step, **acc})
        common.print0(f"step {step}: held-out verified accuracy " +
                      ", ".join(f"{k[len('eval_acc_'):]} {v:.3f}" for k, v in acc.items()))
        return acc

    if step == 0:
        start_acc = evaluate()
    else:  # a resumed run's start was evaluated and logged by the run it continues
        start_acc = logged_start_accuracy(logger.path) if d.is_main else {}
    end_acc = {}  # the last step's, evaluated before its checkpoint: a resume from it does not log it again
    bar = common.progress_bar(total_steps, step, d.is_main and cfg.progress, f"rlvr-{cfg.algo}")
    while step < total_steps:
        # ---- rollout: sample, score, and the no-grad quantities the update compares against
        t0 = time.perf_counter()
        rows = [train_rows[i] for i in sampler.next_batch(per_rank)]
        samples = rollout(policy, tok, rows, cfg, stop_ids, d.device)
        t_gen = time.perf_counter() - t0
        ids, labels = collate_rollouts(samples, tok.pad_id, d.device)
        mask = (labels != data.IGNORE_INDEX).float()
        lengths = [len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples]
        rewards = torch.tensor([s["reward"] for s in samples], device=d.device)
        if cfg.algo == "grpo":  # from the rewards alone: the passes below leave out the groups dropped here
            adv_seq, keep = grpo_advantages(rewards.view(-1, cfg.num_samples), cfg.advantage_norm, cfg.adv_eps)
            trained_groups = keep if cfg.skip_equal_groups else torch.ones_like(keep)
            rows_kept = trained_groups.repeat_interleave(cfg.num_samples).nonzero().squeeze(1)
        else:
            rows_kept = torch.arange(len(samples), device=d.device)

        # The no-grad quantities the update compares against, for the rows it trains on only (0 elsewhere). In
        # micro-batches of batch_size rows, as the update runs: one forward over a whole rollout can run out of memory
        # at the recipes' rollout sizes.
        def passes(fn):
            out = torch.zeros_like(mask)
            for rb, T in micro_batches(rows_kept, lengths, cfg.batch_size):
                out[rb, :T] = fn(ids[rb, :T], labels[rb, :T])
            return out * mask
        with torch.no_grad(), common.autocast(d.device, cfg.precision):
            old_logp = passes(lambda x, y: token_logprobs(policy, x, y, cfg.temperature))
            ref_logp = passes(lambda x, y: token_logprobs(ref, x, y, cfg.temperature)) if ref is not None else old_logp
            old_values = passes(lambda x, y: value(x)) if value is not None else None

        # The advantage of every response token (0 elsewhere), and PPO's value targets
        if cfg.algo == "grpo":  # the response's group-normalised reward, on each of its tokens
            adv, returns = adv_seq.view(-1, 1) * mask, None
        else:
            # score at the last response token, KL penalty on every token (Tulu 3 / open-instruct PPO)
            # (the last response token: where a row's running count of mask tokens reaches its total)
            last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)
            token_rewards = -cfg.beta * (old_logp - ref_logp) + rewards[:, None] * last
            adv, returns = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
            adv = masked_whiten(adv, mask)

        # ---- update: ppo_epochs passes, each split into num_minibatches optimizer steps
        t1 = time.perf_counter()
        # The schedule runs over optimizer steps, as open-instruct's does: warmup rises within the first rollout's
        # updates instead of holding them all at lr 0, and the decay is a line, not a staircase.
        updates = cfg.ppo_epochs * cfg.num_minibatches
        update = step * updates
        trained.train()
        sums = torch.zeros(len(UpdateSums._fields), dtype=torch.float64, device=d.device)
        grad_norm = value_grad_norm = 0.0  # stay 0 when no group carried a signal and nothing was updated
        for _ in range(cfg.ppo_epochs):
            order = rows_kept[torch.randperm(len(rows_kept), device=d.device)]
            for mb in order.tensor_split(cfg.num_minibatches):
                lr = common.lr_at(update, total_steps * updates, cfg.lr, cfg.schedule, cfg.warmup_ratio,
                                  cfg.min_lr_ratio)
                common.set_lr(optimizer, lr)
                update += 1
                global_tokens, global_rows = common.all_reduce_sum(torch.stack([
                    mask[mb].sum().double(), torch.tensor(len(mb), dtype=torch.float64, device=d.device)]))
                if global_tokens.item() == 0:
                    # no rank kept a row here (every GRPO group had equal rewards): no step, or the zero gradients
                    # that sync_gradients fills in would still move the weights through weight decay and momentum
                    continue
                for rb, T in micro_batches(mb, lengths, cfg.batch_size):
                    m, a = mask[rb, :T], adv[rb, :T]
                    with common.autocast(d.device, cfg.precision):
                        logp = token_logprobs(policy, ids[rb, :T], labels[rb, :T], cfg.temperature)
                        pg, clipped = policy_loss(logp, old_logp[rb, :T], a, cfg.clip_eps)
                        loss_tok = pg  # (PPO's KL penalty is in its rewards already, token_rewards above)
                        if cfg.algo == "grpo" and ref is not None:
                            loss_tok = loss_tok + cfg.beta * k3_kl(logp, ref_logp[rb, :T])
                        if value is not None:
                            vf, vclip = value_loss(value(ids[rb, :T]), old_values[rb, :T], returns[rb, :T],
                                                   cfg.value_clip)
                            loss_tok = loss_tok + cfg.value_coef * vf
                    if cfg.loss_reduction == "token":
                        loss = (loss_tok * m).sum() / global_tokens
                    else:
                        loss = (loss_tok * m / m.sum(1, keepdim=True).clamp(min=1)).sum() / global_rows
                    loss.backward()
                    with torch.no_grad():
                        if value is None:  # no value loss: its sums stay 0
                            vf = vclip = torch.zeros_like(pg)
                        sums += torch.stack(UpdateSums(
                            pg_loss=(pg * m).sum(), clip_frac=(clipped * m).sum(),
                            vf_loss=(vf * m).sum(), vf_clip_frac=(vclip * m).sum(), tokens=m.sum())).double()
                sync_gradients(params, d)
                grad_norm = common.clip_grad(policy, cfg.grad_clip, step + 1)
                if value is not None:
                    value_grad_norm = common.clip_grad(value, cfg.grad_clip, step + 1)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        step += 1
        t_learn = time.perf_counter() - t1

        # ---- metrics (summed over ranks)
        per_ds = torch.zeros(len(datasets), 2, dtype=torch.float64, device=d.device)
        for s in samples:
            per_ds[datasets.index(s["dataset"])] += torch.tensor([s["verified"], 1.0], dtype=torch.float64,
                                                                 device=d.device)
        common.all_reduce_sum(per_ds)
        r = summed(StepSums(reward=rewards.sum(), rollouts=len(samples), response_tokens=mask.sum(1).sum(),
                            non_stop=sum(not s["stopped"] for s in samples), kl=(old_logp - ref_logp).sum(),
                            kl_k3=k3_kl(old_logp, ref_logp).mul(mask).sum(),
                            zero_std_groups=(~keep).sum() if cfg.algo == "grpo" else 0,
                            trained_rows=len(rows_kept), trained_tokens=mask[rows_kept].sum()), d.device)
        u = UpdateSums(*common.all_reduce_sum(sums).tolist())
        n, toks, upd, trained_toks = r.rollouts, r.response_tokens, max(u.tokens, 1.0), r.trained_tokens
        record = {"step": step, "lr": lr, "rollouts": int(n), "reward": r.reward / n,
                  "acc": per_ds[:, 0].sum().item() / n,
                  **{f"acc_{name}": (c / t if t else None) for name, (c, t) in zip(datasets, per_ds.tolist())},
                  "response_len": toks / n, "non_stop": r.non_stop / n,
                  # (none measured without a reference model, at beta 0)
                  "kl": r.kl / trained_toks if trained_toks and ref is not None else None,
                  "kl_k3": r.kl_k3 / trained_toks if trained_toks and ref is not None else None,
                  "pg_loss": u.pg_loss / upd, "clip_frac": u.clip_frac / upd, "grad_norm": grad_norm,
                  "gen_s": t_gen, "learn_s": t_learn, "gen_tok_per_s": toks / max(t_gen, 1e-9)}
        if cfg.algo == "grpo":
            record.update(zero_std_groups=int(r.zero_std_groups), trained_seqs=int(r.trained_rows))
        else:
            record.update(vf_loss=u.vf_loss / upd, vf_clip_frac=u.vf_clip_frac / upd,
                          value_grad_norm=value_grad_norm)
        if step % cfg.log_every == 0 or step == total_steps:
            logger.log(record)
        if d.is_main and cfg.samples_per_step:
            with open(samples_path, "a") as f:
                for s in samples[:cfg.samples_per_step]:
                    f.write(json.dumps({"step": step, "prompt": tok.decode(s["prompt_ids"], skip_special_tokens=False),
                                        **{k: s[k] for k in ("response", "ground_truth", "dataset", "reward",
                                                             "verified", "stopped")}}) + "\n")
        bar.set_postfix(reward=f"{record['reward']:.2f}", acc=f"{record['acc']:.2f}",
                        kl="-" if record["kl"] is None else f"{record['kl']:.3f}", len=f"{record['response_len']:.0f}")
        bar.update(1)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
            end_acc = evaluate()
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total_steps):
            common.save_checkpoint(cfg.run_dir, step, trained, optimizer, keep=cfg.keep_checkpoints,
                                   extra={"sampler": sampler.state_dict(), "config": common.config_dict(cfg),
                                          "start_weights": start_weights, "data_digest": rows_digest})
    bar.close()
    for k in end_acc:
        if k in start_acc:
            common.print0(f"{k[len('eval_acc_'):]}: {start_acc[k]:.3f} -> {end_acc[k]:.3f} (before -> after RLVR)")
    path = common.save_final(cfg.run_dir, policy, tok)
    common.print0(f"saved {path}")
    common.teardown_distributed()
    return {"before": start_acc, "after": end_acc}


if __name__ == "__main__":
    common.run_script(main, data.DataError, CheckpointError, FileNotFoundError, kernels.BackendError,
                      resumable=True)
