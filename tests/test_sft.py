"""train_sft.py end to end on a tiny model and tiny data: the loss weighting, 2 ranks vs 1, resume, the final save,
and the demo preset. Runs the real entry point (main) in-process, and under torchrun for the 2-rank cases."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import common
import data
import nanotulu_kernels as kernels
import train_sft
from model import ModelConfig, Transformer
from multirank import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny model (HF folder with its tokenizer) and 48 + 5 demo conversations as jsonl files."""
    root = tmp_path_factory.mktemp("sft")
    demo = data.make_demo_data(seed=1, n_train=48, n_heldout=7)
    # 5 held-out rows: on 2 ranks in batches of 2, rank 0 takes rows 0, 2 then 4, and rank 1 takes rows 1, 3 then
    # none, so its last forward (which keeps FSDP's collectives in step) must count for nothing
    for split, rows in (("train", demo["sft_train"]), ("heldout", demo["sft_heldout"][:5])):
        with open(root / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    tok = data.build_demo_tokenizer(demo, vocab_size=320)
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).save_pretrained(
        str(root / "base"), tokenizer=tok)
    return root


def args(setup, run, **overrides):
    # adam_eps=1e-5 instead of 1e-8: these tests compare runs that sum the same gradients in another order.
    # Adam's step is lr * g / (|g| + eps), whose slope in g is up to lr / eps, so with eps=1e-8 an element whose
    # gradient is ~1e-9 (down_proj[56, 25] at step 1 here) turns float32 rounding noise of ~1e-10 into weight
    # differences of ~1e-5 (measured: 1.3e-5 and 4.9e-5), which later steps' gradients then inherit. With
    # eps=1e-5 the slope is at most lr / eps = 300, so rounding noise stays below 1e-6 in the weights, while the
    # typical gradient (~3e-4) is still well above eps: the update stays Adam's, not a plain SGD one.
    base = {"config": os.path.join(ROOT, "configs", "sft_demo.json"), "model": setup / "base",
            "data": setup / "train.jsonl", "eval_data": setup / "heldout.jsonl", "run_dir": setup / run,
            "max_seq_len": 96, "lr": 3e-3, "warmup_ratio": 0.0, "max_steps": 4, "eval_every": 0, "log_every": 1,
            "progress": False, "cache_dir": "", "packing": False, "adam_eps": 1e-5}
    return [f"--{k}={v}" for k, v in {**base, **overrides}.items()]


