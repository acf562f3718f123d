"""train_rlvr.py: advantages and losses against hand-worked numbers, rewards per dataset and the non-stop penalty,
the fused per-token log-probs and the value model, 2 ranks vs 1 rank, exact resume, and RLVR raising held-out
verified accuracy of a small SFT model on the synthetic demo task."""
import copy
import json
import math
import os
import re
import shutil
import textwrap
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import common
import data
import train_rlvr
from model import CheckpointError, Transformer
from multirank import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"gen_s", "learn_s", "gen_tok_per_s"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, write_tiny_demo_model):
    root = tmp_path_factory.mktemp("rlvr")
    demo, tok, model = write_tiny_demo_model(root)
    write_jsonl(root / "train.jsonl", demo["rlvr_train"])
    write_jsonl(root / "heldout.jsonl", demo["rlvr_heldout"][:16])
    return SimpleNamespace(root=root, tok=tok, model=model, model_dir=str(root / "model"), demo=demo,
                           train=str(root / "train.jsonl"), heldout=str(root / "heldout.jsonl"))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def args_for(tiny, run_dir, *extra):
    return [f"--config={os.path.join(ROOT, 'configs', 'rlvr_demo.json')}", f"--model={tiny.model_dir}",
            f"--data={tiny.train}", f"--eval_data={tiny.heldout}", f"--run_dir={run_dir}",
            "--prompts_per_step=4", "--num_samples=4", "--max_response_len=12", "--eval_max_new_tokens=12",
            "--batch_size=8", "--num_minibatches=2", "--ppo_epochs=2", "--max_steps=2", "--lr=1e-3",
            "--samples_per_step=16", "--progress=false",
            # a random model never emits eos in 12 tokens: with the penalty every reward would be equal (no signal)
            "--apply_non_stop_penalty=false", *extra]


def test_a_resume_on_prompts_reordered_in_place_is_refused(tiny, tmp_path):
    rows = list(tiny.demo["rlvr_train"])
    write_jsonl(tmp_path / "prompts.jsonl", rows)
    args = args_for(tiny, tmp_path / "run", f"--data={tmp_path / 'prompts.jsonl'}", "--checkpoint_every=1",
                    "--eval_data=", "--max_steps=1")
    train_rlvr.main(args)
    shutil.rmtree(tmp_path / "run" / "final")
    rows[3], rows[4] = rows[4], rows[3]  # the same rows, in another order: another run
    write_jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(common.ConfigError, match=r"--resume: the training rows \(--data=\S*prompts.jsonl\) are not"):
        train_rlvr.main(args + ["--resume=true"])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def no_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def record_calls(monkeypatch, name):
    """Wrap train_rlvr.<name> for one run; -> the list of (args, result) of its calls."""
    calls, real = [], getattr(train_rlvr, name)

    def wrapper(*args, **kwargs):
        calls.append((args, real(*args, **kwargs)))
        return calls[-1][1]
    monkeypatch.setattr(train_rlvr, name, wrapper)
    return calls


def use_reference(monkeypatch, reference):
    """The run's KL reference (and PPO's value backbone) become copies of `reference` instead of the starting
    policy, so that the KL terms act from the first update on (where policy and reference are otherwise equal)."""
    frozen_copy = common.frozen_copy
    monkeypatch.setattr(common, "frozen_copy", lambda policy, *args: frozen_copy(reference, *args))
    monkeypatch.setattr(train_rlvr, "copy", SimpleNamespace(deepcopy=lambda policy: copy.deepcopy(reference)))


def perturbed(model_dir, scale=0.05):
    model = Transformer.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


# ----------------------------------------------------------------------------------------------------------
# Advantages and losses, by hand

def test_grpo_advantages_hand_worked_with_zero_variance_group():
    rewards = torch.tensor([[10., 0., 0., 10.], [0., 0., 0., 0.], [10., 10., 10., -10.]])
    adv, keep = train_rlvr.grpo_advantages(rewards, "std", eps=0.0 + 1e-8)
    # group 0: mean 5, population std 5; group 2: mean 5, std sqrt((3 * 25 + 225) / 4) = sqrt(75)
    s = math.sqrt(75)
    expected = torch.tensor([[1., -1., -1., 1.], [0., 0., 0., 0.], [5 / s, 5 / s, 5 / s, -15 / s]])
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-6)
    assert keep.tolist() == [True, False, True]
    centred, keep_c = train_rlvr.grpo_advantages(rewards, "center")
    torch.testing.assert_close(centred, torch.tensor([[5., -5., -5., 5.], [0., 0., 0., 0.], [5., 5., 5., -15.]]))
    assert keep_c.tolist() == [True, False, True]


def test_gae_hand_worked_on_short_sequences():
    # row 0: three response tokens; row 1: two, then padding (junk there must not leak in)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1., 1., 1.], [1., 1., 0.]])
    adv, ret = train_rlvr.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: d2 = 1 - 0.4 = 0.6; d1 = 0 + 0.4 - 0.2 = 0.2 -> A1 = 0.2 + 0.95 * 0.6 = 0.77;
    #        d0 = 0 + 0.2 - 0.5 = -0.3 -> A0 = -0.3 + 0.95 * 0.77 = 0.4315
    # row 1: d1 = 2 + 0 - 1 = 1 -> A1 = 1; d0 = 0 + 1 - 1 = 0 -> A0 = 0.95
    torch.testing.assert_close(adv, torch.tensor([[0.4315, 0.77, 0.6], [0.95, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.9315, 0.97, 1.0], [1.95, 2.0, 0.0]]))
    # gamma < 1 discounts the bootstrap: row 0 with gamma 0.5, lam 1: A2 = 0.6, A1 = 0.5 * 0.4 - 0.2 + 0.5 * 0.6,
    adv_g, _ = train_rlvr.gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    a2, a1 = 0.6, 0.5 * 0.4 - 0.2 + 0.5 * 0.6
    torch.testing.assert_close(adv_g, torch.tensor([[0.5 * 0.2 - 0.5 + 0.5 * a1, a1, a2]]))


