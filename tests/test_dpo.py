"""train_dpo.py: each loss against its formula, cached == live reference, 2 ranks == 1 rank, exact resume, the
reward model and DPO learning on the synthetic pairs, the over-length policy and bad inputs.

Everything runs a tiny random-init model (ModelConfig 'tiny') on a slice of data.make_demo_data."""
import copy
import glob
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import common
import data
import nanotulu_kernels as kernels
import train_dpo
from model import Transformer
from multirank import run_one_rank, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, write_tiny_demo_model):
    root = tmp_path_factory.mktemp("dpo")
    demo, tok, model = write_tiny_demo_model(root)
    return SimpleNamespace(root=root, tok=tok, model_dir=str(root / "model"), demo=demo,
                           train=write_jsonl(root / "train.jsonl", demo["pref_train"]),
                           small=write_jsonl(root / "small.jsonl", demo["pref_train"][:32]),
                           heldout=write_jsonl(root / "heldout.jsonl", demo["pref_heldout"]),
                           small_heldout=write_jsonl(root / "small_heldout.jsonl", demo["pref_heldout"][:16]))


def args_for(tiny, run_dir, *extra, data_file=None, eval_file=None):
    return [f"--config={os.path.join(ROOT, 'configs', 'dpo_demo.json')}", f"--model={tiny.model_dir}",
            f"--data={data_file or tiny.small}",
            f"--eval_data={eval_file or tiny.small_heldout}",
            f"--run_dir={run_dir}", f"--cache_dir={tiny.root / 'cache'}", "--batch_size=4", "--grad_accum=2",
            "--max_steps=4", "--lr=1e-3", "--warmup_ratio=0", "--max_seq_len=256", "--ref_batch_size=8",
            "--eval_every=0", "--log_every=1", "--progress=false", *extra]


def test_a_max_seq_len_past_the_models_positions_is_refused_before_training(tiny, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Write.", "chosen": "word " * 600, "rejected": "no"}])
    with pytest.raises(common.ConfigError, match=r"long.jsonl: the longest sequence has \d+ tokens, more than the "
                                                 r"model's max_position_embeddings \(512\)"):
        train_dpo.main(args_for(tiny, tmp_path / "run", "--max_seq_len=1024", "--eval_data=", data_file=long))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(run_dir):
    return [(m["step"], m["loss"]) for m in metrics(run_dir) if "loss" in m]


def assert_same_metrics(run_a, run_b, skip=()):
    """Every logged number but lr and epoch (which depend on the split) agrees, at every step; `skip` holds keys
    or (step, key) pairs left out."""
    a_rows, b_rows = metrics(run_a), metrics(run_b)
    assert [a["step"] for a in a_rows] == [b["step"] for b in b_rows]
    for a, b in zip(a_rows, b_rows):
        assert a.keys() == b.keys()
        for k in a:
            if k in ("lr", "epoch") or k in skip or (a["step"], k) in skip or not isinstance(a[k], float):
                continue
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["step"], k)


# For tests that compare two runs summing in another order (cached vs live reference, 1 vs 2 ranks). Adam divides
# each gradient element by its own RMS, so an element whose gradient is at rounding level moves by up to lr either
# way on rounding alone (seen on an AVX-512 AMD EPYC: one weight of 8,192 off by 2.6e-5 after 4 steps at lr 1e-3).
# A larger eps bounds what rounding can do to about lr x rounding / eps; larger gradients still get Adam's update.
ROUNDING_SAFE_ADAM = "--adam_eps=1e-4"


def final_weights(run_dir):
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def tiny_batch(tiny, n=3):
    rows = [train_dpo.normalize_demo(r) for r in tiny.demo["pref_train"][:n]]
    pairs = data.tokenize_preference(rows, tiny.tok, "tulu", 256, progress=False)
    return train_dpo.collate_pairs(pairs, list(range(n)), tiny.tok.pad_id)


@pytest.mark.parametrize("loss_type,label_smoothing", [("dpo", 0.0), ("dpo", 0.2), ("dpo_norm", 0.0),
                                                        ("dpo_norm", 0.1), ("simpo", 0.0), ("ipo", 0.0)])