def losses(run_dir):
    """Per-step train loss, held-out loss and global gradient norm (before clipping) of a run."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {(r["step"], key): r[key] for r in rows for key in ("loss", "eval_loss", "grad_norm") if key in r}


def weights(run_dir):
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def assert_same_run(a, b, rtol=1e-5, atol=1e-5):
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() and len(la) > 0
    for step, key in la:
        assert la[step, key] == pytest.approx(lb[step, key], rel=rtol), f"{key} differs at step {step}"
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def train_on_ranks(setup, run, nproc, **overrides):
    torchrun("train_sft.py", args(setup, run, **overrides), nproc=nproc, timeout=240)


def test_a_model_without_data_or_data_without_a_model_is_an_error_not_the_demo(setup):
    # the demo data brings its own tokenizer: a real model's embeddings would silently train on other token ids
    with pytest.raises(common.ConfigError, match="without --data: its tokenizer is not the demo's"):
        train_sft.main(args(setup, "nodata", data="", eval_data=""))
    with pytest.raises(common.ConfigError, match="--data needs --model"):
        train_sft.main(args(setup, "nomodel", model=""))
    with pytest.raises(common.ConfigError, match="loss_reduction=sum with packing=true"):
        train_sft.main(args(setup, "sum_packed", loss_reduction="sum", packing=True))
    # the demo's own held-out split and tokenizer would be used instead of these
    with pytest.raises(common.ConfigError, match=r"--eval_data=\S*heldout.jsonl: not used without --data"):
        train_sft.main(args(setup, "demo", data="", model=""))


def test_a_model_trained_from_scratch_on_data_takes_its_tokenizers_special_ids(setup, tmp_path):
    """Without --model the demo architecture is built; its bos/eos ids are the tokenizer's, not the preset's 0,
    which generation would otherwise stop at (eval, RLVR and transformers read generation_config.json)."""
    from transformers import AutoConfig, GenerationConfig
    data.Tokenizer.from_pretrained(str(setup / "base"), eos_token="<|im_end|>").save_pretrained(str(tmp_path / "tok"))
    train_sft.main(args(setup, "scratch", model="", tokenizer=tmp_path / "tok", max_steps=1))
    final = str(setup / "scratch" / "final")
    im_end = data.Tokenizer.from_pretrained(final).token_to_id("<|im_end|>")
    assert im_end != 0
    assert GenerationConfig.from_pretrained(final).eos_token_id == AutoConfig.from_pretrained(final).eos_token_id \
        == im_end
    assert data.stop_token_ids(data.Tokenizer.from_pretrained(final), "tulu") == [im_end]


def test_a_model_trained_on_the_demo_trains_further_on_it(demo_sft_model, tmp_path):
    """What the refusal to resume a finished run suggests (a new run from its final/), for the demo too: a model
    whose tokenizer is the demo's continues on the demo data, from its weights and, with --template=, in its own
    template (here chatml, where the demo's is tulu, with the eos <|im_end|> that SFT in chatml saves)."""
    import shutil

    from safetensors.torch import load_file
    start = tmp_path / "start"
    shutil.copytree(demo_sft_model, start)
    config = json.loads((start / "tokenizer_config.json").read_text())
    (start / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": data.CHATML_TEMPLATE,
                                                            "eos_token": "<|im_end|>"}))
    train_sft.main([f"--model={start}", f"--run_dir={tmp_path / 'run'}", "--max_steps=1", "--lr=1e-7",
                    "--warmup_ratio=0", "--template=", "--progress=false", "--cache_dir=", "--eval_every=0"])
    before, after = load_file(start / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    for k in before:  # one step of lr 1e-7 from the given weights, not from a fresh initialisation
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-5)
    saved = json.loads((tmp_path / "run" / "final" / "tokenizer_config.json").read_text())
    assert (saved["chat_template"], saved["eos_token"]) == (data.CHATML_TEMPLATE, "<|im_end|>")


def test_a_loss_reduction_other_than_mean_or_sum_is_refused(setup):
    with pytest.raises(common.ConfigError, match=r"loss_reduction='token': expected mean or sum"):
        train_sft.main(args(setup, "token_loss", loss_reduction="token"))


def test_data_with_nothing_to_train_within_max_seq_len_is_an_error_naming_it(setup):
    with pytest.raises(data.DataError, match=r"data=\S*train.jsonl: none of its \d+ rows has a trained token within "
                                             r"max_seq_len=8"):
        train_sft.main(args(setup, "short", max_seq_len=8, eval_data=""))


def test_a_max_seq_len_past_the_models_positions_is_refused_before_training(setup, tmp_path):
    """The tiny model has 512 positions: a 600-word answer kept whole by --max_seq_len=1024 would fail inside the
    model (an IndexError on CPU, a device-side assert on GPU) after the data was loaded."""
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"messages": [{"role": "user", "content": "Write."},
                                             {"role": "assistant", "content": "word " * 600}]}) + "\n")
    with pytest.raises(common.ConfigError, match=r"long.jsonl: the longest sequence has \d+ tokens, more than the "
                                                 r"model's max_position_embeddings \(512\); set --max_seq_len=512"):
        train_sft.main(args(setup, "long", data=long, eval_data="", max_seq_len=1024))


def test_packed_rows_give_the_same_loss_as_padded_rows(setup):
    cfg = train_sft.SFTConfig(max_seq_len=96)
    tok = data.Tokenizer.from_pretrained(str(setup / "base"))
    examples = data.tokenize_sft(data.load_sft_rows(str(setup / "train.jsonl"))[:6], tok, "tulu", 96, num_workers=1,
                                progress=False)
    model = Transformer.from_pretrained(str(setup / "base"))
    totals = []
    for packing in (True, False):
        cfg.packing = packing
        items, collate = train_sft.make_batches(cfg, examples)
        batch = collate(items, tok.pad_id)
        assert (batch["labels"] != -100).sum() == sum(int(m[1:].sum()) for _, m in examples)
        with torch.no_grad():
            totals.append(train_sft.token_loss_sum(model, batch).item())
    assert len(items) == 6 and totals[0] == pytest.approx(totals[1], rel=1e-5)


