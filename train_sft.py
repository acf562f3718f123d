"""Supervised fine-tuning (Tulu 3 / SmolTulu stage 1).

    python train_sft.py                                   # CPU demo: tiny model, synthetic data, a few minutes
    torchrun --nproc_per_node=8 train_sft.py --config=configs/sft_smoltulu_1130.json \\
        --model=PATH/SmolLM2-1.7B --data='PATH/tulu-3-sft-mixture/data/*.parquet'

Without --config the demo preset (configs/sft_demo.json) is the base, and --data is refused (real data needs a
preset of its own); any --key=value overrides it.
Loss: cross-entropy on the assistant tokens only, weighted per token over the whole global batch (sum of the
token losses over every micro-batch and rank, divided by the number of trained tokens in all of them), so the
split into micro-batches, accumulation steps and ranks does not change the update. This is not open-instruct's
'mean', which averages over the tokens of each micro-batch and then over micro-batches, so that at one sequence
per device a short conversation's tokens weigh more than a long one's. --loss_reduction=sum is Tulu 3's sum loss:
each conversation's summed token losses, divided by the number of conversations in the effective batch (so it takes
--packing=false).
"""
import math
from dataclasses import dataclass

import torch

import common
import data
import nanotulu_kernels as kernels
from model import CheckpointError, ModelConfig, Transformer


@dataclass
class SFTConfig(common.TrainConfig):
    run_dir: str = "runs/sft"
    eval_data: str = ""             # held-out rows for the periodic loss ('' = none; the demo has its own split)
    template: str = "tulu"          # tulu | chatml | '' (the one the model was saved with, tulu when none)
    max_seq_len: int = 2048
    packing: bool = True            # best-fit packing with per-document attention; False = one example per row
    loss_reduction: str = "mean"    # mean: per trained token | sum: Tulu 3's sum loss (per conversation: see above)
    skip_bad_rows: bool = False
    cache_dir: str = "runs/cache"   # tokenization cache shared by runs and ranks ('' = off)
    demo_seed: int = 0              # the synthetic data and its tokenizer (demo only)


def load_rows(cfg):
    """-> the tokenizer, and the train and held-out rows (the demo's, or --data's and --eval_data's)."""
    if cfg.data:
        if not (cfg.model or cfg.tokenizer):
            raise common.ConfigError("--data needs --model=PATH (an HF folder: the weights and their tokenizer)")
        tok = data.Tokenizer.from_pretrained(cfg.tokenizer or cfg.model)
        train_rows = data.load_sft_rows(cfg.data, skip_bad=cfg.skip_bad_rows)
        eval_rows = data.load_sft_rows(cfg.eval_data, skip_bad=cfg.skip_bad_rows) if cfg.eval_data else []
    else:
        common.refuse_unused(cfg, ["tokenizer", "eval_data"], "not used without --data (the demo has its own "
                             "tokenizer and held-out split)")
        demo = data.make_demo_data(cfg.demo_seed)
        train_rows, eval_rows = demo["sft_train"], demo["sft_heldout"]
        tok = data.build_demo_tokenizer(demo)  # all splits, so DPO / RLVR text later is covered too
        if cfg.model:  # trained further on the demo: its tokenizer must be the demo's (and its template is its own)
            saved = data.Tokenizer.from_pretrained(cfg.model)
            if not saved.same_ids(tok):  # another model's embeddings would see other token ids
                raise common.ConfigError(f"--model={cfg.model} without --data: its tokenizer is not the demo's "
                                         f"(demo_seed={cfg.demo_seed}), so it cannot train on the built-in synthetic "
                                         f"data; pass the data to train on")
            tok = saved
    # --template= takes the one the model was saved with; another one is not warned about, unlike in DPO and RLVR,
    # since SFT is where a template is trained in
    if not cfg.template:
        cfg.template = data.resolve_template("", tok)
    else:  # (resolve_template checks these for the saved one)
        data.check_template_tokens(cfg.template, tok)
    return tok, train_rows, eval_rows


def tokenize(cfg, d, tok, train_rows, eval_rows):
    """-> tokenized (ids, mask) examples for train and held-out."""
    def split_examples(rows, split):
        return common.main_rank_first(lambda: data.tokenize_sft(rows, tok, cfg.template, cfg.max_seq_len,
                                                                cache_dir=cfg.cache_dir or None,
                                                                progress=d.is_main and cfg.progress, split=split))

    train = split_examples(train_rows, "train")
    if not train:
        raise data.DataError(f"data={cfg.data or 'demo'}", f"none of its {len(train_rows)} rows has a trained token "
                             f"within max_seq_len={cfg.max_seq_len}: nothing to train on")
    return train, (split_examples(eval_rows, "held-out") if eval_rows else [])