def test_loss_types_match_formula(tiny, loss_type, label_smoothing):
    model = Transformer.from_pretrained(tiny.model_dir)
    batch = tiny_batch(tiny)
    B, beta, gamma = 3, 2.0, 0.7
    ref = torch.tensor([[-40.0, -45.0], [-52.0, -50.0], [-30.0, -38.0]])
    cfg = train_dpo.DPOConfig(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma)
    loss, stats = train_dpo.pair_loss(model, batch, ref, cfg)

    # by hand: full logits, log-softmax, the label's log-prob summed over the response tokens
    labels = batch["labels"]
    mask = labels != -100
    logp = torch.log_softmax(model(batch["input_ids"]).double(), -1)
    logp = (logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask).sum(1)
    n = mask.sum(1).double()
    pc, pr, rc, rr = logp[:B], logp[B:], ref[:, 0].double(), ref[:, 1].double()
    if loss_type != "dpo":
        pc, pr, rc, rr = pc / n[:B], pr / n[B:], rc / n[:B], rr / n[B:]
    z = (pc - pr) - (rc - rr)
    eps = label_smoothing
    expected = {"dpo": lambda: -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z),
                "dpo_norm": lambda: -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z),
                "simpo": lambda: -F.logsigmoid(beta * (pc - pr) - gamma),
                "ipo": lambda: (z - 1 / (2 * beta)) ** 2}[loss_type]().mean()
    chosen_reward = beta * pc if loss_type == "simpo" else beta * (pc - rc)
    rejected_reward = beta * pr if loss_type == "simpo" else beta * (pr - rr)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    got = train_dpo.summarize(stats)
    assert got["rewards_chosen"] == pytest.approx(chosen_reward.mean().item(), rel=1e-4, abs=1e-5)
    assert got["rewards_rejected"] == pytest.approx(rejected_reward.mean().item(), rel=1e-4, abs=1e-5)
    assert got["accuracy"] == pytest.approx((chosen_reward > rejected_reward).double().mean().item())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_lm_head_runs_in_the_autocast_dtype_for_policy_and_reference(tiny, monkeypatch):
    """The hidden states leave the model in fp32 (the residual stream is fp32 under autocast), so the fused loss
    must be called inside autocast to run its GEMMs in bf16; the reference pass and the loss alike."""
    seen = []
    real = kernels.reference.fused_linear_cross_entropy

    def spy(hidden, weight, *args):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *args)
    monkeypatch.setattr(kernels.reference, "fused_linear_cross_entropy", spy)
    model, batch = Transformer.from_pretrained(tiny.model_dir), tiny_batch(tiny)
    train_dpo.batch_logps(model, batch, torch.device("cpu"), "bf16")
    cfg = SimpleNamespace(objective="dpo", precision="bf16", loss_type="dpo_norm", beta=5.0, label_smoothing=0.0,
                          simpo_gamma=0.5)
    train_dpo.pair_loss(model, batch, torch.zeros(3, 2), cfg)
    assert len(seen) == 2 and set(seen) == {(torch.bfloat16, torch.bfloat16)}


def test_a_reward_under_bf16_autocast_is_read_out_in_fp32(tiny):
    """Autocast would run the [hidden] -> 1 readout in bf16: a reward near 10 on a grid of 1/16."""
    torch.manual_seed(0)
    rm = train_dpo.RewardModel(Transformer.from_pretrained(tiny.model_dir))
    with torch.no_grad():
        rm.score.weight.mul_(40)  # rewards of a few units, where bf16's steps are 1/64 to 1/16
    batch = tiny_batch(tiny)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rewards = rm(batch["input_ids"], batch["lengths"])
        hidden = rm.backbone(batch["input_ids"], return_hidden=True)
    last = hidden[torch.arange(6), batch["lengths"] - 1].float()
    assert rewards.abs().max() > 2 and torch.equal(rewards, last @ rm.score.weight[0])


def test_reward_model_loss_is_bradley_terry_at_last_token(tiny):
    torch.manual_seed(0)
    rm = train_dpo.RewardModel(Transformer.from_pretrained(tiny.model_dir))
    batch = tiny_batch(tiny)
    loss, _ = train_dpo.pair_loss(rm, batch, None, train_dpo.DPOConfig(objective="reward_model"))
    hidden = rm.backbone(batch["input_ids"], return_hidden=True)
    r = torch.stack([hidden[i, batch["lengths"][i] - 1] @ rm.score.weight[0] for i in range(6)])
    torch.testing.assert_close(loss, -F.logsigmoid(r[:3] - r[3:]).mean(), rtol=1e-5, atol=1e-6)
    # appending padding must not change a reward: it is read at the last real token
    padded = torch.cat([batch["input_ids"], torch.zeros(6, 5, dtype=torch.long)], 1)
    torch.testing.assert_close(rm(padded, batch["lengths"]), r, rtol=1e-5, atol=1e-5)


def test_a_broken_cached_reference_table_is_named(tiny, tmp_path):
    cache = tmp_path / "refcache"
    args = args_for(tiny, tmp_path / "run", f"--cache_dir={cache}", "--max_steps=1")
    train_dpo.main(args)
    table = next(p for p in cache.iterdir() if p.name.startswith("ref_logps-"))
    table.write_bytes(b"not safetensors")
    with pytest.raises(data.DataError, match=rf"{table.name}: the cached reference log-probs cannot be read .*delete "
                                           "the file"):
        train_dpo.main(args + ["--overwrite"])