def test_padded_rows_train_under_plain_causal_attention(setup, monkeypatch):
    """packing=false (the paper presets): right-padded rows need no mask, and with none SDPA can take its flash
    kernel; a document mask would send every layer to a kernel that computes the whole [T, T] square. The loss is
    the one the masked model gives."""
    tok = data.Tokenizer.from_pretrained(str(setup / "base"))
    examples = data.tokenize_sft(data.load_sft_rows(str(setup / "train.jsonl"))[:6], tok, "tulu", 96, num_workers=1,
                                progress=False)
    model = Transformer.from_pretrained(str(setup / "base"))
    items, collate = train_sft.make_batches(train_sft.SFTConfig(max_seq_len=96, packing=False), examples)
    batch = collate(items, tok.pad_id)
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        loss = train_sft.token_loss_sum(model, batch)
        assert len(masks) == model.config.num_layers and all(m is None for m in masks)
        lengths = torch.tensor([len(examples[i][0]) for i in items])
        one_document_each = (torch.arange(batch["input_ids"].shape[1]) >= lengths[:, None]).long()  # padding: 1
        masked = model(batch["input_ids"], doc_ids=one_document_each, return_hidden=True)
        expected = kernels.fused_linear_cross_entropy(masked.flatten(0, 1), model.output_weight,
                                                      batch["labels"].flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)


def record_gradients(monkeypatch):
    """Every optimizer step's gradients (after accumulation, before clipping), per parameter name, in a list."""
    steps = []
    clip_grad = common.clip_grad

    def recording(model, max_norm, step):
        steps.append({n: p.grad.clone() for n, p in common.unwrap(model).named_parameters()})
        return clip_grad(model, max_norm, step)

    monkeypatch.setattr(common, "clip_grad", recording)
    return steps


def test_uneven_micro_batches_equal_one_big_batch(setup, monkeypatch):
    grads = record_gradients(monkeypatch)
    train_sft.main(args(setup, "one_batch", batch_size=4, grad_accum=1))
    train_sft.main(args(setup, "micro_batches", batch_size=1, grad_accum=4))
    assert_same_run(setup / "one_batch", setup / "micro_batches")
    # every element of every step's gradient, to float32 summation noise: within 5e-6 of the tensor's largest
    # gradient (measured: up to 5e-7); a wrongly weighted micro-batch would be off by percents
    one, micro = grads[:4], grads[4:]
    assert len(one) == len(micro) == 4
    for step, (a, b) in enumerate(zip(one, micro), 1):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=5e-6 * a[k].abs().max().item(),
                                       msg=lambda m: f"step {step} gradient of {k}: {m}")
    # the micro-batches really are uneven, so a mean of per-micro-batch means would have given another loss
    tok = data.Tokenizer.from_pretrained(str(setup / "base"))
    examples = data.tokenize_sft(data.load_sft_rows(str(setup / "train.jsonl")), tok, "tulu", 96, num_workers=1,
                                progress=False)
    assert len({int(m.sum()) for _, m in examples}) > 1


def test_sum_loss_is_independent_of_the_split_and_scales_the_gradient_per_sequence(setup):
    train_sft.main(args(setup, "sum_one", batch_size=4, grad_accum=1, loss_reduction="sum"))
    train_sft.main(args(setup, "sum_micro", batch_size=2, grad_accum=2, loss_reduction="sum"))
    assert_same_run(setup / "sum_one", setup / "sum_micro")
    # step 1 starts from the same weights as the mean-loss run: its gradient is that one x tokens / sequences
    if not os.path.exists(setup / "one_batch"):
        train_sft.main(args(setup, "one_batch", batch_size=4, grad_accum=1))
    first = lambda run: next(json.loads(line) for line in open(setup / run / "metrics.jsonl") if '"loss"' in line)
    summed, mean = first("sum_one"), first("one_batch")
    assert summed["grad_norm"] == pytest.approx(mean["grad_norm"] * mean["trained_tokens"] / 4, rel=1e-4)


# 2 ranks x 2 sequences; checkpoints at steps 2 and 4, each right after a held-out evaluation (under FSDP a
# no-grad forward leaves the root module unsharded, which the checkpoint must cope with)
TWO_RANKS = dict(batch_size=2, grad_accum=1, eval_every=2, checkpoint_every=2)