def test_whitening_uses_only_masked_tokens():
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1., 1.], [1., 0.]])
    torch.testing.assert_close(train_rlvr.masked_whiten(x, mask, eps=0.0), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    # a mean 1000 x the std over 65k tokens: the whitened std is still 1
    big = 1000.0 + torch.randn(32, 2048, generator=torch.Generator().manual_seed(0))
    white = train_rlvr.masked_whiten(big, torch.ones_like(big), eps=0.0)
    assert abs(white.std().item() - 1.0) < 1e-4 and abs(white.mean().item()) < 1e-4


def test_clipped_policy_loss_hand_worked():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))  # ratios
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = train_rlvr.policy_loss(logp, old, adv, clip_eps=0.2)
    # A > 0: max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5; A < 0: max(1.5, 1.2) = 1.5, max(0.5, 0.8) = 0.8
    torch.testing.assert_close(loss, torch.tensor([-1.2, -0.5, 1.5, 0.8]))
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_clipped_value_loss_and_k3_hand_worked():
    loss, clipped = train_rlvr.value_loss(torch.tensor([0.5, 0.1]), torch.zeros(2), torch.ones(2), value_clip=0.2)
    # v = 0.5 is clipped to 0.2: 0.5 * max(0.25, 0.64); v = 0.1 is inside the clip range: 0.5 * 0.81
    torch.testing.assert_close(loss, torch.tensor([0.32, 0.405]))
    assert clipped.tolist() == [1.0, 0.0]
    k3 = train_rlvr.k3_kl(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0]))
    torch.testing.assert_close(k3, torch.tensor([math.exp(-1), 0.0, math.exp(2) - 3]))


def test_k3_stays_accurate_near_the_reference_and_finite_far_from_it():
    d = torch.tensor([1e-3, 1e-4, -1e-4])
    exact = torch.tensor([math.expm1(-x) + x for x in d.double().tolist()])
    torch.testing.assert_close(train_rlvr.k3_kl(d, torch.zeros(3)), exact.float(), rtol=1e-3, atol=0)
    assert (train_rlvr.k3_kl(torch.logspace(-8, -2, 61) * torch.tensor([1.0, -1.0])[:, None], 0) >= 0).all()
    d = torch.tensor([-100.0, 100.0], requires_grad=True)
    far = train_rlvr.k3_kl(d, torch.zeros(2))
    far.sum().backward()
    assert torch.isfinite(far).all() and torch.isfinite(d.grad).all()  # an inf loss: nan gradients in every weight


# ----------------------------------------------------------------------------------------------------------
# Rewards

def test_a_response_is_verified_without_its_stop_token(tiny, monkeypatch):
    """A stop token that decodes to text (one the tokenizer does not mark special) is not part of the answer: here
    the stop token is the digit 9, so '#### 7' then the stop would read as 79."""
    tok = tiny.tok
    stop, answer = tok.token_to_id("9"), tok.encode("#### 7")
    assert stop is not None and tok.decode(answer + [stop]).endswith("79")
    from model import Generation
    monkeypatch.setattr(train_rlvr, "generate", lambda *a, **k: Generation([answer + [stop]], [[0.0] * 5], [True]))
    rows = [{"prompt_ids": tok.encode("3 + 4?"), "dataset": "gsm8k", "ground_truth": "7"}]
    cfg = train_rlvr.RLVRConfig(num_samples=1)
    sample, = train_rlvr.rollout(None, tok, rows, cfg, [stop], torch.device("cpu"))
    assert (sample["response"], sample["reward"]) == (tok.decode(answer), cfg.verification_reward)
    d = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    assert train_rlvr.heldout_accuracy(None, tok, rows, cfg, [stop], d) == {"eval_acc_gsm8k": 1.0}