def test_cached_reference_equals_live_reference(tiny, tmp_path, capsys):
    cached, live, again = tmp_path / "cached", tmp_path / "live", tmp_path / "again"
    tiny_cache = tmp_path / "refcache"
    train_dpo.main(args_for(tiny, cached, f"--cache_dir={tiny_cache}", ROUNDING_SAFE_ADAM))
    files = sorted(os.listdir(tiny_cache))
    assert sum(f.startswith("ref_logps-") for f in files) == 2  # train + held-out tables
    # the table holds what the frozen model gives on a training-sized batch, padded unlike the cache's chunks
    tables = [load_file(tiny_cache / f)["logps"] for f in files if f.startswith("ref_logps-")]
    table = next(t for t in tables if len(t) == 32)
    pairs = data.tokenize_preference(data.load_preference_rows(tiny.small), tiny.tok, "tulu", 256, progress=False)
    idx = [5, 17, 2, 30]
    batch = train_dpo.collate_pairs(pairs, idx, tiny.tok.pad_id)
    live_logps = train_dpo.batch_logps(Transformer.from_pretrained(tiny.model_dir), batch, torch.device("cpu"))
    torch.testing.assert_close(live_logps.view(2, -1).T, table[idx], rtol=1e-5, atol=1e-5)

    train_dpo.main(args_for(tiny, live, f"--cache_dir={tiny_cache}", "--reference_in_memory", ROUNDING_SAFE_ADAM))
    # Equal up to float rounding, not bitwise: the cache is computed in chunks of ref_batch_size pairs and the live
    # reference on each shuffled training batch, and other shapes (padding, rows) sum in another order. While the
    # policy still IS the reference (the step-0 eval, the step-1 training forwards) every reward is 0 live and
    # +-1e-8 cached, so accuracy = mean(chosen > rejected) is a coin flip there and carries no information; the
    # rewards and margins, compared with abs=1e-5, pin those rows instead. Once the policy has moved, margins are
    # far from rounding and accuracy must match too.
    at_reference = {(0, "eval_accuracy"), (1, "accuracy")}
    assert_same_metrics(cached, live, skip={"grad_norm", *at_reference})
    assert_same_weights(final_weights(cached), final_weights(live), atol=1e-5)
    # With the live reference those rewards are exactly 0, a tie, and a tie is not a correctly ranked pair (the
    # accuracy counts chosen > rejected strictly, as open-instruct and TRL do)
    eval0, train1 = metrics(live)[:2]
    assert (eval0["step"], train1["step"]) == (0, 1)
    assert eval0["eval_rewards_chosen"] == eval0["eval_rewards_rejected"] == train1["rewards_chosen"] == \
        train1["rewards_rejected"] == 0.0
    assert eval0["eval_accuracy"] == train1["accuracy"] == 0.0
    capsys.readouterr()
    train_dpo.main(args_for(tiny, again, f"--cache_dir={tiny_cache}", "--max_steps=1"))  # a second run reuses it
    assert "reference log-probs (train): cached in" in capsys.readouterr().out
    assert sorted(os.listdir(tiny_cache)) == files


@pytest.mark.parametrize("compiled", [[], ["--compile=true"]], ids=["eager", "compiled"])
def test_a_live_bf16_reference_holds_bf16_matmul_weights_and_gives_rewards_of_exactly_0_at_the_start(tiny, tmp_path,
                                                                                                   monkeypatch,
                                                                                                   compiled):
    """Compiled, the reference is compiled too: compiled kernels round bf16 otherwise than eager ones."""
    frozen = []
    frozen_copy = common.frozen_copy
    monkeypatch.setattr(common, "frozen_copy", lambda *args: frozen.append(frozen_copy(*args)) or frozen[-1])
    run = tmp_path / "run"
    train_dpo.main(args_for(tiny, run, "--precision=bf16", "--reference_in_memory", "--max_steps=1", *compiled))
    assert frozen[0].layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    eval0, train1 = metrics(run)[:2]
    assert eval0["eval_rewards_chosen"] == eval0["eval_rewards_rejected"] == train1["rewards_chosen"] == \
        train1["rewards_rejected"] == 0.0