# DDP runs the sum loss, whose divisor is the global batch's sequence count (4 here, not a rank's 2); the one-rank
# run resumed on two ranks below runs DDP with the mean loss
@pytest.mark.parametrize("fsdp,compile,loss_reduction", [(False, False, "sum"), (True, False, "mean"),
                                                         (True, True, "mean")],
                         ids=["ddp_sum_loss", "fsdp2", "fsdp2_compiled"])
def test_two_ranks_equal_one_rank_with_the_same_global_batch(setup, fsdp, compile, loss_reduction):
    ref = f"ref_1rank_{loss_reduction}"
    if not os.path.exists(setup / ref):
        train_sft.main(args(setup, ref, batch_size=2, grad_accum=2, eval_every=2, loss_reduction=loss_reduction))
    run = f"two_ranks_{'fsdp' if fsdp else 'ddp'}{'_compiled' if compile else ''}"
    train_on_ranks(setup, run, 2, fsdp=fsdp, compile=compile, loss_reduction=loss_reduction, **TWO_RANKS)
    assert ((2, "eval_loss")) in losses(setup / run)
    assert json.load(open(setup / run / "config.json"))["total_batch_size"] == 4
    assert_same_run(setup / ref, setup / run)


def test_fsdp2_interrupted_and_resumed_run_reproduces_the_uninterrupted_run(setup):
    full = setup / "two_ranks_fsdp"  # the uninterrupted run of the test above, when it ran first
    if not os.path.exists(full / "final"):
        train_on_ranks(setup, full.name, 2, fsdp=True, **TWO_RANKS)
    assert sorted(os.listdir(full / "checkpoints")) == ["step_0000002", "step_0000004"]
    # killed during step 3: sharded weights and optimizer state come back from checkpoint 2
    resumed = setup / "fsdp_resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    train_on_ranks(setup, resumed.name, 2, fsdp=True, resume=True, **TWO_RANKS)
    logged = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    assert_same_run(full, resumed, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fsdp", [False, True])
def test_a_one_rank_run_resumed_on_two_ranks_reproduces_the_uninterrupted_run(setup, fsdp):
    """The ranks deal one data order between them, so the point a 1-rank checkpoint reached is where 2 ranks go on;
    under FSDP too, whose state-dict API could not read the optimizer state a run without it saved."""
    full = setup / "one_rank_checkpointed"
    if not os.path.exists(full / "final"):
        train_sft.main(args(setup, full.name, batch_size=2, grad_accum=2, checkpoint_every=2))
    resumed = setup / f"resumed_on_two_ranks{'_fsdp' if fsdp else ''}"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    train_on_ranks(setup, resumed.name, 2, resume=True, batch_size=2, grad_accum=1, checkpoint_every=2, fsdp=fsdp)
    assert_same_run(full, resumed)


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_run(setup):
    full = setup / "full"
    train_sft.main(args(setup, "full", max_steps=6, checkpoint_every=2, keep_checkpoints=3, packing=True,
                        batch_size=2))
    assert sorted(os.listdir(full / "checkpoints")) == ["step_0000002", "step_0000004", "step_0000006"]
    # the state a crash during step 5's save leaves behind: checkpoint 4 complete, 6 never written, a half
    # written temporary folder, metrics logged past the checkpoint
    crashed = setup / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "step_0000006")
    shutil.move(crashed / "checkpoints" / "step_0000004", crashed / "checkpoints" / ".tmp_step_0000004")
    train_sft.main(args(setup, "crashed", max_steps=6, checkpoint_every=2, keep_checkpoints=3, packing=True,
                        batch_size=2, resume=True))
    logged = [json.loads(line) for line in open(crashed / "metrics.jsonl")]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 7))  # no step logged twice
    assert_same_run(full, crashed, rtol=1e-6, atol=1e-7)