def test_reward_per_dataset_type_and_non_stop_penalty():
    cfg = train_rlvr.RLVRConfig()
    reward = lambda *a: train_rlvr.compute_reward(*a, cfg)
    assert reward("gsm8k", "3 + 4 = 7\n#### 7", "7", True) == (10.0, 1.0)
    assert reward("gsm8k", "3 + 4 = 8\n#### 8", "7", True) == (0.0, 0.0)
    assert reward("MATH", "so the answer is $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", True) == (10.0, 1.0)
    assert reward("MATH", "so the answer is $\\boxed{2}$", "\\frac{1}{2}", True) == (0.0, 0.0)
    lower = json.dumps({"func_name": "validate_lowercase"})
    assert reward("ifeval", "all lowercase here.", lower, True) == (10.0, 1.0)
    assert reward("ifeval", "Not lowercase.", lower, True) == (0.0, 0.0)
    # a correct answer that ran out of tokens without eos: the penalty replaces the score
    assert reward("gsm8k", "3 + 4 = 7\n#### 7", "7", False) == (-10.0, 1.0)
    assert reward("gsm8k", "3 + 4 = 8", "7", False) == (-10.0, 0.0)
    cfg.apply_non_stop_penalty = False
    assert reward("gsm8k", "3 + 4 = 7\n#### 7", "7", False) == (10.0, 1.0)
    # IFEval partial credit: one of two constraints met -> half the reward; accuracy stays all-or-nothing
    two = json.dumps([{"func_name": "validate_lowercase"}, {"func_name": "verify_keywords", "keyword_list": ["apple"]}])
    assert reward("ifeval", "no fruit here.", two, True) == (0.0, 0.0)
    cfg.ifeval_partial = True
    assert reward("ifeval", "no fruit here.", two, True) == (5.0, 0.0)
    assert reward("ifeval", "an apple a day.", two, True) == (10.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Log-probs and the value model

def test_fused_token_logprobs_equal_log_softmax_of_full_logits(tiny):
    torch.manual_seed(1)
    ids = torch.randint(1, tiny.tok.vocab_size, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[:, 3:8] = ids[:, 4:9]
    for temperature in (1.0, 0.7):
        got = train_rlvr.token_logprobs(tiny.model, ids, labels, temperature)
        logp = torch.log_softmax(tiny.model(ids).float() / temperature, dim=-1)
        want = logp.gather(2, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_value_model_from_reward_model_checkpoint(tiny, tmp_path):
    rm = tmp_path / "rm"
    shutil.copytree(tiny.model_dir, rm)
    weight = torch.randn(1, tiny.model.config.hidden_size)
    save_file({"score.weight": weight}, str(rm / common.VALUE_HEAD))
    cfg = train_rlvr.RLVRConfig(value_model=str(rm))
    value = train_rlvr.build_value_model(cfg, tiny.model)
    ids = torch.randint(1, tiny.tok.vocab_size, (2, 5))
    torch.testing.assert_close(value(ids), (tiny.model(ids, return_hidden=True) @ weight.T).squeeze(-1))
    # under bf16 autocast the readout stays fp32: a bf16 one rounds values near PPO's score of 10 to steps of 1/16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        values, hidden = value(ids), value.backbone(ids, return_hidden=True)
    assert values.dtype == torch.float32 and torch.equal(values, hidden.float() @ weight[0])
    # without a reward model: a copy of the policy whose zero head starts every value at 0
    fresh = train_rlvr.build_value_model(train_rlvr.RLVRConfig(), tiny.model)
    assert torch.equal(fresh(ids), torch.zeros(2, 5))
    save_file({"v_head.weight": weight}, str(rm / common.VALUE_HEAD))
    with pytest.raises(CheckpointError, match=r"value_head.safetensors: no score.weight tensor \(holds "
                                              r"\['v_head.weight'\]"):
        train_rlvr.build_value_model(cfg, tiny.model)
    (rm / common.VALUE_HEAD).write_bytes(b"\x01")  # cut short
    with pytest.raises(CheckpointError, match=r"value_head.safetensors: not a readable safetensors file"):
        train_rlvr.build_value_model(cfg, tiny.model)
    os.remove(rm / common.VALUE_HEAD)
    with pytest.raises(FileNotFoundError, match="value_head.safetensors"):
        train_rlvr.build_value_model(cfg, tiny.model)


def test_a_reward_model_is_refused_as_the_policy_and_taken_as_the_value_model(tiny, tmp_path):
    """A reward model's folder is a valid causal-LM folder plus its value head: as --model it would load without a
    word as a policy it is not, so it is refused there (train_rlvr.main, before anything is read), saying where it
    belongs; --value_model takes it."""
    rm = tmp_path / "rm"
    shutil.copytree(tiny.model_dir, rm)
    save_file({"score.weight": torch.zeros(1, tiny.model.config.hidden_size)}, str(rm / common.VALUE_HEAD))
    with pytest.raises(FileNotFoundError, match=rf"--model={rm}: a reward model's folder \(value_head.safetensors"
                                                r".*train_rlvr.py --algo=ppo takes it as --value_model"):
        train_rlvr.main([f"--config={os.path.join(ROOT, 'configs', 'rlvr_demo.json')}", f"--model={rm}",
                         f"--data={tiny.train}", f"--run_dir={tmp_path / 'run'}", "--device=cpu"])
    assert not (tmp_path / "run").exists()
    cfg = train_rlvr.RLVRConfig(model=tiny.model_dir, value_model=str(rm))
    common.check_folder(cfg, "model")
    common.check_folder(cfg, "value_model")
    assert train_rlvr.build_value_model(cfg, tiny.model).score.weight.abs().sum() == 0


@pytest.mark.parametrize("args, world, why", [
    (["--prompts_per_step=3"], 2, "prompts_per_step=3 is not a multiple of the 2 ranks"),
    (["--algo=grpo", "--num_samples=1"], 1, "GRPO needs at least 2 samples per prompt"),
    (["--fsdp=true"], 1, "fsdp: not supported by train_rlvr.py"),
    (["--grad_accum=2"], 1, "--grad_accum=2: RLVR batches are prompts_per_step x num_samples"),
    (["--total_batch_size=8"], 1, "--total_batch_size=8: RLVR batches are prompts_per_step x num_samples"),
    (["--temperature=0"], 1, "temperature=0.0: RLVR samples, it must be > 0"),
    (["--adv_eps=0"], 1, "adv_eps=0.0: must be > 0"),
    (["--algo=grpo", "--value_model=x"], 1, "only --algo=ppo has a value model"),
    (["--loss_reduction=mean"], 1, "loss_reduction='mean': expected token or sequence")])
def test_settings_rlvr_cannot_run_are_refused_at_start_up(args, world, why):
    cfg = common.parse_config(train_rlvr.RLVRConfig, args)
    with pytest.raises(common.ConfigError, match=re.escape(why)):
        train_rlvr.check_config(cfg, SimpleNamespace(world_size=world))


def test_collate_puts_response_tokens_in_label_layout():
    samples = [{"prompt_ids": [5, 6, 7], "response_ids": [8, 0]}, {"prompt_ids": [5], "response_ids": [9, 10, 11]}]
    ids, labels = train_rlvr.collate_rollouts(samples, pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7, 8, 0], [5, 9, 10, 11, 0]]
    assert labels.tolist() == [[-100, -100, 8, 0, -100], [9, 10, 11, -100, -100]]


def test_micro_batches_compute_each_only_up_to_its_longest_row(tiny):
    """The passes over a rollout (the no-grad ones and the update's) run micro-batches of batch_size of the given
    rows, each cut after its longest row: together they give what one pass over the whole right-padded rollout
    gives."""
    torch.manual_seed(2)
    samples = [{"prompt_ids": torch.randint(1, tiny.tok.vocab_size, (p,)).tolist(),
                "response_ids": torch.randint(1, tiny.tok.vocab_size, (r,)).tolist()}
               for p, r in ((4, 3), (6, 9), (3, 2), (5, 1), (7, 4))]
    ids, labels = train_rlvr.collate_rollouts(samples, pad_id=0, device="cpu")
    lengths = [len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples]
    batches = list(train_rlvr.micro_batches(torch.tensor([3, 1, 4, 0, 2]), lengths, batch_size=2))
    assert [(rows.tolist(), T) for rows, T in batches] == [([3, 1], 15), ([4, 0], 11), ([2], 5)]
    chunked = torch.zeros(ids.shape)
    with torch.no_grad():
        for rows, T in batches:
            chunked[rows, :T] = train_rlvr.token_logprobs(tiny.model, ids[rows, :T], labels[rows, :T])
        whole = train_rlvr.token_logprobs(tiny.model, ids, labels)
    mask = labels != -100
    torch.testing.assert_close(chunked * mask, whole * mask, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Whole runs

def test_ppo_run_logs_value_loss_and_saves_policy(tiny, tmp_path, monkeypatch, capsys):
    run = tmp_path / "ppo"
    clipped, clip_grad = [], common.clip_grad  # policy and value are clipped apart, as open-instruct's two engines
    monkeypatch.setattr(common, "clip_grad", lambda model, max_norm, step: clipped.append(type(model).__name__)
                        or clip_grad(model, max_norm, step))
    # the input model was saved with tulu: final/ must record the template the policy was trained with
    train_rlvr.main(args_for(tiny, run, "--algo=ppo", "--num_samples=1", "--beta=0.05", "--eval_data=",
                             "--template=chatml"))
    out = capsys.readouterr().out
    assert "value model: a copy of the policy with a zero value head (no --value_model" in out
    assert f"; math: {train_rlvr.verifiers.BACKENDS['math']}" in out  # which MATH checker gave the rewards
    assert data.Tokenizer.from_pretrained(str(run / "final")).chat_template == data.CHATML_TEMPLATE
    assert clipped == ["Transformer", "ValueModel"] * 8  # 2 steps x 2 epochs x 2 minibatches
    m = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in m] == [1, 2]
    assert all(r["rollouts"] == 4 and "vf_loss" in r and r["value_grad_norm"] > 0 and r["kl_k3"] >= 0 for r in m)
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout comes from the reference itself
    assert os.path.isfile(run / "final" / "model.safetensors") and os.path.isfile(run / "final" / "tokenizer.json")


def test_run_config_records_the_template_the_model_was_saved_with(tiny, tmp_path):
    train_rlvr.main(args_for(tiny, tmp_path / "run", "--template=", "--max_steps=1", "--eval_data=",
                             "--checkpoint_every=1"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["template"] == "tulu"
    # the checkpoint keeps the flag as given, as checkpoints always did, so that those resume with it
    header = common._read_checkpoint_file(str(tmp_path / "run" / "checkpoints" / "step_0000001" / "state.pt"))
    assert header["extra"]["config"]["template"] == ""


def test_beta_0_builds_no_reference_and_logs_no_kl(tiny, tmp_path, monkeypatch):
    """Without a reference the KL is not measured: logged as 0.0 it read as a policy that had not moved."""
    copies = []
    frozen_copy = common.frozen_copy
    monkeypatch.setattr(common, "frozen_copy", lambda *args: copies.append(args) or frozen_copy(*args))
    run = tmp_path / "run"
    train_rlvr.main(args_for(tiny, run, "--beta=0", "--max_steps=1", "--eval_data=", "--samples_per_step=0",
                             "--skip_equal_groups=false"))
    record, = read_jsonl(run / "metrics.jsonl")
    assert copies == [] and record["kl"] is None and record["kl_k3"] is None


@pytest.mark.parametrize("equal_rewards, skip", [(False, True), (True, False), (True, True)])
def test_grpo_kl_penalty_pulls_the_policy_toward_the_reference(tiny, tmp_path, monkeypatch, equal_rewards, skip):
    """Zero advantages on every row, so the KL term is the only force on the policy. Groups whose rewards are all
    equal are skipped by default (nothing moves the weights) and kept with --skip_equal_groups=false, as Tulu 3.1's
    script kept them, for their KL term."""
    reference = perturbed(tiny.model_dir)
    use_reference(monkeypatch, reference)
    monkeypatch.setattr(train_rlvr, "grpo_advantages", lambda rewards, norm="std", eps=1e-8: (
        torch.zeros_like(rewards), torch.full((len(rewards),), not equal_rewards)))
    rollouts = record_calls(monkeypatch, "collate_rollouts")
    run = tmp_path / "run"
    train_rlvr.main(args_for(tiny, run, "--beta=1", "--max_steps=1", "--eval_data=", "--samples_per_step=0",
                             f"--skip_equal_groups={str(skip).lower()}"))
    record, = read_jsonl(run / "metrics.jsonl")
    trained = not (equal_rewards and skip)
    assert record["zero_std_groups"] == (4 if equal_rewards else 0) and record["trained_seqs"] == 16 * trained
    (_, (ids, labels)), = rollouts
    mask = labels != -100

    def k3_to_reference(model):  # the penalty's own estimate, exp(-d) - 1 + d, over the rollout's response tokens
        with torch.no_grad():
            d = train_rlvr.token_logprobs(model, ids, labels) - train_rlvr.token_logprobs(reference, ids, labels)
        return (torch.exp(-d) - 1 + d)[mask].mean().item()
    before = k3_to_reference(Transformer.from_pretrained(tiny.model_dir))
    after = k3_to_reference(Transformer.from_pretrained(str(run / "final")))
    if trained:
        assert after < 0.5 * before, (before, after)  # measured: 0.113 -> 0.028
    else:
        assert after == before


@pytest.mark.parametrize("kept_groups", [[True, False, True, False], [False] * 4])
def test_grpo_runs_no_forward_on_the_groups_it_skips(tiny, tmp_path, monkeypatch, kept_groups):
    """The old and reference log-probs are computed for the rows of kept groups only, and the logged KL is over
    those rows; with every group skipped nothing runs and there is no KL to log."""
    monkeypatch.setattr(train_rlvr, "grpo_advantages", lambda rewards, norm="std", eps=1e-8: (
        torch.ones_like(rewards), torch.tensor(kept_groups)))
    rows_without_grad = []
    token_logprobs = train_rlvr.token_logprobs

    def recording(model, ids, *args):
        if not torch.is_grad_enabled():
            rows_without_grad.append(len(ids))
        return token_logprobs(model, ids, *args)
    monkeypatch.setattr(train_rlvr, "token_logprobs", recording)
    run = tmp_path / "run"
    train_rlvr.main(args_for(tiny, run, "--max_steps=1", "--eval_data=", "--samples_per_step=0"))
    kept_rows = 4 * sum(kept_groups)  # 4 samples per group
    assert sum(rows_without_grad) == 2 * kept_rows  # the policy's pass and the reference's
    record, = read_jsonl(run / "metrics.jsonl")
    assert record["trained_seqs"] == kept_rows and record["zero_std_groups"] == 4 - sum(kept_groups)
    if kept_rows:
        assert record["kl"] == 0.0  # the rollout's policy is the reference
    else:
        assert record["kl"] is None and record["kl_k3"] is None


def test_ppo_token_rewards_are_the_kl_penalty_plus_the_score_on_the_last_response_token(tiny, tmp_path, monkeypatch):
    reference = perturbed(tiny.model_dir)
    use_reference(monkeypatch, reference)
    rollouts, gae_calls = record_calls(monkeypatch, "collate_rollouts"), record_calls(monkeypatch, "gae")
    # the non-stop penalty: a random model never stops, so every response scores -10 instead of a mostly-zero score
    train_rlvr.main(args_for(tiny, tmp_path / "run", "--algo=ppo", "--num_samples=1", "--beta=0.5", "--max_steps=1",
                             "--ppo_epochs=1", "--num_minibatches=1", "--apply_non_stop_penalty=true",
                             "--eval_data=", "--samples_per_step=0"))
    ((samples, _, _), (ids, labels)), = rollouts
    ((token_rewards, *_), _), = gae_calls
    mask = (labels != -100).float()
    start = Transformer.from_pretrained(tiny.model_dir)
    with torch.no_grad():
        old, ref = (train_rlvr.token_logprobs(m, ids, labels) * mask for m in (start, reference))
    want = -0.5 * (old - ref)
    for i, s in enumerate(samples):  # label column of the last response token: prompt + response - 2
        want[i, len(s["prompt_ids"]) + len(s["response_ids"]) - 2] += s["reward"]
    assert [s["reward"] for s in samples] == [-10.0] * 4 and (old - ref).abs().max() > 0.1
    torch.testing.assert_close(token_rewards * mask, want, rtol=1e-4, atol=1e-4)  # gae reads response tokens only


def test_old_and_reference_logprobs_are_taken_at_the_sampling_temperature(tiny, tmp_path, monkeypatch):
    """The update divides the logits by the temperature: the rollout's log-probs must too, or at temperature 0.7
    the first ratio (the policy against itself) is not 1 and the first rollout's KL to the reference not 0."""
    losses = record_calls(monkeypatch, "policy_loss")
    run = tmp_path / "run"
    train_rlvr.main(args_for(tiny, run, "--algo=ppo", "--num_samples=1", "--temperature=0.7", "--max_steps=1",
                             "--ppo_epochs=1", "--num_minibatches=1", "--eval_data=", "--samples_per_step=0"))
    (logp, old_logp, _, _), _ = losses[0]
    torch.testing.assert_close(logp, old_logp, rtol=0, atol=1e-5)
    record, = read_jsonl(run / "metrics.jsonl")
    assert record["kl"] == pytest.approx(0.0, abs=1e-6) and record["clip_frac"] == 0.0


@pytest.mark.parametrize("compiled", [[], ["--compile=true"]], ids=["eager", "compiled"])
def test_a_bf16_reference_holds_its_matmul_weights_in_bf16_and_starts_equal_to_the_policy(tiny, tmp_path, monkeypatch,
                                                                                          compiled):
    """Under bf16 the frozen reference stores what autocast would cast its matmul weights to (half the memory, no
    cast per call): at the first rollout, where policy and reference are the same weights, its log-probs are
    still the policy's to the bit, so the first KL is exactly 0. Compiled, the reference is compiled too (compiled
    kernels round bf16 otherwise than eager ones: a KL of ~1e-5 at the start)."""
    weight_dtypes = []
    token_logprobs = train_rlvr.token_logprobs

    def recording(model, *args):
        weight_dtypes.append((model.layers[0].self_attn.qkv_proj.weight.dtype, model.embed_tokens.weight.dtype))
        return token_logprobs(model, *args)
    monkeypatch.setattr(train_rlvr, "token_logprobs", recording)
    run = tmp_path / "run"
    # the random model's rewards are all equal: groups kept, or no pass would run
    train_rlvr.main(args_for(tiny, run, "--precision=bf16", "--max_steps=1", "--eval_data=", "--samples_per_step=0",
                             "--skip_equal_groups=false", *compiled))
    # 16 rollouts in micro-batches of 8: the policy's old log-probs, the reference's, then the policy's updates
    policy, reference = (torch.float32, torch.float32), (torch.bfloat16, torch.float32)
    assert weight_dtypes == [policy] * 2 + [reference] * 2 + [policy] * (len(weight_dtypes) - 4)
    record, = read_jsonl(run / "metrics.jsonl")
    assert record["kl"] == 0.0 and record["kl_k3"] == 0.0


def test_ppo_clips_the_ratio_with_clip_eps_and_the_value_with_value_clip(tiny, tmp_path, monkeypatch):
    # both default to 0.2: a run with the defaults cannot tell one setting from the other
    policy_losses, value_losses = record_calls(monkeypatch, "policy_loss"), record_calls(monkeypatch, "value_loss")
    train_rlvr.main(args_for(tiny, tmp_path / "run", "--algo=ppo", "--num_samples=1", "--clip_eps=0.1",
                             "--value_clip=0.3", "--max_steps=1", "--ppo_epochs=1", "--num_minibatches=1",
                             "--eval_data=", "--samples_per_step=0"))
    assert {args[3] for args, _ in policy_losses} == {0.1} and {args[3] for args, _ in value_losses} == {0.3}


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_loss_reduction_weighs_every_token_or_every_response_alike(tiny, tmp_path, monkeypatch, reduction):
    """Checked on the first update's gradient, where the ratio is 1 and the policy is its own reference (the k3
    term's gradient is 0): it must be -sum_rt w_rt A_r grad log p_rt, w = 1 / (the minibatch's response tokens)
    with token, and 1 / (responses x the response's own tokens) with sequence, for responses of 2 to 11 tokens."""
    real_rollout = train_rlvr.rollout

    def unequal_lengths(*args, **kwargs):
        samples = real_rollout(*args, **kwargs)
        for i, s in enumerate(samples):
            s["response_ids"] = s["response_ids"][:2 + 3 * (i % 4)]
        return samples
    monkeypatch.setattr(train_rlvr, "rollout", unequal_lengths)
    advantages = torch.linspace(-1.0, 1.5, 16).view(4, 4)
    monkeypatch.setattr(train_rlvr, "grpo_advantages", lambda rewards, norm="std", eps=1e-8: (
        advantages, torch.ones(4, dtype=torch.bool)))
    rollouts, grads = record_calls(monkeypatch, "collate_rollouts"), []
    monkeypatch.setattr(train_rlvr, "sync_gradients", lambda params, d: grads.append([p.grad.clone() for p in params]))
    train_rlvr.main(args_for(tiny, tmp_path / "run", f"--loss_reduction={reduction}", "--max_steps=1",
                             "--ppo_epochs=1", "--num_minibatches=1", "--eval_data=", "--samples_per_step=0"))
    (_, (ids, labels)), = rollouts
    mask = (labels != -100).float()
    assert mask.sum(1).tolist() == [2.0, 5.0, 8.0, 11.0] * 4
    weight = mask / mask.sum() if reduction == "token" else mask / mask.sum(1, keepdim=True) / len(mask)
    start = Transformer.from_pretrained(tiny.model_dir)
    (-(advantages.view(-1, 1) * train_rlvr.token_logprobs(start, ids, labels) * weight).sum()).backward()
    (got,) = grads
    for p, g in zip(start.parameters(), got):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_a_value_model_with_grpo_is_an_error_not_ignored(tiny, tmp_path):
    with pytest.raises(common.ConfigError, match="only --algo=ppo has a value model"):
        train_rlvr.main(args_for(tiny, tmp_path / "run", "--algo=grpo", f"--value_model={tiny.model_dir}"))


# Run under torchrun in place of train_rlvr.py: each rank appends its rollouts to OUT/rankR.jsonl, with a digest of
# the random state it sampled them from, so that one rank can replay both ranks' rollouts.
RECORD_ROLLOUTS = textwrap.dedent("""
    import hashlib, json, os, sys
    sys.path.insert(0, sys.argv.pop(1))
    out = sys.argv.pop(1)
    import torch
    import train_rlvr

    def rollout(*args, real=train_rlvr.rollout):
        rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
        samples = real(*args)
        with open(os.path.join(out, f"rank{os.environ['RANK']}.jsonl"), "a") as f:
            f.write(json.dumps({"rng": rng, "samples": samples}) + "\\n")
        return samples

    train_rlvr.rollout = rollout
    train_rlvr.main()
""")


def test_two_ranks_shard_prompts_and_train_as_one_rank_on_the_same_rollouts(tiny, tmp_path, monkeypatch):
    """PPO, whose advantage whitening and loss denominator are sums over ranks. The ranks sample with their own
    random streams, so 1 rank cannot draw their rollouts itself: it replays them, and must then train the same."""
    one, two = tmp_path / "one", tmp_path / "two"
    # one optimizer step per epoch, so that both runs step on the same rows; adam_eps as test_dpo.py's
    # ROUNDING_SAFE_ADAM (a gradient element at rounding level would otherwise move by up to lr either way)
    args = lambda run: args_for(tiny, run, "--algo=ppo", "--num_minibatches=1", "--adam_eps=1e-4",
                                "--lr_bs_ratio=1e-4")
    (tmp_path / "record_rollouts.py").write_text(RECORD_ROLLOUTS)
    torchrun(str(tmp_path / "record_rollouts.py"), [ROOT, tmp_path, *args(two)])
    rank0, rank1 = (read_jsonl(tmp_path / f"rank{r}.jsonl") for r in (0, 1))
    # the same prompt would get the same responses on every rank if they shared one random stream
    assert all(a["rng"] != b["rng"] for a, b in zip(rank0, rank1, strict=True))
    order = data.EpochSampler(len(tiny.demo["rlvr_train"]), seed=0).order(0)
    prompts = lambda indices: [tiny.demo["rlvr_train"][i]["messages"] for i in indices]
    template = data.resolve_template("", tiny.tok)
    # rank 0 of 2 sampled every other prompt of the epoch order, rank 1 the rest (4 samples of each)
    for step, ranks in enumerate(zip(rank0, rank1)):
        for rank, rollout in enumerate(ranks):
            assert [s["prompt_ids"] for s in rollout["samples"]][::4] == [
                data.render_chat(tiny.tok, m, template, add_generation_prompt=True)[0]
                for m in prompts(order[4 * step + rank:4 * step + 4:2])]
    replayed = []

    def replay(policy, tok, rows, *rest):  # 1 rank takes all 4 prompts of a step
        step = len(replayed)
        assert [r["messages"] for r in rows] == prompts(order[4 * step:4 * step + 4])
        replayed.append(step)
        return rank0[step]["samples"] + rank1[step]["samples"]
    monkeypatch.setattr(train_rlvr, "rollout", replay)
    train_rlvr.main(args(one))
    assert replayed == [0, 1]
    # lr = lr_bs_ratio x the global rollout batch, 4 prompts x 4 samples, whatever the number of ranks
    assert [json.load(open(run / "config.json"))["lr"] for run in (one, two)] == pytest.approx([1.6e-3] * 2)
    m1, m2 = no_timing(read_jsonl(one / "metrics.jsonl")), no_timing(read_jsonl(two / "metrics.jsonl"))
    assert [r["rollouts"] for r in m2 if "rollouts" in r] == [16, 16]
    # greedy held-out accuracy of the same starting model: sharded over 2 ranks, then summed == 1 rank
    assert m1[0] == m2[0]
    assert [r.keys() for r in m1] == [r.keys() for r in m2]
    # vf_clip_frac counts tokens whose clipped value is farther from the return; inside the clip range that value,
    # old + (v - old), is v up to rounding, so such a token is counted or not on rounding alone (1 of 384 here)
    for r1, r2 in zip(m1, m2):
        assert r1.pop("vf_clip_frac", 0) == pytest.approx(r2.pop("vf_clip_frac", 0), abs=0.02)
        assert r1 == pytest.approx(r2, rel=1e-4, abs=1e-6)
    w1, w2 = (load_file(run / "final" / "model.safetensors") for run in (one, two))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)


def test_a_step_without_signal_leaves_the_weights_alone_on_two_ranks(tiny, tmp_path):
    """With the non-stop penalty every untrained rollout scores -10, so every GRPO group has zero variance and is
    dropped: no update, on 1 rank as on 2 (where gradients are zero-filled for the all-reduce and weight decay
    would otherwise still shrink the weights)."""
    run = tmp_path / "two"
    torchrun("train_rlvr.py", args_for(tiny, run, "--apply_non_stop_penalty=true", "--weight_decay=0.1",
                                       "--max_steps=1", "--eval_data="))
    record = read_jsonl(run / "metrics.jsonl")[-1]
    assert record["zero_std_groups"] == 4 and record["trained_seqs"] == 0 and record["grad_norm"] == 0.0
    before, after = load_file(os.path.join(tiny.model_dir, "model.safetensors")), \
        load_file(run / "final" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_learning_rate_schedule_counts_optimizer_steps_not_rollouts(tiny, tmp_path, monkeypatch):
    """4 rollouts x 2 epochs x 2 minibatches = 16 optimizer steps: warmup rises over the first 4 of them (open-instruct
    steps its scheduler after every optimizer step), instead of holding the whole first rollout at lr 0."""
    seen = []
    real_set_lr = common.set_lr
    monkeypatch.setattr(common, "set_lr", lambda opt, lr: (seen.append(lr), real_set_lr(opt, lr)))
    train_rlvr.main(args_for(tiny, tmp_path / "run", "--max_steps=4", "--schedule=linear", "--warmup_ratio=0.25",
                             "--eval_data=", "--samples_per_step=0"))
    assert seen == pytest.approx([common.lr_at(k, 16, 1e-3, "linear", 0.25) for k in range(16)])
    assert seen[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_a_resume_before_the_first_checkpoint_starts_the_sample_log_over(tiny, tmp_path):
    run = tmp_path / "run"
    args = args_for(tiny, run, "--max_steps=2", "--eval_data=", "--prompts_per_step=4", "--num_samples=2")
    train_rlvr.main(args)
    first = read_jsonl(run / "samples.jsonl")
    shutil.rmtree(run / "final")  # killed before it finished, with no checkpoint written
    train_rlvr.main(args + ["--resume"])
    steps = [r["step"] for r in read_jsonl(run / "samples.jsonl")]
    assert steps == sorted(steps) and set(steps) == {1, 2}  # logged once: the step numbers never start over
    assert read_jsonl(run / "samples.jsonl") == first


def test_interrupt_and_resume_equals_uninterrupted(tiny, tmp_path):
    run = tmp_path / "run"
    args = args_for(tiny, run, "--checkpoint_every=2", "--keep_checkpoints=3", "--max_steps=4", "--eval_data=",
                    "--prompts_per_step=8", "--num_samples=8")
    train_rlvr.main(args)
    full_metrics, full_samples = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "samples.jsonl")
    full_weights = load_file(run / "final" / "model.safetensors")
    # the resumed steps (3, 4) really trained, so equality is not that of an untouched model
    assert sum(m["trained_seqs"] for m in full_metrics[2:]) > 0
    shutil.rmtree(run / "checkpoints" / "step_0000004")  # the interruption: everything after step 2 is gone
    shutil.rmtree(run / "final")
    train_rlvr.main(args + ["--resume"])
    assert no_timing(read_jsonl(run / "metrics.jsonl")) == no_timing(full_metrics)
    assert read_jsonl(run / "samples.jsonl") == full_samples
    weights = load_file(run / "final" / "model.safetensors")
    for k in full_weights:
        torch.testing.assert_close(weights[k], full_weights[k], rtol=0, atol=0, msg=k)


def test_a_resume_may_change_how_many_samples_it_logs_and_its_held_out_batch(tiny, tmp_path):
    run = tmp_path / "run"
    args = args_for(tiny, run, "--checkpoint_every=1", "--max_steps=2", "--samples_per_step=2")
    train_rlvr.main(args)
    shutil.rmtree(run / "checkpoints" / "step_0000002")
    shutil.rmtree(run / "final")
    train_rlvr.main(args + ["--resume", "--samples_per_step=1", "--eval_batch_size=3"])
    assert [r["step"] for r in read_jsonl(run / "samples.jsonl")] == [1, 1, 2]


def test_a_resumed_run_compares_with_the_accuracy_it_started_from(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    args = args_for(tiny, run, "--checkpoint_every=1", "--keep_checkpoints=3")
    whole = train_rlvr.main(args)
    shutil.rmtree(run / "checkpoints" / "step_0000002")  # killed after step 1
    shutil.rmtree(run / "final")
    capsys.readouterr()
    resumed = train_rlvr.main(args + ["--resume"])  # (its "before" read back from metrics.jsonl: 8 digits)
    assert resumed["before"] == pytest.approx(whole["before"]) and whole["before"]
    assert resumed["after"] == whole["after"]
    assert capsys.readouterr().out.count("(before -> after RLVR)") == len(whole["before"])


def test_a_kill_after_the_last_checkpoint_does_not_log_the_last_evaluation_twice(tiny, tmp_path):
    """Killed while final/ was written: the resume finds the last step's checkpoint, which was saved after that
    step's held-out evaluation, so it has nothing to evaluate or log again."""
    run = tmp_path / "run"
    args = args_for(tiny, run, "--checkpoint_every=1", "--max_steps=1")
    train_rlvr.main(args)
    shutil.rmtree(run / "final")
    train_rlvr.main(args + ["--resume"])
    evals = [m["step"] for m in read_jsonl(run / "metrics.jsonl") if any(k.startswith("eval_acc") for k in m)]
    assert evals == [0, 1]
    assert os.path.isfile(run / "final" / "model.safetensors")


def test_resume_refuses_a_starting_model_retrained_since(tiny, tmp_path, retrain_in_place):
    """The KL reference is --model, rebuilt on resume: retrained weights there would change it mid-run."""
    start = tmp_path / "start"
    shutil.copytree(tiny.model_dir, start)
    args = args_for(tiny, tmp_path / "run", "--checkpoint_every=1", "--max_steps=1", "--eval_data=",
                    f"--model={start}")
    train_rlvr.main(args)
    retrain_in_place(start)
    refused = rf"the model at --model={start} \(its weights or config.json\) is not the one the run"
    with pytest.raises(common.ConfigError, match=refused):
        train_rlvr.main(args + ["--resume"])


def test_a_ground_truth_the_reward_cannot_use_fails_at_load_naming_its_row(tiny, tmp_path):
    rows = tiny.demo["rlvr_train"][:3] + [dict(tiny.demo["rlvr_train"][0], dataset="ifeval",
                                               ground_truth='{"func_name": "validate_word_constraint", "N": 5, '
                                                            '"quantifier": "atleast"}')]
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, rows)
    with pytest.raises(data.DataError, match=r"bad\.jsonl line 4: .*quantifier 'atleast'"):
        train_rlvr.main(args_for(tiny, tmp_path / "run", f"--data={bad}"))


def test_settings_with_nothing_to_train_on_or_that_would_be_ignored_are_errors(tiny, tmp_path):
    with pytest.raises(data.DataError, match=r"data=\S+: no train prompts left \(every prompt is longer than "
                                             r"max_prompt_len=4\)"):
        train_rlvr.main(args_for(tiny, tmp_path / "run", "--max_prompt_len=4"))
    with pytest.raises(common.ConfigError, match=r"--eval_data=\S+: not used without --data"):
        train_rlvr.main(args_for(tiny, tmp_path / "run", "--data="))
    # the tiny model has 512 positions: a prompt and its longest continuation must fit them
    # (the learner's forward reads prompt + response; generation feeds back all new tokens but the last)
    with pytest.raises(data.DataError, match=r"data=\S+: no train prompts left \(every prompt is longer than 2 "
                                             r"tokens \(the model's 512 positions less max_response_len=510\)"):
        train_rlvr.main(args_for(tiny, tmp_path / "run", "--max_response_len=510"))
    with pytest.raises(data.DataError, match=r"eval_data=\S+: no held-out prompts left \(every prompt is longer "
                                             r"than 3 tokens \(the model's 512 positions less eval_max_new_tokens=510 "
                                             r"- 1\)"):
        train_rlvr.main(args_for(tiny, tmp_path / "run", "--eval_max_new_tokens=510"))


def test_demo_without_a_starting_model_says_to_run_train_sft(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/dpo_demo/final, no runs/sft_demo/final here
    with pytest.raises(FileNotFoundError, match="python train_sft.py"):
        train_rlvr.main([f"--config={os.path.join(ROOT, 'configs', 'rlvr_demo.json')}", "--progress=false"])


def test_rlvr_raises_heldout_verified_accuracy_of_the_demo_sft_model(demo_sft_model, tmp_path):
    """The demo story in small: an SFT model trained on noisy demonstrations (most constraint demos ignore the
    constraint) mostly breaks the held-out constraints when decoding greedily; GRPO on fresh prompts, rewarded
    only by verifiers.py, must teach it to keep them. Seeded, so the numbers are the same run to run."""
    result = train_rlvr.main([f"--model={demo_sft_model}", f"--run_dir={tmp_path / 'rlvr'}", "--max_steps=30",
                              "--eval_every=0", "--progress=false"])
    before, after = result["before"], result["after"]
    # n = 100 held-out prompts each, so a score's standard error is about 0.05. Measured with PyTorch's AVX2,
    # AVX-512 and scalar CPU kernels (ATEN_CPU_CAPABILITY), whose rounding trains another SFT model: constraints
    # +0.41, +0.42, +0.34; arithmetic +0.04, -0.01, -0.08.
    assert after["eval_acc_ifeval"] >= before["eval_acc_ifeval"] + 0.2, (before, after)
    assert after["eval_acc_gsm8k"] >= before["eval_acc_gsm8k"] - 0.1, (before, after)  # no loss beyond 2 SE