def test_simpo_runs_no_reference_pass(tiny, tmp_path, capsys):
    """SimPO's loss reads no reference, so a run computes and caches none, and a live one is refused."""
    cache = tmp_path / "cache"
    train_dpo.main(args_for(tiny, tmp_path / "run", f"--cache_dir={cache}", "--loss_type=simpo", "--beta=2"))
    out = capsys.readouterr().out
    assert "simpo beta=2.0 reference=none" in out and "reference log-probs" not in out
    assert not cache.exists() or not any(f.startswith("ref_logps-") for f in os.listdir(cache))
    losses = [loss for _, loss in train_losses(tmp_path / "run")]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)  # -log sigmoid(...) > 0, logged every step
    with pytest.raises(common.ConfigError, match="--reference_in_memory=True: simpo's loss has no reference model"):
        train_dpo.main(args_for(tiny, tmp_path / "live", "--loss_type=simpo", "--reference_in_memory=true"))


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank(tiny, tmp_path, wrap):
    """Under FSDP2 the cached reference pass runs through the sharded model before the optimizer is built, and a
    checkpoint is saved after it: the embedding and final norm must still train, and saving must work."""
    one, two = tmp_path / "one", tmp_path / "two"
    # 5 held-out pairs in batches of 2: rank 0 takes pairs 0, 2 then 4, rank 1 takes 1, 3 then none, and its
    # throwaway batch (which keeps FSDP's collectives in step) must count for nothing
    heldout = write_jsonl(tmp_path / "heldout5.jsonl", tiny.demo["pref_heldout"][:5])
    train_dpo.main(args_for(tiny, one, "--batch_size=2", "--grad_accum=2", f"--cache_dir={tmp_path / 'c1'}",
                            ROUNDING_SAFE_ADAM, eval_file=heldout))
    sharded = ["--fsdp=true", "--checkpoint_every=2"] if wrap == "fsdp" else []
    out = torchrun("train_dpo.py", args_for(tiny, two, "--batch_size=2", "--grad_accum=1",
                                            f"--cache_dir={tmp_path / 'c2'}", ROUNDING_SAFE_ADAM, *sharded,
                                            eval_file=heldout))
    assert "effective batch 4 pairs (2 x 1 accum x 2 ranks)" in out
    # the reference tables (sharded over ranks, then all-reduced) are identical to the one-process tables
    def tables(cache):
        return sorted((load_file(cache / n)["logps"] for n in os.listdir(cache) if n.startswith("ref_logps-")), key=len)
    for a, b in zip(tables(tmp_path / "c1"), tables(tmp_path / "c2"), strict=True):
        assert torch.equal(a, b)
    l1, l2 = train_losses(one), train_losses(two)
    assert [s for s, _ in l1] == [s for s, _ in l2] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(l1, l2):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    # the gradient norm too: Adam and clipping hide from the weights a gradient scaled by a constant (1 rank
    # accumulates 2 micro-batches, 2 ranks 1). The step-0 and step-1 accuracies compare rewards within rounding of
    # 0 (the policy is still the reference), computed in other batches here than there: a coin flip.
    assert_same_metrics(one, two, skip={(0, "eval_accuracy"), (1, "accuracy")})
    assert [m["step"] for m in metrics(one) if "eval_loss" in m] == [0, 4]
    assert_same_weights(final_weights(one), final_weights(two), atol=1e-5)


FSDP_REWARD_MODEL_SAVE = """
    from safetensors.torch import load_file
    import common, train_dpo
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    rm = train_dpo.RewardModel(Transformer(ModelConfig.from_preset("tiny")))
    expected = {k: v.clone() for k, v in rm.state_dict().items()}
    for block in rm.layers:  # as common.wrap_model shards it under --fsdp=true
        fully_shard(block)
    fully_shard(rm)
    common.save_final(RUN, rm)
    saved = train_dpo.RewardModel(Transformer.from_pretrained(os.path.join(RUN, "final")))
    saved.score.load_state_dict({"weight": load_file(os.path.join(RUN, "final", common.VALUE_HEAD))["score.weight"]})
    print("same weights:", all(torch.equal(v, expected[k]) for k, v in saved.state_dict().items()))
"""


def test_a_reward_model_sharded_by_fsdp2_saves_its_final_backbone_and_score_head(tmp_path):
    """save_final gathers the shards into a fresh copy of the model, which for a reward model is one built from a
    backbone (it took the config and failed, after all the training)."""
    out, err = run_one_rank(FSDP_REWARD_MODEL_SAVE, tmp_path)
    assert "same weights: True" in out, out[-2000:] + err[-3000:]


def test_accumulated_micro_batches_equal_one_batch_of_the_same_pairs(tiny, tmp_path):
    """grad_accum=2 x 2 pairs trains on the same 4 pairs per step as 1 x 4: the same update, which is the mean
    over the step's pairs (the gradient norm shows a scale that Adam and clipping hide from the weights)."""
    big, micro = tmp_path / "big", tmp_path / "micro"
    train_dpo.main(args_for(tiny, big, "--batch_size=4", "--grad_accum=1", "--max_steps=2", "--eval_data=",
                            ROUNDING_SAFE_ADAM))
    train_dpo.main(args_for(tiny, micro, "--batch_size=2", "--grad_accum=2", "--max_steps=2", "--eval_data=",
                            ROUNDING_SAFE_ADAM))
    assert [m["step"] for m in metrics(micro)] == [1, 2]
    assert_same_metrics(big, micro, skip={(1, "accuracy")})  # step 1's: a coin flip, as above
    assert_same_weights(final_weights(big), final_weights(micro), atol=1e-5)


def test_final_records_the_chat_template_the_pairs_were_rendered_with(tiny, tmp_path, capfd):
    assert data.Tokenizer.from_pretrained(tiny.model_dir).chat_template == data.TULU_TEMPLATE
    train_dpo.main(args_for(tiny, tmp_path / "run", "--template=chatml", "--max_steps=1"))
    assert data.Tokenizer.from_pretrained(str(tmp_path / "run" / "final")).chat_template == data.CHATML_TEMPLATE
    # a new template: the pairs were tokenized and the reference computed afresh, without bars (--progress=false)
    err = capfd.readouterr().err
    assert "%|" not in err, err


def test_run_config_records_the_template_the_model_was_saved_with(tiny, tmp_path):
    train_dpo.main(args_for(tiny, tmp_path / "run", "--template=", "--max_steps=1", "--eval_data="))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["template"] == "tulu"