def test_a_resume_on_rows_edited_in_place_is_refused(setup):
    """--data names a file: edited since the checkpoint, with as many rows, it is not what the run trained on."""
    rows = setup / "rows_edited_later.jsonl"
    shutil.copy(setup / "train.jsonl", rows)
    train_sft.main(args(setup, "edited", data=rows, max_steps=2, checkpoint_every=1, batch_size=2))
    shutil.rmtree(setup / "edited" / "final")
    edited = [json.loads(line) for line in open(rows)]
    edited[0]["messages"][-1]["content"] += " (edited)"
    rows.write_text("".join(json.dumps(row) + "\n" for row in edited))
    with pytest.raises(common.ConfigError, match=r"--resume: the training rows \(--data=\S*rows_edited_later.jsonl\) "
                                                 r"are not the ones the run in \S*edited trained on"):
        train_sft.main(args(setup, "edited", data=rows, max_steps=2, checkpoint_every=1, batch_size=2, resume=True))


def test_a_resume_from_a_model_whose_config_was_edited_since_is_refused(setup):
    """The checkpoint holds the weights, but rope_theta and rms_norm_eps come from --model's config.json: edited
    since, the run would go on training another function of the same weights. (Its eos ids may change.)"""
    model = setup / "base_edited_later"
    shutil.copytree(setup / "base", model)
    train_sft.main(args(setup, "config_edited", model=model, max_steps=2, checkpoint_every=1, batch_size=2))
    shutil.rmtree(setup / "config_edited" / "final")
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 0.1
    config["eos_token_id"] = [config["eos_token_id"], 1]  # (not what the model computes: not named below)
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(common.ConfigError, match=r"--resume: the model built from --model=\S*base_edited_later is not "
                                                 r"configured as the one \S*step_0000002 trained \(rms_norm_eps: "
                                                 r"1e-05 then, 0.1 now\)"):
        train_sft.main(args(setup, "config_edited", model=model, max_steps=2, checkpoint_every=1, batch_size=2,
                            resume=True))