def make_batches(cfg, examples):
    """Items the sampler shuffles: packed rows (lists of example indices) or single examples, and the collator."""
    if cfg.packing:
        items = data.pack_best_fit([len(ids) for ids, _ in examples], cfg.max_seq_len)
        collate = lambda chosen, pad: data.collate_packed(examples, chosen, cfg.max_seq_len, pad)
    else:
        items = list(range(len(examples)))
        collate = lambda chosen, pad: data.collate_padded(examples, chosen, cfg.max_seq_len, pad)
    return items, collate


def build_model(cfg, tok, d):
    if cfg.model:
        model = Transformer.from_pretrained(cfg.model, dtype=torch.float32, device="cpu")
        data.check_vocab(tok, model.config.vocab_size, cfg.tokenizer or cfg.model)
    else:
        torch.manual_seed(cfg.seed)
        # the saved config.json and generation_config.json name these: a new model's are its tokenizer's
        model = Transformer(ModelConfig.from_preset("demo", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                                    eos_token_id=tok.eos_id))
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model.to(d.device)


def token_loss_sum(model, batch):
    """Summed cross-entropy over the trained tokens of one micro-batch (labels are pre-shifted by the collator),
    with the fused kernel so the [tokens, vocab] logits never exist in full."""
    hidden = model(batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"),
                   return_hidden=True)  # padded rows (packing=false) carry neither: plain causal attention
    weight = common.unwrap(model).output_weight
    return kernels.fused_linear_cross_entropy(hidden.flatten(0, 1), weight, batch["labels"].flatten(),
                                              reduction="sum")