def test_interrupt_and_resume_equals_uninterrupted(tiny, tmp_path):
    run = tmp_path / "run"
    args = args_for(tiny, run, "--checkpoint_every=2", "--keep_checkpoints=3", "--max_steps=6")
    train_dpo.main(args)
    full_metrics, full_weights = metrics(run), final_weights(run)
    # the interruption: everything after step 4 is gone
    shutil.rmtree(run / "checkpoints" / "step_0000006")
    shutil.rmtree(run / "final")
    train_dpo.main(args + ["--resume"])
    assert metrics(run) == full_metrics
    assert_same_weights(final_weights(run), full_weights, atol=0)


def test_a_refused_resume_stops_before_tokenizing_and_the_reference_pass(tiny, tmp_path, monkeypatch,
                                                                        retrain_in_place):
    sft = tmp_path / "sft"
    shutil.copytree(tiny.model_dir, sft)
    args = args_for(tiny, tmp_path / "run", "--checkpoint_every=2", "--max_steps=2", f"--model={sft}")
    train_dpo.main(args)
    monkeypatch.setattr(train_dpo, "load_pairs", lambda *a: pytest.fail("tokenized before refusing the resume"))
    with pytest.raises(common.ConfigError, match=r"other settings \(beta: 5.0 then, 0.25 now\)"):
        train_dpo.main(args + ["--resume", "--beta=0.25"])
    retrain_in_place(sft)
    with pytest.raises(common.ConfigError, match=rf"the model at --model={sft} .* is not the one the run"):
        train_dpo.main(args + ["--resume"])


def test_pairs_edited_in_place_or_too_few_for_a_step_are_refused_before_the_reference_pass(tiny, tmp_path,
                                                                                           monkeypatch):
    pairs = [train_dpo.normalize_demo(r) for r in tiny.demo["pref_train"][:32]]
    rows = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    args = args_for(tiny, tmp_path / "run", "--checkpoint_every=1", "--max_steps=2", data_file=rows)
    train_dpo.main(args)
    shutil.rmtree(tmp_path / "run" / "final")
    pairs[5]["chosen"][0]["content"] += " (edited)"  # as many pairs, in the same file
    write_jsonl(rows, pairs)
    monkeypatch.setattr(train_dpo, "reference_logps", lambda *a: pytest.fail("the reference pass ran first"))
    with pytest.raises(common.ConfigError, match=r"--resume: the training rows \(--data=\S*pairs.jsonl\) are not "):
        train_dpo.main(args + ["--resume"])
    # Tulu 3's batch of 128 pairs from 32
    with pytest.raises(common.ConfigError, match=r"the data has 32 items, fewer than one optimizer step takes"):
        train_dpo.main(args_for(tiny, tmp_path / "big", "--max_steps=0", "--total_batch_size=128", data_file=rows))


def test_resume_refuses_a_starting_model_retrained_since(tiny, tmp_path, retrain_in_place):
    """The reference log-probs come from --model, recomputed on resume: retrained weights at the same path would
    silently give the rest of the run another reference."""
    sft = tmp_path / "sft"
    shutil.copytree(tiny.model_dir, sft)
    args = args_for(tiny, tmp_path / "run", "--checkpoint_every=2", "--max_steps=2", f"--model={sft}")
    train_dpo.main(args)
    retrain_in_place(sft)
    refused = rf"the model at --model={sft} \(its weights or config.json\) is not the one the run"
    with pytest.raises(common.ConfigError, match=refused):
        train_dpo.main(args + ["--resume"])