def test_final_save_loads_in_transformers_with_equal_logits(setup):
    from transformers import AutoModelForCausalLM
    train_sft.main(args(setup, "hf", max_steps=2))
    final = str(setup / "hf" / "final")
    ours = Transformer.from_pretrained(final)
    theirs = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    tok = data.Tokenizer.from_pretrained(final)
    ids = torch.tensor([tok.encode("Tom had 3 apples and got 4 more. How many apples?")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    assert json.load(open(os.path.join(final, "tokenizer_config.json")))["chat_template"]


def test_throughput_counts_the_training_steps_not_the_evaluations_and_checkpoints_between_them(setup, monkeypatch):
    # A clock that moves 1 s per reading, and 1000 s per held-out evaluation or checkpoint: a step timed from its
    # own start to its end reads 1 s, whatever ran before it.
    clock = {"now": 0.0}

    def tick():
        clock["now"] += 1.0
        return clock["now"]

    def slow(fn):
        def wrapped(*a, **kw):
            clock["now"] += 1000.0
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(common, "time", SimpleNamespace(perf_counter=tick))
    monkeypatch.setattr(train_sft, "heldout_loss", slow(train_sft.heldout_loss))
    monkeypatch.setattr(common, "save_checkpoint", slow(common.save_checkpoint))
    # packed rows: every step processes batch_size x max_seq_len tokens
    train_sft.main(args(setup, "throughput", packing=True, batch_size=2, eval_every=2, checkpoint_every=3))
    rows = [json.loads(line) for line in open(setup / "throughput" / "metrics.jsonl")]
    speeds = {r["step"]: r["tok_per_s"] for r in rows if "tok_per_s" in r}
    assert sorted(speeds) == [1, 2, 3, 4] and any("eval_loss" in r for r in rows)
    assert all(s == 2 * 96 for s in speeds.values()), speeds


def test_an_empty_template_trains_in_the_one_the_model_was_saved_with(setup, tmp_path):
    tok = data.Tokenizer.from_pretrained(str(setup / "base"))
    tok.chat_template = "chatml"
    Transformer.from_pretrained(str(setup / "base")).save_pretrained(str(tmp_path / "chatml_base"), tokenizer=tok)
    train_sft.main(args(setup, "saved_template", model=tmp_path / "chatml_base", template="", max_steps=1,
                              max_seq_len=256))  # (ChatML adds SmolLM2's default system prompt)
    final = data.Tokenizer.from_pretrained(str(setup / "saved_template" / "final"))
    assert data.template_name(final.chat_template, final) == "chatml"
    # a base model moved to ChatML ends with <|im_end|>: its eos from now on, as in SmolLM2-Instruct's files
    im_end = final.token_to_id("<|im_end|>")
    assert (final.eos_id, final.pad_token) == (im_end, tok.pad_token) and tok.eos_id != im_end
    assert json.load(open(setup / "saved_template" / "final" / "config.json"))["eos_token_id"] == im_end
    assert json.load(open(setup / "saved_template" / "config.json"))["template"] == "chatml"  # what ran, not ""


def test_demo_preset_drives_held_out_loss_down(tmp_path):
    # the no-argument demo (synthetic data, demo model from scratch), shortened to 30 steps
    train_sft.main([f"--run_dir={tmp_path}", "--max_steps=30", "--progress=false"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert rows[0]["step"] == 0 and len(evals) >= 2
    assert evals[-1] < 0.6 * evals[0], evals
    assert os.path.exists(tmp_path / "final" / "model.safetensors")
    assert os.path.exists(tmp_path / "final" / "tokenizer.json")


def test_compiled_blocks_train_like_eager_and_generate_without_recompiling(setup):
    from torch._dynamo.utils import counters

    from model import generate
    counters.clear()
    # padded, not packed: every batch has its own length, so the blocks also recompile for symbolic lengths
    train_sft.main(args(setup, "eager_blocks", max_steps=4, batch_size=2, eval_every=2))
    assert not counters["stats"]["unique_graphs"]
    train_sft.main(args(setup, "compiled_blocks", max_steps=4, batch_size=2, eval_every=2, compile=True))
    assert counters["stats"]["unique_graphs"] > 0  # the blocks really ran compiled
    # inductor's fused kernels round differently from eager's ops: measured <= 1e-6 relative on these runs
    assert_same_run(setup / "eager_blocks", setup / "compiled_blocks", rtol=1e-5, atol=1e-5)

    model = Transformer.from_pretrained(str(setup / "compiled_blocks" / "final"))
    eager = generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=6)
    common.compile_blocks(model)
    graphs = counters["stats"]["unique_graphs"]
    assert generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=6) == eager
    assert counters["stats"]["unique_graphs"] == graphs  # decoding ran eagerly: nothing (re)compiled


def test_bf16_autocast_with_triton_kernels_tracks_the_fp32_run(setup, monkeypatch):
    """The GPU recipe's precision on CPU: --precision=bf16 (CUDA's default) and the Triton kernels (interpreted)."""
    train_sft.main(args(setup, "fp32", max_steps=3, batch_size=2, eval_every=3))
    monkeypatch.setenv("NANOTULU_KERNELS", "triton")
    train_sft.main(args(setup, "bf16_autocast", max_steps=3, batch_size=2, eval_every=3, precision="bf16"))
    fp32, bf16 = losses(setup / "fp32"), losses(setup / "bf16_autocast")
    assert fp32.keys() == bf16.keys()
    for key in fp32:  # measured: losses within 5e-5 relative, gradient norms within 2.4e-3
        assert bf16[key] == pytest.approx(fp32[key], rel=1e-2), key
        assert bf16[key] != fp32[key], key  # the bf16 run really ran in bf16


def test_a_nan_gradient_stops_the_run_before_its_update_with_the_checkpoints_finite(setup, monkeypatch):
    """Clipped by a nan norm every weight turns nan; the run went on, rotated its last finite checkpoints away and
    saved a nan final/ that the next stage trained from, all with exit status 0."""
    token_loss_sum = train_sft.token_loss_sum
    calls = []

    def nan_at_step_3(model, batch):  # (one micro-batch a step; the held-out loss runs without grad)
        calls.append(torch.is_grad_enabled())
        return token_loss_sum(model, batch) * (float("nan") if sum(calls) == 3 and calls[-1] else 1.0)
    monkeypatch.setattr(train_sft, "token_loss_sum", nan_at_step_3)
    run = setup / "diverged"
    with pytest.raises(common.Diverged, match=r"^step 3: the gradient norm is nan: stopped before the update"):
        train_sft.main(args(setup, "diverged", checkpoint_every=1, keep_checkpoints=1))
    (last,) = common.list_checkpoints(str(run))
    assert last.endswith("step_0000002") and not (run / "final").exists()
    state = torch.load(os.path.join(last, "model.pt"), weights_only=True)
    assert all(t.isfinite().all() for t in state.values())