@torch.no_grad()
def heldout_loss(model, cfg, eval_items, collate, pad_id, d):
    """Per-token loss over the whole held-out set (each rank takes every world_size-th row, then a sum)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=d.device)
    mine = eval_items[d.rank::d.world_size]
    # every rank runs the same number of forwards (FSDP gathers weights in each); a rank out of rows re-reads
    # row 0 and does not count it
    for i in range(0, math.ceil(len(eval_items) / d.world_size), cfg.batch_size):
        chunk = mine[i:i + cfg.batch_size]
        batch = {k: v.to(d.device) for k, v in collate(chunk or eval_items[:1], pad_id).items()}
        with common.autocast(d.device, cfg.precision):
            loss = token_loss_sum(model, batch).double()
        if chunk:
            totals[0] += loss
            totals[1] += (batch["labels"] != data.IGNORE_INDEX).sum()
    model.train()
    common.all_reduce_sum(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def main(argv=None):
    cfg = common.parse_trainer_config(SFTConfig, argv, "sft_demo.json", "sft_smoltulu_1130.json")
    common.check_folder(cfg, "model")
    data.check_template_name(cfg.template)
    if cfg.loss_reduction not in ("mean", "sum"):
        raise common.ConfigError(f"loss_reduction={cfg.loss_reduction!r}: expected mean or sum")
    if cfg.loss_reduction == "sum" and cfg.packing:
        raise common.ConfigError("loss_reduction=sum with packing=true: Tulu 3's sum loss is per conversation, and a "
                                 "packed row holds several; pass --packing=false")
    d = common.setup_distributed(cfg.device)
    kernels.backend_on(d.device)
    cfg.precision = common.resolved_precision(cfg.precision, d.device)
    effective_batch = common.resolve_batch(cfg, d.world_size)
    common.seed_all(cfg.seed)
    common.prepare_run_dir(cfg, d)

    tok, train_rows, eval_rows = load_rows(cfg)
    raw = build_model(cfg, tok, d)  # before tokenizing, minutes on the full mixture: a model that cannot load says so
    train_examples, eval_examples = tokenize(cfg, d, tok, train_rows, eval_rows)
    del train_rows, eval_rows  # the run needs only their tokens: the whole mixture's text is GBs on every rank
    train_items, collate = make_batches(cfg, train_examples)
    eval_items, eval_collate = make_batches(cfg, eval_examples)
    sampler = data.EpochSampler(len(train_items), seed=cfg.seed, rank=d.rank, world_size=d.world_size)
    total_steps = common.total_steps_for(cfg, len(train_items), effective_batch)

    common.check_positions(max(len(ids) for ids, _ in train_examples + eval_examples), raw, cfg.data or "demo data")
    model = common.wrap_model(raw, d, fsdp=cfg.fsdp, compile=cfg.compile, precision=cfg.precision)
    optimizer = common.build_optimizer(model, cfg, d.device)

    step = common.maybe_resume(cfg, model, optimizer, sampler, data_digest=train_examples.digest)
    common.write_run_config(cfg)
    logger = common.MetricsLogger(cfg.run_dir, enabled=d.is_main, resume_step=step if cfg.resume else None)
    common.print0(f"{len(train_examples)} train examples in {len(train_items)} rows, {len(eval_examples)} held out; "
                  f"{raw.num_params() / 1e6:.2f}M params; effective batch {effective_batch} "
                  f"({cfg.batch_size} x {cfg.grad_accum} accum x {d.world_size} ranks), lr {cfg.lr:.3g}, "
                  f"{total_steps} steps")

    def evaluate():
        if eval_items:
            loss = heldout_loss(model, cfg, eval_items, eval_collate, tok.pad_id, d)
            logger.log({"step": step, "eval_loss": loss})
            common.print0(f"step {step}: held-out loss {loss:.4f}")

    if step == 0:
        evaluate()
    meter = common.Throughput(raw.flops_per_token(cfg.max_seq_len), d.device, d.world_size)
    bar = common.progress_bar(total_steps, step, d.is_main and cfg.progress, "sft")
    model.train()
    while step < total_steps:
        meter.start()
        micro = [collate([train_items[i] for i in sampler.next_batch(cfg.batch_size)], tok.pad_id)
                 for _ in range(cfg.grad_accum)]
        # the denominator is known before any backward: count trained tokens over all micro-batches and ranks (on
        # the host, before the batches move to the device, so that counting waits for no copy)
        counts = torch.tensor([sum((b["labels"] != data.IGNORE_INDEX).sum().item() for b in micro),
                               sum(b["input_ids"].numel() for b in micro)], dtype=torch.float64, device=d.device)
        common.all_reduce_sum(counts)
        n_trained, n_processed = counts.tolist()
        micro = [{k: v.to(d.device) for k, v in b.items()} for b in micro]
        # mean: per trained token. sum: open-instruct's sum loss sums token losses within a micro-batch and
        # averages over micro-batches; with its per-device batch of 1 that is the sum per sequence, which is
        # what we divide by, so that it too does not depend on how the global batch is split (hence no packing).
        denom = max(n_trained, 1.0) if cfg.loss_reduction == "mean" else float(effective_batch)
        lr = common.lr_at(step, total_steps, cfg.lr, cfg.schedule, cfg.warmup_ratio, cfg.min_lr_ratio)
        common.set_lr(optimizer, lr)
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
        for i, batch in enumerate(micro):
            with common.grad_sync(model, i == len(micro) - 1):
                with common.autocast(d.device, cfg.precision):
                    loss = token_loss_sum(model, batch)
                # DDP / FSDP average gradients over ranks; x world_size turns that back into the global sum
                (loss * (d.world_size / denom)).backward()
            loss_sum += loss.detach().double()
        grad_norm = common.clip_grad(model, cfg.grad_clip, step + 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # per trained token under either loss_reduction, like the held-out loss (what sum optimises is scaled)
        train_loss = common.all_reduce_sum(loss_sum).item() / max(n_trained, 1.0)
        speed = meter.stop(n_processed)  # after the loss's .item(): the step's GPU work is done
        if step % cfg.log_every == 0 or step == total_steps:
            logger.log({"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                        "trained_tokens": int(n_trained), "epoch": step * effective_batch / len(train_items), **speed})
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed['tok_per_s']:.0f}",
                        **({"mfu": f"{speed['mfu']:.1%}"} if "mfu" in speed else {}))
        bar.update(1)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
            evaluate()
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total_steps):
            common.save_checkpoint(cfg.run_dir, step, model, optimizer, keep=cfg.keep_checkpoints,
                                   extra={"sampler": sampler.state_dict(), "config": common.config_dict(cfg),
                                          "data_digest": train_examples.digest})
    bar.close()
    tok.use_chat_template(cfg.template)  # written into tokenizer_config.json, so transformers users get it too
    path = common.save_final(cfg.run_dir, model, tok)
    common.print0(f"saved {path}")
    common.teardown_distributed()
    return cfg


if __name__ == "__main__":
    common.run_script(main, data.DataError, CheckpointError, FileNotFoundError, kernels.BackendError,
                      resumable=True)