def test_a_config_edited_in_place_is_another_reference(tiny, tmp_path):
    """rope_theta lives in config.json, not in the weights: correcting it in place must not reuse the cached
    reference log-probs of the old config, nor resume a run that started from the old one."""
    sft = tmp_path / "sft"
    shutil.copytree(tiny.model_dir, sft)
    args = args_for(tiny, tmp_path / "run", "--checkpoint_every=2", "--max_steps=2", f"--model={sft}",
                    f"--cache_dir={tmp_path / 'cache'}")
    train_dpo.main(args)
    cached = set(glob.glob(str(tmp_path / "cache" / "ref_logps-*")))
    config = json.loads((sft / "config.json").read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"] = 500.0
    (sft / "config.json").write_text(json.dumps(config))
    with pytest.raises(common.ConfigError, match=rf"the model at --model={sft} \(its weights or config.json\)"):
        train_dpo.main(args + ["--resume"])
    train_dpo.main(args + ["--overwrite"])
    # the train and held-out tables computed anew
    assert len(set(glob.glob(str(tmp_path / "cache" / "ref_logps-*"))) - cached) == len(cached) == 2


def test_reference_cache_is_keyed_on_every_setting_that_moves_the_log_probs(tiny, tmp_path, monkeypatch):
    """A cached reference table serves only a run that would compute the same numbers. The model, the data, the
    template and max_seq_len (the tokens of each pair), ref_batch_size (the padding of its chunks), the precision
    and the kernel backend each change them, so each computes and writes a table of its own."""
    d = common.setup_distributed("cpu")
    rows = [train_dpo.normalize_demo(r) for r in tiny.demo["pref_train"][:4]]
    edited = copy.deepcopy(rows)  # one answer's number changed: other tokens, the same trained positions
    assert edited[3]["rejected"][0]["content"] == "16 + 8 = 22\n#### 22"
    edited[3]["rejected"][0]["content"] = "16 + 8 = 23\n#### 23"
    policy = Transformer.from_pretrained(tiny.model_dir)
    retrained = Transformer.from_pretrained(tiny.model_dir)
    with torch.no_grad():
        retrained.norm.weight += 1e-3

    def table(model=policy, rows=rows, template="tulu", max_seq_len=256, **settings):
        pairs = data.tokenize_preference(rows, tiny.tok, template, max_seq_len, progress=False)
        cfg = train_dpo.DPOConfig(cache_dir=str(tmp_path), progress=False,
                                  **{"ref_batch_size": 4, "precision": "fp32", **settings})
        return train_dpo.reference_logps(model, common.weights_digest(model), pairs, cfg, d, tiny.tok.pad_id, "train")

    def written():
        return len(list(tmp_path.glob("ref_logps-*")))

    base = table()
    assert torch.equal(table(), base) and written() == 1  # the same settings read it back
    longest = [max(len(p["chosen"][0]), len(p["rejected"][0]))
               for p in data.tokenize_preference(rows, tiny.tok, "tulu", 256, progress=False)]
    changes = {"weights": {"model": retrained}, "data": {"rows": edited}, "template": {"template": "chatml"},
               "max_seq_len": {"max_seq_len": min(longest) - 1},  # every prompt cut from the left
               "ref_batch_size": {"ref_batch_size": 3}, "precision": {"precision": "bf16"}}
    for n, (name, change) in enumerate(changes.items(), 2):
        table(**change)
        assert written() == n, f"{name} changed, yet the cached table was reused"
    monkeypatch.setenv("NANOTULU_KERNELS", "triton")
    table()
    assert written() == len(changes) + 2, "kernel backend changed, yet the cached table was reused"


def test_reference_pass_batches_pairs_of_similar_length_and_keeps_each_pairs_row(tiny, tmp_path, monkeypatch):
    """The reference pass pads each chunk to its longest sequence, so it groups pairs by length (longest first) rather
    than in dataset order; each pair's log-probs still land in its own row of the table."""
    d = common.setup_distributed("cpu")
    pairs = data.tokenize_preference(data.load_preference_rows(tiny.small), tiny.tok, "tulu", 256, progress=False)
    longest = [max(len(p["chosen"][0]), len(p["rejected"][0])) for p in pairs]
    model = Transformer.from_pretrained(tiny.model_dir)
    widths = []
    batch_logps = train_dpo.batch_logps
    monkeypatch.setattr(train_dpo, "batch_logps",
                        lambda m, batch, *a: widths.append(batch["input_ids"].shape[1]) or batch_logps(m, batch, *a))

    def table(ref_batch_size):
        cfg = train_dpo.DPOConfig(cache_dir=str(tmp_path / str(ref_batch_size)), ref_batch_size=ref_batch_size,
                                  progress=False)
        return train_dpo.reference_logps(model, common.weights_digest(model), pairs, cfg, d, tiny.tok.pad_id, "t")

    chunked = table(4)
    by_length = sorted(longest, reverse=True)
    assert widths == by_length[::4]
    in_dataset_order = [max(longest[i:i + 4]) for i in range(0, len(longest), 4)]
    assert sum(in_dataset_order) > sum(widths) * 1.1  # the data leaves padding to save, so the test can tell
    widths.clear()
    one_by_one = table(1)
    assert widths == by_length
    torch.testing.assert_close(chunked, one_by_one, rtol=1e-5, atol=1e-5)


def test_dpo_raises_heldout_preference_accuracy(tiny, tmp_path):
    # Held out: the constraint pairs. A 2-layer random-init model cannot learn arithmetic in seconds, and arithmetic
    # pairs differ only in the final number, so on them accuracy stays at chance (measured 0.50 -> 0.53) and would
    # only dilute the signal. Constraint pairs are learnable from the training pairs' surface form: the random init
    # sits anywhere from 0.19 to 0.78 (model seeds 0-3; 0.78 for seed 0) and one epoch of Tulu's dpo_norm, beta 5,
    # reached 0.97-1.00 for every model and sampler seed tried.
    heldout = [r for r in tiny.demo["pref_heldout"] if r["source"] == "demo_constraint"]
    run = tmp_path / "dpo"
    train_dpo.main(args_for(tiny, run, "--max_steps=32", "--eval_every=32", "--lr=3e-3", "--beta=5",
                            data_file=tiny.train, eval_file=write_jsonl(tmp_path / "constraint.jsonl", heldout)))
    evals = [m for m in metrics(run) if "eval_loss" in m]
    before, after = evals[0], evals[-1]
    assert len(heldout) == 32 and (before["step"], after["step"]) == (0, 32)
    assert after["eval_loss"] < before["eval_loss"] - 0.3
    # eval.py's pref_acc (mean response log-prob, chosen > rejected): >= 29 of 32 has p < 1e-5 under chance
    assert after["eval_policy_accuracy"] >= 0.9
    assert after["eval_policy_accuracy"] > before["eval_policy_accuracy"] + 0.15
    assert after["eval_accuracy"] >= 0.9  # implicit-reward accuracy (~0 at step 0: all rewards are 0)


def test_reward_model_beats_chance_and_saves_value_head(tiny, tmp_path):
    run = tmp_path / "rm"
    train_dpo.main(args_for(tiny, run, "--objective=reward_model", "--max_steps=32", "--lr=3e-3",
                            data_file=tiny.train, eval_file=tiny.heldout))
    evals = [m for m in metrics(run) if "eval_accuracy" in m]
    assert evals[-1]["step"] == 32
    assert evals[-1]["eval_accuracy"] >= 0.7  # 64 held-out pairs: chance is 0.5
    head = load_file(run / "final" / common.VALUE_HEAD)
    backbone = Transformer.from_pretrained(str(run / "final"))
    assert head["score.weight"].shape == (1, backbone.config.hidden_size)
    # the documented readout reproduces the trained reward model's scores
    rm = train_dpo.RewardModel(Transformer.from_pretrained(str(run / "final")))
    rm.score.weight.data.copy_(head["score.weight"])
    batch = tiny_batch(tiny)
    hidden = backbone(batch["input_ids"], return_hidden=True)
    last = hidden[torch.arange(6), batch["lengths"] - 1]
    torch.testing.assert_close(rm(batch["input_ids"], batch["lengths"]), (last @ head["score.weight"].T)[:, 0])


def test_overlong_prompts_truncated_left_or_dropped_and_reported(tiny, capsys, caplog):
    long_prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(300))}]
    rows = [train_dpo.normalize_demo(r) for r in tiny.demo["pref_train"][:3]]
    rows.append({"prompt": long_prompt, "chosen": [{"role": "assistant", "content": "yes it is."}],
                 "rejected": [{"role": "assistant", "content": "No"}]})
    d = common.setup_distributed("cpu")
    cfg = train_dpo.DPOConfig(max_seq_len=128, truncation="left", cache_dir="", template="tulu")
    pairs = train_dpo.tokenize(cfg, tiny.tok, rows, "train", d)
    assert "train preference pairs: 4 of 4 kept\n" in capsys.readouterr().out
    assert "1 train preference pairs fill max_seq_len=128: longer ones lost their oldest prompt tokens" in caplog.text
    batch = train_dpo.collate_pairs(pairs, [3], tiny.tok.pad_id)
    assert batch["input_ids"].shape[1] == 128
    # the prompt lost its beginning, the response is intact and is all that is trained
    trained = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert tiny.tok.decode(trained, skip_special_tokens=False) == "yes it is." + tiny.tok.eos_token
    cfg = train_dpo.DPOConfig(max_seq_len=128, truncation="drop", cache_dir="", template="tulu")
    caplog.clear()
    assert len(train_dpo.tokenize(cfg, tiny.tok, rows, "train", d)) == 3
    assert "train preference pairs: 3 of 4 kept\n" in capsys.readouterr().out
    assert "dropped 1 train preference pairs longer than 128 tokens (truncation='drop')" in caplog.text
    # Tulu 3's cut at each side's end keeps the whole prompt, which here leaves no response token: dropped too
    cfg = train_dpo.DPOConfig(max_seq_len=128, truncation="right", cache_dir="", template="tulu")
    caplog.clear()
    assert len(train_dpo.tokenize(cfg, tiny.tok, rows, "train", d)) == 3
    assert "train preference pairs: 3 of 4 kept\n" in capsys.readouterr().out
    assert "dropped 1 train preference pairs longer than 128 tokens that had no response token left when cut" in caplog.text


def test_only_final_assistant_turn_is_trained(tiny):
    rows = [{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                        {"role": "user", "content": "and now?"}],
             "chosen": [{"role": "assistant", "content": "now this"}],
             "rejected": [{"role": "assistant", "content": "that"}]}]
    pairs = data.tokenize_preference(rows, tiny.tok, "tulu", 256, progress=False)
    batch = train_dpo.collate_pairs(pairs, [0], tiny.tok.pad_id)
    for row, text in ((0, "now this"), (1, "that")):
        trained = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert tiny.tok.decode(trained, skip_special_tokens=False) == text + tiny.tok.eos_token


def test_bad_inputs_give_clear_errors(tiny, tmp_path, monkeypatch):
    good = tiny.demo["pref_train"][0]
    bad = dict(good, rejected=[{"role": "user", "content": "something else"}] + good["rejected"][1:])
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(data.DataError, match="bad.jsonl.*(line|row) 2.*prompts differ"):
        train_dpo.main(args_for(tiny, tmp_path / "run", data_file=path))
    with pytest.raises(common.ConfigError, match="loss_type must be one of .* got 'kto'"):
        train_dpo.main(args_for(tiny, tmp_path / "run", "--loss_type=kto"))
    with pytest.raises(common.ConfigError, match="--simpo_gamma=1.0: only --objective=dpo with --loss_type=simpo"):
        train_dpo.main(args_for(tiny, tmp_path / "run", "--simpo_gamma=1.0"))
    with pytest.raises(common.ConfigError, match="--reference_in_memory=True: a reward model has no reference"):
        train_dpo.main(args_for(tiny, tmp_path / "run", "--objective=reward_model", "--reference_in_memory=true"))
    with pytest.raises(common.ConfigError, match=r"label_smoothing must be in \[0, 0.5\)"):
        train_dpo.main(args_for(tiny, tmp_path / "run", "--loss_type=dpo", "--label_smoothing=1.0"))
    with pytest.raises(common.ConfigError, match="truncation"):
        train_dpo.main(args_for(tiny, tmp_path / "run", "--truncation=middle"))
    with pytest.raises(common.ConfigError, match=r"--eval_split=0.2: not used with --eval_data"):
        train_dpo.main(args_for(tiny, tmp_path / "run", "--eval_split=0.2"))
    with pytest.raises(data.DataError, match=r"none of its \d+ training pairs fits max_seq_len=16 \(truncation=drop\)"):
        train_dpo.main(args_for(tiny, tmp_path / "run", "--max_seq_len=16", "--truncation=drop"))
    missing = str(tmp_path / "sft_demo" / "final")
    monkeypatch.setattr(train_dpo, "DEMO_MODEL", missing)
    with pytest.raises(FileNotFoundError, match="python train_sft.py"):
        train_dpo.main(args_for(tiny, tmp_path / "run", f"--model={missing}"))


def test_demo_dpo_raises_preference_accuracy_without_lowering_task_accuracy(demo_sft_model, tmp_path):
    """DPO with the demo preset from a demo SFT model, scored by eval.py on the held-out split (100 arithmetic
    problems, 100 constraint prompts, 200 pairs): preference accuracy must rise clearly and the verified task
    accuracies must not fall beyond noise: 10 points, two standard errors on 100 examples. Measured with PyTorch's
    AVX2, AVX-512 and scalar CPU kernels (ATEN_CPU_CAPABILITY), whose rounding trains another SFT model: preference
    +0.375, +0.325, +0.32; constraints +0.41, +0.37, +0.33; arithmetic -0.02, -0.01, -0.03."""
    import eval as evaluation
    demo = data.make_demo_data(0)
    before = evaluation.evaluate_demo(*evaluation.load_model_and_tokenizer(demo_sft_model), demo)
    train_dpo.main([f"--model={demo_sft_model}", f"--run_dir={tmp_path / 'dpo'}", "--progress=false",
                    "--eval_every=0", f"--cache_dir={tmp_path / 'cache'}"])
    after = evaluation.evaluate_demo(*evaluation.load_model_and_tokenizer(str(tmp_path / "dpo" / "final")), demo)
    assert after["pref_acc"] >= before["pref_acc"] + 0.15, (before, after)
    assert after["arith_acc"] >= before["arith_acc"] - 0.1, (before, after)
    assert after["constraint_acc"] >= before["constraint_acc"] - 0.1, (before, after)


def test_fsdp_bf16_reference_matches_the_policy_at_step_0(tiny, tmp_path):
    """FSDP2 under bf16 computes with bf16 copies of the parameters, so the reference must be computed through the
    same wrapping (CPU bf16 stands in for the GPU recipe). Computed from the fp32 parameters under autocast instead,
    the step-0 rewards were up to 2.7e-4 here; through the wrapped model they are 0 for the live reference and
    within 2.7e-5 for the cached one (its chunks are padded unlike the training batches). 12-pair chunks do not
    divide evenly over the ranks, so one rank runs a throwaway forward to keep FSDP's all-gathers in step."""
    # that autocast table is in the cache first (one process, bf16): the sharded run must not take it for its own
    cache = tmp_path / "cache"
    pairs = data.tokenize_preference(data.load_preference_rows(tiny.small), tiny.tok, "tulu", 256, progress=False)
    model = Transformer.from_pretrained(tiny.model_dir)
    cfg = train_dpo.DPOConfig(cache_dir=str(cache), ref_batch_size=12, precision="bf16", progress=False)
    train_dpo.reference_logps(model, common.weights_digest(model), pairs, cfg, common.setup_distributed("cpu"),
                              tiny.tok.pad_id, "train")
    for mode, tolerance in (("live", 0.0), ("cached", 1e-4)):
        run = tmp_path / mode
        torchrun("train_dpo.py", args_for(tiny, run, "--batch_size=2", "--grad_accum=1", "--fsdp=true",
                                          "--precision=bf16", "--max_steps=1", f"--cache_dir={cache}",
                                          "--ref_batch_size=12", *(["--reference_in_memory"] if mode == "live" else [])))
        eval0, train1 = metrics(run)[:2]
        assert (eval0["step"], train1["step"]) == (0, 1) and "eval_loss" in eval0 and "loss" in train1
        # the policy has not moved during step 0's evaluation nor during step 1's forwards
        at_reference = [eval0["eval_rewards_chosen"], eval0["eval_rewards_rejected"],
                        train1["rewards_chosen"], train1["rewards_rejected"]]
        assert max(abs(r) for r in at_reference) <= tolerance, (mode, at_reference)
    assert len(list(cache.glob("ref_logps-*"))) == 3  # the autocast table, the sharded run's train and held-out
    with open(tmp_path / "cached" / "config.json") as f:
        assert json.load(f)["precision"] == "bf16"
