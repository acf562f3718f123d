"""common.py: config parsing, batch / lr resolution, schedules, optimizer groups, checkpoints, run folder, the end
of a multi-rank run."""
import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch

import common
import data
from model import CheckpointError
from multirank import ROOT, launch, run_one_rank, torchrun


@dataclass
class Cfg(common.TrainConfig):
    name: str = "x"
    beta: float = 0.1
    limit: Optional[int] = None


def write_json(tmp_path, obj, name="preset.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


def test_preset_then_overrides_with_type_coercion(tmp_path):
    preset = write_json(tmp_path, {"_notes": ["ignored"], "lr": 3e-4, "batch_size": 4, "name": "p", "fsdp": True})
    cfg = common.parse_config(Cfg, [f"--config={preset}", "--batch_size=8", "--beta=2", "--resume",
                                    "--fsdp=false", "--limit=7", "--max-steps=1e3"])
    assert cfg.lr == 3e-4 and cfg.name == "p"
    assert cfg.batch_size == 8 and isinstance(cfg.batch_size, int)
    assert cfg.beta == 2.0 and isinstance(cfg.beta, float)
    assert cfg.resume is True and cfg.fsdp is False
    assert cfg.limit == 7 and cfg.max_steps == 1000
    assert common.parse_config(Cfg, ["--limit=None"]).limit is None
    assert common.parse_config(Cfg, ["--limit=null"]).limit is None


@pytest.mark.parametrize("word,value", [("1", True), ("yes", True), ("on", True), ("TRUE", True),
                                        ("0", False), ("no", False), ("off", False), ("False", False)])
def test_bool_values_accept_every_spelling_of_yes_and_no(word, value):
    assert common.parse_config(Cfg, [f"--fsdp={word}"]).fsdp is value
    assert common.parse_config(Cfg, [f"--fsdp={word}", f"--resume={not value}"]).resume is (not value)


@pytest.mark.parametrize("key,value", [("batch_size", True), ("batch_size", 2.5), ("beta", True), ("fsdp", 1)])
def test_a_preset_value_of_the_wrong_json_type_is_an_error(tmp_path, key, value):
    # JSON true is not 1, and 2.5 sequences is not 2: a preset that says so is wrong, not rounded
    with pytest.raises(common.ConfigError, match=re.escape(f"preset.json: {key}={value!r} is not a valid")):
        common.parse_config(Cfg, [f"--config={write_json(tmp_path, {key: value})}"])


def test_a_later_preset_wins_and_a_preset_must_be_a_json_object(tmp_path):
    first = write_json(tmp_path, {"lr": 1e-3, "name": "first"}, "first.json")
    second = write_json(tmp_path, {"lr": 2e-3}, "second.json")
    cfg = common.parse_config(Cfg, [f"--config={first}", f"--config={second}"])
    assert cfg.lr == 2e-3 and cfg.name == "first"
    with pytest.raises(common.ConfigError, match="list.json: a config preset must be a JSON object"):
        common.parse_config(Cfg, [f"--config={write_json(tmp_path, [['lr', 1e-3]], 'list.json')}"])


def test_unknown_keys_are_errors_naming_them_and_their_source(tmp_path):
    preset = write_json(tmp_path, {"lr": 1e-3, "learning_rate": 1.0, "bsz": 2})
    with pytest.raises(common.ConfigError, match=r"preset.json.*learning_rate, bsz"):
        common.parse_config(Cfg, [f"--config={preset}"])
    with pytest.raises(common.ConfigError, match=r"command line: unknown config key\(s\) lrr, zzz for Cfg; did you "
                                                 r"mean lr for lrr\?$"):
        common.parse_config(Cfg, ["--lrr=1", "--zzz=1"])
    with open(preset, "wb") as f:
        f.write(b'{"name": "caf\xe9"}')  # Latin-1, not UTF-8
    with pytest.raises(common.ConfigError, match=r"preset.json: not UTF-8 text \(byte 13\)"):
        common.parse_config(Cfg, [f"--config={preset}"])


def test_bad_values_are_errors_naming_key_and_value(tmp_path):
    with pytest.raises(common.ConfigError, match=r"batch_size='two'"):
        common.parse_config(Cfg, ["--batch_size=two"])
    with pytest.raises(common.ConfigError, match=r"batch_size='2.5'"):
        common.parse_config(Cfg, ["--batch_size=2.5"])
    with pytest.raises(common.ConfigError, match=r"resume='maybe'"):
        common.parse_config(Cfg, ["--resume=maybe"])
    with pytest.raises(common.ConfigError, match=r"preset.json: name=3"):
        common.parse_config(Cfg, [f"--config={write_json(tmp_path, {'name': 3})}"])
    with pytest.raises(common.ConfigError, match=r"--lr needs a value"):
        common.parse_config(Cfg, ["--lr"])
    with pytest.raises(common.ConfigError, match=r"expected --key=value"):
        common.parse_config(Cfg, ["lr=1"])


def test_lr_bs_ratio_sets_lr_from_the_effective_batch():
    cfg = common.parse_config(Cfg, ["--batch_size=2", "--grad_accum=3", "--lr_bs_ratio=1e-6"])
    assert common.resolve_batch(cfg, world_size=4) == 24
    assert cfg.lr == pytest.approx(24e-6) and cfg.total_batch_size == 24


def test_total_batch_size_derives_grad_accum_for_the_world_size():
    cfg = common.parse_config(Cfg, ["--batch_size=2", "--total_batch_size=32", "--lr_bs_ratio=1.125e-5"])
    assert common.resolve_batch(cfg, world_size=8) == 32 and cfg.grad_accum == 2
    assert cfg.lr == pytest.approx(36e-5)
    with pytest.raises(common.ConfigError, match="not a multiple"):
        common.resolve_batch(common.parse_config(Cfg, ["--batch_size=3", "--total_batch_size=8"]), 1)
    # a total of one sequence is a total too: it overrides a --grad_accum given before it
    cfg = common.parse_config(Cfg, ["--grad_accum=4", "--total_batch_size=1"])
    assert common.resolve_batch(cfg, world_size=1) == 1 and cfg.grad_accum == 1


def test_a_command_line_lr_or_grad_accum_given_last_is_the_one_used(tmp_path):
    """Later wins between lr and lr_bs_ratio, and between grad_accum and total_batch_size, as for any one key: the
    value given last is the one the run uses, not one silently replaced by the other setting."""
    def resolved(argv):
        cfg = common.parse_config(Cfg, ["--batch_size=2"] + argv)
        return common.resolve_batch(cfg, world_size=1), cfg.grad_accum, cfg.lr, cfg.lr_bs_ratio

    assert resolved(["--lr_bs_ratio=1e-4", "--lr=0.5"]) == (2, 1, 0.5, 0.0)
    assert resolved(["--lr=0.5", "--lr_bs_ratio=1e-4"]) == (2, 1, pytest.approx(2e-4), 1e-4)
    assert resolved(["--total_batch_size=32", "--grad_accum=4"])[:2] == (8, 4)
    assert resolved(["--grad_accum=4", "--total_batch_size=32"])[:2] == (32, 16)
    # a preset's setting came first: the command line's lr or grad_accum replaces it
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"lr": 0.1, "lr_bs_ratio": 1e-4, "total_batch_size": 32}))
    assert resolved([f"--config={preset}", "--lr=0.5", "--grad_accum=3"]) == (6, 3, 0.5, 0.0)
    # and the preset's lr gives way to a command-line lr_bs_ratio, SmolTulu's lever
    preset.write_text(json.dumps({"lr": 0.1}))
    assert resolved([f"--config={preset}", "--lr_bs_ratio=1e-3"]) == (2, 1, pytest.approx(2e-3), 1e-3)


def test_total_steps_are_the_whole_steps_of_one_epoch_times_epochs():
    # 10 items, 4 a step: 2 whole steps an epoch (the 2 left over carry into the next epoch), so 3 epochs take 6
    # steps, not ceil(10 / 4) x 3 = 9 nor 30 // 4 = 7
    assert common.total_steps_for(common.parse_config(Cfg, ["--epochs=3"]), 10, 4) == 6
    assert common.total_steps_for(common.parse_config(Cfg, ["--epochs=3", "--max_steps=5"]), 10, 4) == 5
    assert common.total_steps_for(common.parse_config(Cfg, ["--epochs=3"]), 4, 4) == 3  # exactly one step's worth
    with pytest.raises(common.ConfigError, match="the data has 3 items, fewer than one optimizer step takes"):
        common.total_steps_for(common.parse_config(Cfg, []), 3, 4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("total,ratio,warmup", [(50, 0.1, 5), (25, 0.1, 3), (10, 0.03, 1), (100, 0.03, 3)])
def test_schedules_match_transformers_with_the_warmup_rounded_up(schedule, total, ratio, warmup):
    """Tulu 3's scripts pass transformers ceil(ratio x total) warmup steps: 2.5 -> 3, 0.3 -> 1."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    base = 2e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    make = get_linear_schedule_with_warmup if schedule == "linear" else get_cosine_schedule_with_warmup
    sched = make(opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        assert common.lr_at(step, total, base, schedule, ratio) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_schedule_hand_values():
    assert [common.lr_at(s, 10, 1.0, "linear", 0.2) for s in (0, 1, 2, 6, 10)] == pytest.approx([0, .5, 1, .5, 0])
    assert common.lr_at(5, 10, 1.0, "cosine", 0.0) == pytest.approx(0.5)
    assert common.lr_at(10, 10, 1.0, "cosine", 0.0, min_lr_ratio=0.1) == pytest.approx(0.1)
    # the decay runs from lr to min_lr_ratio x lr, not from lr to 0 clipped at the floor: halfway is their mean
    assert common.lr_at(5, 10, 1.0, "linear", 0.0, min_lr_ratio=0.2) == pytest.approx(0.6)
    assert common.lr_at(5, 10, 2.0, "cosine", 0.0, min_lr_ratio=0.2) == pytest.approx(1.2)
    # warmup (4 steps) rises from 0, under the floor; the decay's halfway point is 4 + 6 / 2 = step 7
    assert [common.lr_at(s, 10, 1.0, "linear", 0.4, min_lr_ratio=0.5) for s in (1, 4, 7, 10)] == \
        pytest.approx([0.25, 1.0, 0.75, 0.5])
    assert common.lr_at(7, 10, 1.0, "constant", 0.2) == 1.0
    with pytest.raises(common.ConfigError, match="schedule='step'"):
        common.lr_at(5, 10, 1.0, "step")


def test_precision_auto_is_bf16_on_cuda_only_and_sets_autocast():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [common.resolved_precision(p, cpu) for p in ("auto", "bf16", "fp32")] == ["fp32", "bf16", "fp32"]
    assert [common.resolved_precision(p, cuda) for p in ("auto", "bf16", "fp32")] == ["bf16", "bf16", "fp32"]
    with pytest.raises(common.ConfigError, match="precision='fp16'"):
        common.resolved_precision("fp16", cpu)
    x = torch.randn(2, 3)
    with common.autocast(cpu, "bf16"):
        assert (x @ x.T).dtype == torch.bfloat16
    with common.autocast(cpu, "auto"):
        assert (x @ x.T).dtype == torch.float32


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.gain = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.lin(x) * self.gain


def test_check_positions_allows_exactly_the_models_positions():
    from model import ModelConfig
    model = Tiny()
    model.config = ModelConfig.from_preset("tiny", max_position_embeddings=16)
    common.check_positions(16, model, "data")
    with pytest.raises(common.ConfigError, match=r"data: the longest sequence has 17 tokens.*--max_seq_len=16"):
        common.check_positions(17, model, "data")


def test_refuse_unused_names_every_setting_given():
    cfg = common.parse_config(Cfg, ["--model=m", "--tokenizer=t"])
    with pytest.raises(common.ConfigError, match=r"^--model=m --tokenizer=t: not used here$"):
        common.refuse_unused(cfg, ["data", "model", "tokenizer"], "not used here")
    common.refuse_unused(cfg, ["data", "eval_every"], "not used here")  # unset (empty, 0): nothing to refuse


def test_weights_digest_covers_the_model_config_and_the_parameter_names():
    from model import ModelConfig
    model = Tiny()
    model.config = ModelConfig.from_preset("tiny")
    digest = common.weights_digest(model)
    assert common.weights_digest(model) == digest
    model.config.rope_theta *= 2  # same weights, other positions: other log-probs
    assert common.weights_digest(model) != digest
    model.config.rope_theta /= 2
    renamed = torch.nn.Module()  # the same bytes in the same (sorted) order, under other names
    renamed.config = model.config
    renamed.a_gain, renamed.lin = model.gain, model.lin
    assert common.weights_digest(renamed) != digest


@pytest.mark.parametrize("tied", [True, False])
def test_a_bf16_frozen_copy_stores_the_matmul_weights_autocast_would_cast_and_computes_the_same_bits(tied):
    """A reference under bf16 autocast keeps its nn.Linear weights in bf16 (the embedding and norms stay fp32), and
    its logits and fused-loss log-probs equal the fp32 model's under autocast bit for bit. fp32 copies everything.
    NANOTULU_TEST_DEVICE=cuda runs it on the GPU, with the Triton loss (bench/gpu_checks.sh does)."""
    import nanotulu_kernels as kernels
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    device = torch.device(os.environ.get("NANOTULU_TEST_DEVICE", "cpu"))
    model = Transformer(ModelConfig.from_preset("tiny", tie_word_embeddings=tied)).to(device)
    frozen = common.frozen_copy(model, "bf16", device)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert ("lm_head.weight" in linear) == (not tied)
    assert {name: p.dtype for name, p in frozen.named_parameters()} == \
        {name: torch.bfloat16 if name in linear else torch.float32 for name, _ in model.named_parameters()}
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())  # the original untouched
    ids = torch.randint(0, model.config.vocab_size, (3, 24), device=device)
    with torch.no_grad(), common.autocast(device, "bf16"):
        assert torch.equal(frozen(ids), model(ids))
        logps = [kernels.fused_linear_cross_entropy(m(ids, return_hidden=True).flatten(0, 1), m.output_weight,
                                                    ids.flatten(), reduction="none") for m in (frozen, model)]
    assert torch.equal(*logps)
    assert all(p.dtype == torch.float32 for p in common.frozen_copy(model, "fp32", device).parameters())


def test_weight_decay_only_on_matrices():
    model = Tiny()
    opt = common.build_optimizer(model, common.parse_config(Cfg, ["--weight_decay=0.1"]), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.lin.weight)}


def train_one(model, opt):
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_checkpoint_roundtrip_restores_model_optimizer_rng_and_extra(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_one(model, opt)
    common.save_checkpoint(str(tmp_path), 1, model, opt, extra={"sampler": {"epoch": 3, "pos": 5}})
    expected_draws = (torch.rand(3), random.random(), np.random.rand())
    train_one(model, opt)
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = Tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    torch.manual_seed(123)
    state = common.load_checkpoint(common.latest_checkpoint(str(tmp_path)), fresh, fresh_opt)
    # (model_config: the configs of the Transformers in the model, none in this one)
    assert state == {"step": 1, "extra": {"sampler": {"epoch": 3, "pos": 5}, "model_config": {}}}
    draws = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]
    train_one(fresh, fresh_opt)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected_weights[k]), k


def _anonymous_resident_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def test_a_checkpoint_is_mapped_not_read_into_each_process(tmp_path):
    """Every rank of a node loads the whole checkpoint: read into each process that is the checkpoint's size per
    rank in private memory, mapped it is one copy in the page cache that the ranks share."""
    big = torch.nn.Linear(4096, 4096, bias=False)  # 64 MiB of weights, as many of each AdamW moment
    opt = torch.optim.AdamW(big.parameters())
    big(torch.randn(2, 4096)).sum().backward()
    opt.step()
    common.save_checkpoint(str(tmp_path), 1, big, opt)
    path = common.latest_checkpoint(str(tmp_path))
    before = _anonymous_resident_bytes()
    model_sd = common._read_checkpoint_file(os.path.join(path, "model.pt"), weights_only=True)
    optim_sd = common._read_checkpoint_file(os.path.join(path, "optimizer.pt"))
    assert _anonymous_resident_bytes() - before < 16 * 2**20
    assert torch.equal(model_sd["weight"], big.weight.detach())
    assert torch.equal(optim_sd["state"][0]["exp_avg_sq"], opt.state[big.weight]["exp_avg_sq"])


def test_a_checkpoint_on_a_filesystem_that_cannot_map_files_is_read_whole(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_one(model, opt)
    common.save_checkpoint(str(tmp_path), 1, model, opt)
    real_load = torch.load

    def no_mmap(*args, mmap=None, **kwargs):
        if mmap:
            raise RuntimeError("unable to mmap 1234 bytes from file </ckpt>: No such device (19)")
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", no_mmap)
    fresh = Tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert common.load_checkpoint(common.latest_checkpoint(str(tmp_path)), fresh, fresh_opt)["step"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert torch.equal(fresh_opt.state[fresh.gain]["exp_avg"], opt.state[model.gain]["exp_avg"])


def test_training_on_from_a_mapped_checkpoint_neither_writes_to_it_nor_depends_on_it(tmp_path):
    """On CPU the loaded AdamW moments can stay the mapped tensors themselves (load_state_dict keeps a tensor of the
    right device and dtype): the steps after the resume must not write into the checkpoint, and pruning it must not
    take their values away."""
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_one(model, opt)
    common.save_checkpoint(str(tmp_path), 1, model, opt)
    first = common.latest_checkpoint(str(tmp_path))
    saved = torch.load(os.path.join(first, "optimizer.pt"), weights_only=False)
    torch.manual_seed(1)
    for _ in range(3):
        train_one(model, opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = Tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    common.load_checkpoint(first, fresh, fresh_opt)
    torch.manual_seed(1)
    train_one(fresh, fresh_opt)
    reread = torch.load(os.path.join(first, "optimizer.pt"), weights_only=False)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(reread["state"][0][key], saved["state"][0][key]), key
    common.save_checkpoint(str(tmp_path), 2, fresh, fresh_opt, keep=1)  # deletes the checkpoint it was loaded from
    assert not os.path.exists(first)
    for _ in range(2):
        train_one(fresh, fresh_opt)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_each_rank_resumes_with_the_rng_state_it_saved(tmp_path, monkeypatch):
    """Ranks draw different dropout masks and samples; resuming rank 1 with rank 0's generators would repeat rank
    0's draws on both. A 2-rank world is simulated: all_gather_object hands back each rank's state in rank order."""
    rng_of_rank, draws = [], []
    for seed in (1, 2):
        common.seed_all(seed)
        rng_of_rank.append(common._rng_state())
        draws.append((torch.rand(3), random.random(), np.random.rand()))
    world = {"rank": 0}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: world["rank"])
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, _: out.__setitem__(slice(None),
                                                                                              rng_of_rank))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    model = Tiny()
    common.save_checkpoint(str(tmp_path), 1, model, None)
    for rank in (1, 0):
        world["rank"] = rank
        common.seed_all(123)
        common.load_checkpoint(common.latest_checkpoint(str(tmp_path)), model)
        got = (torch.rand(3), random.random(), np.random.rand())
        assert torch.equal(got[0], draws[rank][0]) and got[1:] == draws[rank][1:], f"rank {rank}"
    # resumed on 4 ranks: ranks 2 and 3 have no saved state; each draws its own, the same at every resume
    resumed = {}
    for rank in (0, 1, 2, 3, 3):
        world["rank"] = rank
        common.load_checkpoint(common.latest_checkpoint(str(tmp_path)), model)
        got = (torch.rand(3), random.random(), np.random.rand())
        assert torch.equal(got[0], resumed.setdefault(rank, got)[0]) and got[1:] == resumed[rank][1:], rank
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.equal(resumed[a][0], resumed[b][0]) and resumed[a][1:] != resumed[b][1:], (a, b)


def test_a_resume_compares_the_model_settings_that_shape_what_it_computes(tmp_path):
    """rope_theta edited since the checkpoint is refused; eos ids, the position limit and the init scale are not
    compared, even where a checkpoint recorded them."""
    from model import ModelConfig, Transformer
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=64))
    common.save_checkpoint(str(tmp_path), 1, model, None, extra={"sampler": {}})
    state_file = os.path.join(common.latest_checkpoint(str(tmp_path)), "state.pt")
    state = torch.load(state_file, weights_only=False)
    state["extra"]["model_config"] = {"": dataclasses.asdict(model.config)}  # recorded whole
    torch.save(state, state_file)
    cfg = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--resume=true"])
    for edit, refused in (({"eos_token_id": [0, 5], "max_position_embeddings": 64, "initializer_range": 1.0}, False),
                          ({"rope_theta": 500.0}, True)):
        now = Transformer(dataclasses.replace(model.config, **edit))
        with pytest.raises(common.ConfigError, match=r"\(rope_theta: 10000.0 then, 500.0 now\)") if refused \
                else contextlib.nullcontext():
            assert common.check_resume(cfg, model_config=common.model_configs(now)).endswith("step_0000001")


def test_resume_refuses_a_checkpoint_trained_with_other_settings(tmp_path):
    from data import EpochSampler
    model, sampler = Tiny(), EpochSampler(8, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    cfg = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--lr=0.01", "--batch_size=2", "--grad_accum=2"])
    common.save_checkpoint(str(tmp_path), 3, model, opt,
                           extra={"sampler": sampler.state_dict(), "config": common.config_dict(cfg)})
    changed = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--resume=true", "--lr=0.1", "--model=other",
                                        "--batch_size=2", "--grad_accum=2"])
    (tmp_path / "config.json").write_text(json.dumps(common.config_dict(cfg)))
    common.prepare_run_dir(changed, common.setup_distributed("cpu"))
    with pytest.raises(common.ConfigError, match=r"other settings \(model: '' then, 'other' now, lr: 0.01 then, "
                                                 r"0.1 now\)"):
        common.maybe_resume(changed, model, opt, sampler)
    # the refused settings are not recorded as the run's
    assert json.loads((tmp_path / "config.json").read_text()) == common.config_dict(cfg)
    # a finished run (say, given more steps) cannot go on under a new schedule; its model can start a new run
    (tmp_path / "final").mkdir()
    with pytest.raises(common.ConfigError, match=r"start a new run \(to train the finished model further: a new run "
                                                 f"with --model={re.escape(str(tmp_path / 'final'))} and another "
                                                 r"--run_dir\)"):
        common.maybe_resume(changed, model, opt, sampler)
    # how the batch is split, how often it logs or checkpoints: a resumed run may change those
    same = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--resume=true", "--lr=0.01", "--batch_size=4",
                                     "--grad_accum=1", "--log_every=5", "--checkpoint_every=9"])
    assert common.maybe_resume(same, model, opt, sampler) == 3


def test_resume_refuses_another_starting_model_seed_or_effective_batch(tmp_path):
    from data import EpochSampler
    model, sampler = Tiny(), EpochSampler(8, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    cfg = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--resume=true", "--model=m"])
    common.save_checkpoint(str(tmp_path), 3, model, opt, extra={"sampler": sampler.state_dict(),
                                                                "config": common.config_dict(cfg),
                                                                "start_weights": "abc"})
    with pytest.raises(common.ConfigError, match=r"--model=m .* is not the one the run .* started from"):
        common.maybe_resume(cfg, model, opt, sampler, start_weights="abd")
    assert common.maybe_resume(cfg, model, opt, sampler, start_weights="abc") == 3
    # the seed and the effective batch change what is trained on: not resumable
    for arg in ("--seed=1", "--total_batch_size=4"):
        other = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--resume=true", "--model=m", arg])
        with pytest.raises(common.ConfigError, match=f"other settings \\({arg[2:].split('=')[0]}: "):
            common.maybe_resume(other, model, opt, sampler)
    # a run's effective batch is recorded as total_batch_size, given or not: a resume on other ranks is told to give it
    ran = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--model=m", "--total_batch_size=32"])
    common.save_checkpoint(str(tmp_path), 4, model, opt, extra={"sampler": sampler.state_dict(), "start_weights": "abc",
                                                                "config": common.config_dict(ran)})
    fewer_ranks = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--resume=true", "--model=m",
                                            "--total_batch_size=16"])
    with pytest.raises(common.ConfigError, match=r"\(total_batch_size: 32 then, 16 now; total_batch_size is the "
                                                 r"effective batch .*: --total_batch_size=32 keeps it on any number "
                                                 r"of ranks\)"):
        common.maybe_resume(fewer_ranks, model, opt, sampler)


def test_resume_refuses_other_training_rows_with_an_error_line(tmp_path):
    """--data names files: rows edited in place (the same count) or added since the checkpoint are refused, by the
    digest the checkpoint recorded; a checkpoint that recorded none still refuses another number of rows."""
    from data import EpochSampler
    model, sampler = Tiny(), EpochSampler(8, seed=0)
    cfg = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--resume=true", "--data=rows/*.parquet"])
    extra = {"sampler": sampler.state_dict(), "config": common.config_dict(cfg)}
    common.save_checkpoint(str(tmp_path), 3, model, None, extra={**extra, "data_digest": "abc"}, keep=1)
    with pytest.raises(common.ConfigError, match=r"--resume: the training rows \(--data=rows/\*.parquet\) are not "
                                                 r"the ones the run in .* trained on"):
        common.maybe_resume(cfg, model, None, sampler, data_digest="abd")
    assert common.maybe_resume(cfg, model, None, sampler, data_digest="abc") == 3
    common.save_checkpoint(str(tmp_path), 4, model, None, extra=extra, keep=1)
    with pytest.raises(common.ConfigError, match=r"--resume: .*step_0000004: EpochSampler.load_state_dict: checkpoint "
                                                 r"has num_items=8, this run has 9"):
        common.maybe_resume(cfg, model, None, EpochSampler(9, seed=0), data_digest="abd")


def test_resume_refuses_a_checkpoint_whose_config_lacks_a_setting_of_this_run(tmp_path):
    # a setting the checkpoint never recorded cannot be known to match
    from data import EpochSampler
    model, sampler = Tiny(), EpochSampler(8, seed=0)
    cfg = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--resume=true", "--beta=0.5"])
    saved = {k: v for k, v in common.config_dict(cfg).items() if k != "beta"}
    common.save_checkpoint(str(tmp_path), 3, model, None, extra={"sampler": sampler.state_dict(), "config": saved})
    with pytest.raises(common.ConfigError, match=r"other settings \(beta: None then, 0.5 now\)"):
        common.maybe_resume(cfg, model, None, sampler)


def test_a_checkpoint_without_its_optimizer_state_does_not_resume_with_a_fresh_one(tmp_path):
    """...and the error (reported as a line, not a traceback) names the checkpoint to fall back on."""
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        common.save_checkpoint(str(tmp_path), step, model, opt)
    older, path = common.list_checkpoints(str(tmp_path))
    os.remove(os.path.join(path, "optimizer.pt"))
    with pytest.raises(CheckpointError, match="optimizer.pt: missing, .*" + re.escape(f"delete {path} to resume "
                                                                                      f"from {older}")):
        common.load_checkpoint(path, model, opt)


def test_a_checkpoint_that_does_not_fit_the_model_is_an_error_naming_it(tmp_path):
    """SFT rebuilds its model from --model on resume: a folder since replaced by another architecture."""
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters())
    common.save_checkpoint(str(tmp_path), 1, model, opt)
    path = common.latest_checkpoint(str(tmp_path))
    wider = torch.nn.Linear(4, 8)
    with pytest.raises(CheckpointError, match=re.escape(path) + r": does not fit the model built from --model, .*"
                                              "Missing key"):
        common.load_checkpoint(path, wider, torch.optim.AdamW(wider.parameters()))
    # parameters grouped otherwise (an optimizer state that does not fit), said the same way
    grouped = Tiny()
    opt = torch.optim.AdamW([{"params": [grouped.gain]}, {"params": grouped.lin.parameters()}])
    with pytest.raises(CheckpointError, match=re.escape(path) + r": does not fit the model .*loaded state dict"):
        common.load_checkpoint(path, grouped, opt)
    # a failure that is not a mismatch (out of memory, a collective) is not dressed as one
    opt.load_state_dict = lambda state: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        common.load_checkpoint(path, Tiny(), opt)


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "state.pt"])
def test_a_checkpoint_file_cut_short_is_named_with_the_checkpoint_to_fall_back_on(tmp_path, name):
    from data import EpochSampler
    model, sampler = Tiny(), EpochSampler(8, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    cfg = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--resume=true"])
    for step in (1, 2):
        common.save_checkpoint(str(tmp_path), step, model, opt,
                               extra={"sampler": sampler.state_dict(), "config": common.config_dict(cfg)})
    older, newest = common.list_checkpoints(str(tmp_path))
    damaged = os.path.join(newest, name)
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    with pytest.raises(CheckpointError, match=re.escape(f"{damaged}: cannot be read") + ".*" +
                       re.escape(f"delete {newest} to resume from {older}")):
        common.maybe_resume(cfg, model, opt, sampler)
    shutil.rmtree(newest)  # what the message says to do
    assert common.maybe_resume(cfg, model, opt, sampler) == 1


def test_dropping_records_after_the_resumed_step_is_atomic_drops_a_torn_last_line_and_names_a_bad_one(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(5)))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed before the rename: the history is whole
        common.drop_records_after(str(path), 2)
    assert len(path.read_text().splitlines()) == 5
    monkeypatch.setattr(os, "replace", real_replace)
    common.drop_records_after(str(path), 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # a kill while a record was written: that part is dropped
    common.drop_records_after(str(path), 2)
    assert path.read_text() == '{"step": 1}\n'
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # anything else broken is not guessed at
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2: not JSON"):
        common.drop_records_after(str(path), 2)


@pytest.mark.parametrize("arg,message", [("--batch_size=0", "batch_size=0: must be at least 1"),
                                         ("--grad_accum=0", "grad_accum=0: must be at least 1"),
                                         ("--log_every=0", "log_every=0: must be at least 1"),
                                         ("--epochs=0", "epochs=0: must be at least 1"),
                                         ("--checkpoint_every=-1", "checkpoint_every=-1: must be at least 0"),
                                         ("--warmup_ratio=5", "warmup_ratio=5.0: must be in [0, 1]"),
                                         ("--adam_beta2=1", "adam_beta2=1.0: must be in [0, 1)"),
                                         ("--adam_eps=-1", "adam_eps=-1.0: must be at least 0.0"),
                                         ("--lr=-0.5", "lr=-0.5: must be at least 0.0"),
                                         ("--lr=inf", "lr='inf' is not a valid float"),
                                         ("--grad_clip=nan", "grad_clip='nan' is not a valid float"),
                                         ("--max_seq_len=-3", "max_seq_len=-3: must be at least 1"),
                                         ("--ref_batch_size=0", "ref_batch_size=0: must be at least 1"),
                                         ("--eval_split=-0.25", "eval_split=-0.25: must be in [0, 1)"),
                                         ("--eval_split=1", "eval_split=1.0: must be in [0, 1)"),
                                         ("--seed=-1", "seed=-1: must be in [0, 2**32)"),
                                         ("--seed=4294967296", "seed=4294967296: must be in [0, 2**32)")])
def test_numbers_out_of_range_fail_when_the_config_is_parsed(arg, message):
    import train_dpo
    with pytest.raises(common.ConfigError, match=re.escape(message)):
        common.parse_config(train_dpo.DPOConfig, [arg])


def test_a_folder_is_replaced_by_renames_and_a_kill_between_them_keeps_the_earlier_one(tmp_path, monkeypatch):
    final, tmp = tmp_path / "final", tmp_path / ".tmp_final"
    for folder, name in ((final, "old.safetensors"), (tmp, "new.safetensors")):
        folder.mkdir()
        (folder / name).write_text(name)
    common.replace_dir(str(tmp), str(final))
    assert os.listdir(final) == ["new.safetensors"] and sorted(os.listdir(tmp_path)) == ["final"]
    tmp.mkdir()
    (tmp / "newer.safetensors").write_text("newer")
    real_replace, calls = os.replace, []

    def killed_at_the_second_rename(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        common.replace_dir(str(tmp), str(final))
    # neither folder was deleted: the earlier one is whole beside, the new one whole where it was written
    assert os.listdir(tmp_path / ".old_final") == ["new.safetensors"] and os.listdir(tmp) == ["newer.safetensors"]


def test_a_folder_is_on_disk_before_it_is_renamed_into_place_and_the_rename_after(tmp_path, monkeypatch):
    final, tmp = tmp_path / "final", tmp_path / ".tmp_final"
    (tmp / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "sub/tokenizer.json"):
        (tmp / name).write_text(name)
    inodes = {os.stat(p).st_ino: os.path.relpath(p, tmp_path) for p in (tmp, tmp / "sub", tmp_path,
                                                                         tmp / "model.safetensors",
                                                                         tmp / "sub/tokenizer.json")}
    real_fsync, real_replace, events = os.fsync, os.replace, []
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(inodes[os.fstat(fd).st_ino]), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    common.replace_dir(str(tmp), str(final))
    rename = events.index("rename")
    assert sorted(events[:rename]) == sorted([".tmp_final", ".tmp_final/sub", ".tmp_final/model.safetensors",
                                              ".tmp_final/sub/tokenizer.json"])
    assert events[rename + 1:] == ["."]  # the folder holding the rename
    assert (final / "sub/tokenizer.json").read_text() == "sub/tokenizer.json"


@pytest.mark.parametrize("code", ["EINVAL", "EBADF", "ENOTSUP"])
def test_a_filesystem_that_cannot_sync_a_folder_still_saves_but_a_file_that_fails_to_sync_stops_it(tmp_path,
                                                                                                    monkeypatch, code):
    real_fsync = os.fsync

    def folders_fail(fd, kind=stat.S_ISDIR):
        if kind(os.fstat(fd).st_mode):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        real_fsync(fd)
    tmp = tmp_path / ".tmp_final"
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("weights")
    monkeypatch.setattr(os, "fsync", folders_fail)
    common.replace_dir(str(tmp), str(tmp_path / "final"))
    assert os.listdir(tmp_path / "final") == ["model.safetensors"]
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("weights")
    monkeypatch.setattr(os, "fsync", lambda fd: folders_fail(fd, kind=stat.S_ISREG))
    with pytest.raises(OSError):
        common.replace_dir(str(tmp), str(tmp_path / "final"))


def test_checkpoints_keep_last_k(tmp_path):
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters())
    for step in (10, 20, 30, 40):
        common.save_checkpoint(str(tmp_path), step, model, opt, keep=2)
    names = [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))]
    assert names == ["step_0000030", "step_0000040"]
    assert sorted(os.listdir(common.checkpoint_dir(str(tmp_path)))) == names
    for step in (9_999_999, 10_000_000):  # past 7 digits the names no longer sort as the numbers do
        common.save_checkpoint(str(tmp_path), step, model, opt, keep=2)
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == ["step_9999999", "step_10000000"]
    os.makedirs(os.path.join(common.checkpoint_dir(str(tmp_path)), "step_10000000_copy"))  # a user's copy
    assert common.latest_checkpoint(str(tmp_path)).endswith("step_10000000")


def test_a_kill_while_old_checkpoints_are_deleted_is_finished_by_the_resume(tmp_path, monkeypatch):
    """The last save of a run is in place, and the kill comes while the oldest is deleted: that one is no longer
    listed half-deleted, and the resume (which saves nothing more at the last step) finishes the prune."""
    from data import EpochSampler
    model, sampler = Tiny(), EpochSampler(8, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    cfg = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--keep_checkpoints=2"])
    extra = {"sampler": sampler.state_dict(), "config": common.config_dict(cfg)}
    for step in (1, 2):
        common.save_checkpoint(str(tmp_path), step, model, opt, keep=2, extra=extra)
    real_rmtree = shutil.rmtree

    def killed_halfway(path, **kwargs):
        if ".deleting_" not in str(path):
            return real_rmtree(path, **kwargs)
        os.remove(os.path.join(path, "model.pt"))
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(str(tmp_path), 3, model, opt, keep=2, extra=extra)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    root = common.checkpoint_dir(str(tmp_path))
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == ["step_0000002", "step_0000003"]
    assert sorted(os.listdir(root)) == [".deleting_step_0000001", "step_0000002", "step_0000003"]
    # a kill before the prune began: three complete checkpoints
    common.save_checkpoint(str(tmp_path), 4, model, opt, keep=0, extra=extra)
    resumed = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--keep_checkpoints=2", "--resume=true"])
    assert common.maybe_resume(resumed, model, opt, sampler) == 4
    assert sorted(os.listdir(root)) == ["step_0000003", "step_0000004"]


FSDP_DEEPER = """
    import common
    from model import CheckpointError

    def sharded(layers):
        model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(layers)])
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        return model, opt
    common.save_checkpoint(RUN, 1, *sharded(2))
    try:
        common.load_checkpoint(common.latest_checkpoint(RUN), *sharded(3))
    except CheckpointError as e:
        print("CheckpointError:", e)
"""


def test_under_fsdp2_a_checkpoint_that_does_not_fit_the_model_is_an_error_naming_it(tmp_path):
    """FSDP2 fills a parameter the checkpoint lacks with the model's own and raises only at the optimizer state."""
    out, err = run_one_rank(FSDP_DEEPER, tmp_path)
    assert "CheckpointError: " in out and "does not fit the model built from --model" in out, out[-2000:] + err[-3000:]
    assert "Missing optimizer state for parameter '2.weight'" in out


def test_a_save_past_a_killed_saves_step_deletes_what_it_left(tmp_path):
    """A save killed before its renames leaves a full-size .tmp_step_N; resumed with another --checkpoint_every, the
    run may never save step N again, so the first save past N deletes it (and a .old_step_N from a kill between the
    renames, until then perhaps the one complete copy of step N)."""
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters())
    common.save_checkpoint(str(tmp_path), 10, model, opt)
    root = common.checkpoint_dir(str(tmp_path))
    for left in (".tmp_step_0000015", ".old_step_0000015"):
        shutil.copytree(os.path.join(root, "step_0000010"), os.path.join(root, left))
    common.save_checkpoint(str(tmp_path), 14, model, opt, keep=1)
    assert sorted(os.listdir(root)) == [".old_step_0000015", ".tmp_step_0000015", "step_0000014"]
    common.save_checkpoint(str(tmp_path), 18, model, opt, keep=1)
    assert os.listdir(root) == ["step_0000018"]


def test_interrupted_save_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters())
    common.save_checkpoint(str(tmp_path), 1, model, opt)
    real_save = torch.save

    def crash_on_optimizer(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise KeyboardInterrupt("killed mid-save")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(str(tmp_path), 2, model, opt)
    monkeypatch.undo()
    # the half-written step 2 exists only under its temporary name, which is never taken for a checkpoint
    assert common.latest_checkpoint(str(tmp_path)).endswith("step_0000001")
    assert common.load_checkpoint(common.latest_checkpoint(str(tmp_path)), Tiny(), None)["step"] == 1


def test_setup_distributed_makes_the_chosen_gpu_the_current_one(monkeypatch):
    """Triton launches on the current device, and the CUDA RNG state is read from it: --device=cuda:1 must make
    GPU 1 current, and under torchrun each rank's LOCAL_RANK GPU (no CUDA here: set_device is recorded)."""
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert common.setup_distributed("cuda:1").device == torch.device("cuda", 1)
    assert made_current == [torch.device("cuda", 1)]
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert common.setup_distributed("cuda").device == torch.device("cuda", 3)
    assert made_current[-1] == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # more ranks on the node than GPUs it shows them
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(common.ConfigError, match=r"4 ranks on this node \(LOCAL_WORLD_SIZE\), but each sees 2 "
                                                 r"GPU\(s\) \(CUDA_VISIBLE_DEVICES=4,5\)"):
        common.setup_distributed("cuda")
    # the node's first rank, the one that reports errors, refuses too
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(common.ConfigError, match=r"4 ranks on this node"):
        common.setup_distributed("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert common.setup_distributed("cuda").device == torch.device("cuda", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: a fixed GPU index would put every rank on one GPU
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        common.setup_distributed("cuda:1")


def test_setup_distributed_on_a_machine_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(common.ConfigError, match="device='cuda': .* sees no CUDA GPU"):
        common.setup_distributed("cuda")


def test_only_rank_0_gives_the_library_warnings(monkeypatch, caplog):
    """Every rank loads and tokenizes the same rows, so each of data.py's warnings came once per rank."""
    same_answer = [{"prompt": "q", "chosen": "a", "rejected": "a"}]
    for var in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    try:
        for rank, warned in (("0", True), ("1", False)):
            monkeypatch.setenv("RANK", rank)
            common.setup_distributed("cpu")
            caplog.clear()
            data.load_preference_rows(same_answer)
            assert ("1 of 1 pairs have the same chosen and rejected answer" in caplog.text) == warned
    finally:
        logging.getLogger("nanotulu").setLevel(logging.NOTSET)


def test_a_line_printed_under_a_progress_bar_starts_a_line_of_its_own(monkeypatch):
    """stdout and the bar's stderr on one terminal: the final evaluation's line was appended to the finished bar."""
    import io
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    bar = common.progress_bar(3, 0, True, "sft")
    bar.update(3)
    common.print0("step 3: held-out loss 1.0")
    bar.close()
    text = terminal.getvalue()
    assert text[text.index("step 3: held-out loss 1.0") - 1] in "\r\n"


def test_fsdp_in_a_single_process_says_it_runs_unwrapped(capsys):
    model = torch.nn.Linear(2, 2)
    assert common.wrap_model(model, common.setup_distributed("cpu"), fsdp=True) is model
    assert "--fsdp=true in a single process: there is nothing to shard" in capsys.readouterr().out


def test_resume_without_a_checkpoint_says_it_starts_over(tmp_path, capsys):
    cfg = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--resume=true"])
    assert common.maybe_resume(cfg, torch.nn.Linear(2, 2), None, None) == 0
    out = capsys.readouterr().out
    assert "no checkpoint" in out and "starting from step 0" in out and "--checkpoint_every=0 writes none" in out


def test_run_dir_config_and_metrics_truncated_on_resume(tmp_path):
    cfg = common.parse_config(Cfg, [f"--run_dir={tmp_path}", "--lr=0.5"])
    d = common.setup_distributed("cpu")
    common.prepare_run_dir(cfg, d)
    common.write_run_config(cfg)
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.5
    log = common.MetricsLogger(str(tmp_path))
    log.log({"step": 0, "eval_loss": 3.0})
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step})
    common.MetricsLogger(str(tmp_path), resume_step=3).log({"step": 4, "loss": 0.0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows[-1]["loss"] == 0.0
    # resumed before any checkpoint (resume step 0): the run starts over, its step-0 evaluation included, so the
    # earlier step-0 record goes too
    common.MetricsLogger(str(tmp_path), resume_step=0).log({"step": 0, "eval_loss": 2.0})
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [{"step": 0, "eval_loss": 2.0}]
    # floats keep 8 significant digits, however small (DPO learning rates are around 5e-7)
    common.MetricsLogger(str(tmp_path)).log({"step": 1, "lr": 5e-7 * 17 / 18})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == 4.7222222e-07
    # a fresh run (no --resume) starts its folder over: the config is written again once it is resolved
    common.prepare_run_dir(cfg, d)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.json").exists()


def test_a_fresh_run_refuses_to_delete_the_model_it_starts_from(tmp_path):
    """Training a finished run's model further in its own folder would delete that model before loading it."""
    d = common.setup_distributed("cpu")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_text("weights")
    for flags in ([], ["--overwrite=true"], ["--resume=true", "--overwrite=true"]):
        cfg = common.parse_config(Cfg, [f"--run_dir={tmp_path}", f"--model={tmp_path}/final/", *flags])
        with pytest.raises(common.ConfigError, match=f"--model={re.escape(str(tmp_path))}/final/ is inside "
                                                     f"{re.escape(str(tmp_path / 'final'))}, which a fresh run in "
                                                     r"run_dir=.* deletes: pass another --run_dir"):
            common.prepare_run_dir(cfg, d)
    assert (tmp_path / "final" / "model.safetensors").exists()
    elsewhere = common.parse_config(Cfg, [f"--run_dir={tmp_path / 'more'}", f"--model={tmp_path}/final"])
    common.prepare_run_dir(elsewhere, d)  # another run_dir: fine
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "config.json").write_text("{}")  # a model folder given as run_dir too
    itself = common.parse_config(Cfg, [f"--run_dir={tmp_path / 'snapshot'}", f"--model={tmp_path}/snapshot/"])
    with pytest.raises(common.ConfigError, match=r"--model=.*/snapshot/ is run_dir, whose config.json a fresh run "
                                                 r"replaces: pass another --run_dir"):
        common.prepare_run_dir(itself, d)
    assert (tmp_path / "snapshot" / "config.json").exists()


def test_a_fresh_run_refuses_to_delete_an_earlier_runs_checkpoints_and_final(tmp_path):
    d = common.setup_distributed("cpu")
    for earlier in ("checkpoints/step_0000004", "final"):
        run = tmp_path / earlier.split("/")[0]
        (run / earlier).mkdir(parents=True)
        (run / earlier / "model.safetensors").write_text("weights")
        (run / "metrics.jsonl").write_text('{"step": 4}\n')
        fresh = common.parse_config(Cfg, [f"--run_dir={run}"])
        resume = common.parse_config(Cfg, [f"--run_dir={run}", "--resume=true"])
        if earlier == "final":  # a finished run without checkpoints: a resume would start over and replace it
            with pytest.raises(common.ConfigError, match=r"holds an earlier run .*: pass --overwrite=true") as e:
                common.prepare_run_dir(fresh, d)
            assert "--resume" not in str(e.value)
            with pytest.raises(common.ConfigError, match=r"--resume=true: .* holds a finished model .* no "
                                                         r"checkpoint .*--overwrite=true"):
                common.prepare_run_dir(resume, d)
            assert (run / "final" / "model.safetensors").exists()
            # as it says: with --overwrite=true too, the run starts over, and the folder with it
            common.prepare_run_dir(common.parse_config(Cfg, [f"--run_dir={run}", "--resume=true",
                                                             "--overwrite=true"]), d)
            assert not (run / "final").exists() and not (run / "metrics.jsonl").exists()
            (run / earlier).mkdir(parents=True)
            (run / earlier / "model.safetensors").write_text("weights")
            (run / "metrics.jsonl").write_text('{"step": 4}\n')
        else:
            with pytest.raises(common.ConfigError, match=r"holds an earlier run .*--resume=true.*--overwrite=true"):
                common.prepare_run_dir(fresh, d)
            common.prepare_run_dir(resume, d)
        assert (run / earlier / "model.safetensors").exists() and (run / "metrics.jsonl").exists()
        common.prepare_run_dir(common.parse_config(Cfg, [f"--run_dir={run}", "--overwrite=true"]), d)
        assert not (run / earlier.split("/")[0]).exists() and not (run / "metrics.jsonl").exists()


HOLD_RUN_DIR = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import common
    common.lock_run_dir(sys.argv[2])
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_run_dir_another_process_is_training_in_is_refused_until_that_process_ends(tmp_path):
    """A job launched twice, or a rerun while the first is still going: two writers interleaved their metrics and
    replaced each other's checkpoints. Nothing in the folder is touched by the refused run."""
    d = common.setup_distributed("cpu")
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "model.safetensors").write_text("weights")
    script = tmp_path / "hold.py"
    script.write_text(HOLD_RUN_DIR)
    holder = subprocess.Popen([sys.executable, str(script), ROOT, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        overwrite = common.parse_config(Cfg, [f"--run_dir={run}", "--overwrite=true"])
        # refused as in use, not told to pass --overwrite or --resume, which would not help
        for cfg in (overwrite, common.parse_config(Cfg, [f"--run_dir={run}"])):
            with pytest.raises(common.ConfigError, match=rf"run_dir={re.escape(str(run))} is in use: pid "
                                                         rf"{holder.pid} on \S+ is training there"):
                common.prepare_run_dir(cfg, d)
        assert (run / "final" / "model.safetensors").exists()
    finally:
        holder.kill()  # however its holder ends, the lock goes with it
        holder.wait()
    common.prepare_run_dir(overwrite, d)
    assert not (run / "final").exists()
    # a process trains one run at a time: the next run it starts (after a main() that raised, say) lets go of this one
    common.prepare_run_dir(common.parse_config(Cfg, [f"--run_dir={tmp_path / 'next'}"]), d)
    holder = subprocess.Popen([sys.executable, str(script), ROOT, str(run)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    holder.kill()
    holder.wait()
    common.prepare_run_dir(overwrite, d)  # and the same folder again
    common.prepare_run_dir(overwrite, d)


def test_under_torchrun_a_run_dir_in_use_is_said_once_by_the_ranks_not_as_a_broken_collective(tmp_path):
    """Only rank 0 takes the lock: the other ranks, waiting for it in a barrier, printed gloo's 'Connection closed
    by peer' traceback when it left."""
    script = tmp_path / "hold.py"
    script.write_text(HOLD_RUN_DIR)
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, str(script), ROOT, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        returncode, out, err = launch("train_sft.py", [f"--run_dir={run}", "--max_steps=1"], timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert returncode != 0
    assert (out + err).count(f"error: run_dir={run} is in use") == 1, err[-3000:]
    assert "rank1]: Traceback" not in out + err and "Connection closed by peer" not in out + err, err[-3000:]


def test_an_empty_config_flag_is_an_error_naming_it():
    with pytest.raises(common.ConfigError, match="--config needs a preset file"):
        common.parse_config(Cfg, ["--config="])


def test_a_misspelt_schedule_fails_when_the_config_is_parsed():
    # lr_at reads the schedule only after warmup, which on a paper preset is thousands of steps in
    with pytest.raises(common.ConfigError, match="schedule='cosin': expected linear, cosine, constant"):
        common.parse_config(Cfg, ["--schedule=cosin", "--warmup_ratio=0.5"])


def test_help_shows_the_values_a_preset_and_overrides_set(tmp_path, capsys):
    preset = write_json(tmp_path, {"lr": 9e-5, "max_steps": 7})
    with pytest.raises(SystemExit):
        common.parse_config(Cfg, [f"--config={preset}", "--max_steps=3", "--help"])
    out = capsys.readouterr().out
    assert "--lr=9e-05" in out and "--max_steps=3" in out and "--batch_size=1" in out


def test_help_lists_every_field_with_its_default_and_comment(capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_config(common.TrainConfig, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in ("run_dir", "lr_bs_ratio", "total_batch_size", "resume"):
        assert f"--{f}=" in out
    assert "lr = lr_bs_ratio x effective batch" in out  # the comment beside the field


def test_final_save_replaces_old_final_and_leftover_temp_folder(tmp_path):
    from model import ModelConfig, Transformer
    model = Transformer(ModelConfig.from_preset("tiny"))
    run_dir = str(tmp_path)
    os.makedirs(os.path.join(run_dir, "final"))
    open(os.path.join(run_dir, "final", "stale.txt"), "w").close()
    os.makedirs(os.path.join(run_dir, ".tmp_final"))  # left by a run killed while saving
    open(os.path.join(run_dir, ".tmp_final", "half_written.safetensors"), "w").close()
    path = common.save_final(run_dir, model)
    assert "stale.txt" not in os.listdir(path)
    assert "half_written.safetensors" not in os.listdir(path)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(path))
    assert not os.path.exists(os.path.join(run_dir, ".tmp_final"))
    loaded = Transformer.from_pretrained(path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_final_save_killed_midway_leaves_no_final_or_the_earlier_one_whole(tmp_path, monkeypatch):
    """final/ is what a later stage loads and what the demo takes as a finished stage: a save killed while it
    writes the weights must leave either no final/ or the earlier one, never config.json beside half a model."""
    import safetensors.torch
    from model import ModelConfig, Transformer
    real_save_file = safetensors.torch.save_file

    def killed_halfway(tensors, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a safetensors file")
        raise KeyboardInterrupt

    def files(folder):
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    def killed_save_final(run_dir):
        monkeypatch.setattr(safetensors.torch, "save_file", killed_halfway)
        with pytest.raises(KeyboardInterrupt):
            common.save_final(str(run_dir), Transformer(ModelConfig.from_preset("tiny", vocab_size=32)))
        monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)

    killed_save_final(tmp_path / "first")
    assert not (tmp_path / "first" / "final").exists()
    common.save_final(str(tmp_path / "again"), Transformer(ModelConfig.from_preset("tiny", vocab_size=32)))
    earlier = files(tmp_path / "again" / "final")
    killed_save_final(tmp_path / "again")
    assert files(tmp_path / "again" / "final") == earlier


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize("name", sorted(os.listdir(CONFIGS)))
def test_every_shipped_preset_parses_under_its_trainer(name):
    """A misspelt key in a preset fails here, not hours into a GPU job."""
    import train_dpo
    import train_rlvr
    import train_sft
    config_class = {"sft": train_sft.SFTConfig, "dpo": train_dpo.DPOConfig, "rm": train_dpo.DPOConfig,
                    "rlvr": train_rlvr.RLVRConfig, "sweep": train_sft.SFTConfig}[name.split("_")[0]]
    cfg = common.parse_config(config_class, [f"--config={os.path.join(CONFIGS, name)}"])
    assert cfg.lr > 0


# gloo's worker threads run only when nothing else of the rank can, so that one which completes a collective is
# preempted by the main thread it wakes before it lets go of the collective's tensor (which takes the GIL). Without
# teardown's wait for it, 8 of 10 such runs aborted at exit ("terminate called without an active exception", the
# FSDP test's one failure) where the 2-rank DPO test, on a loaded box, hung in DDP's destructor instead.
SLOW_GLOO_WORKERS = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import torch.distributed as dist
    import common

    rank = int(os.environ["RANK"])
    os.sched_setaffinity(0, {rank % os.cpu_count()})  # one core per rank; the threads started from here inherit it
    d = common.setup_distributed("cpu")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))  # its reducer holds the group
    model(torch.ones(3, 2)).sum().backward()
    workers = [int(t) for t in os.listdir("/proc/self/task")
               if open(f"/proc/self/task/{t}/comm").read().strip() == "pt_gloo_runloop"]
    assert workers, "no gloo worker threads found"
    for tid in workers:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    dist.all_reduce(torch.ones(1))  # a tensor of Python's: the worker lets go of it only with the GIL
    common.teardown_distributed()
    del model  # the group's last reference: its destructor joins gloo's worker threads
    print(f"rank {rank}: clean exit", flush=True)
""")


def test_the_ranks_end_cleanly_when_gloo_is_slow_to_let_go_of_the_last_collective(tmp_path):
    script = tmp_path / "slow_gloo_workers.py"
    script.write_text(SLOW_GLOO_WORKERS)
    out = torchrun(str(script), [ROOT], timeout=120)
    assert sorted(re.findall(r"rank \d: clean exit", out)) == ["rank 0: clean exit", "rank 1: clean exit"]


DDP_BUFFERS = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import common
    from model import ModelConfig, Transformer
    d = common.setup_distributed("cpu")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    wrapped = common.wrap_model(model, d)
    if d.rank == 1:  # a buffer that differs between the ranks shows whether a forward broadcasts rank 0's
        model.rope_cos.mul_(2)
    before = model.rope_cos.clone()
    wrapped(torch.ones(1, 4, dtype=torch.long)).sum().backward()
    assert torch.equal(model.rope_cos, before), f"rank {d.rank}: the forward overwrote its rope table"
    common.teardown_distributed()
    print(f"rank {d.rank}: own buffers", flush=True)
""")


def test_ddp_forwards_do_not_broadcast_the_buffers(tmp_path):
    """The model's only buffers are its rope tables, the same on every rank: DDP's default would send rank 0's to
    every rank at every forward (and make a no-grad forward a collective)."""
    script = tmp_path / "ddp_buffers.py"
    script.write_text(DDP_BUFFERS)
    returncode, out, err = launch(str(script), [ROOT], timeout=120)
    assert returncode == 0, err[-3000:]
    assert sorted(re.findall(r"rank \d: own buffers", out)) == ["rank 0: own buffers", "rank 1: own buffers"]
    assert "deprecated" not in err  # (torch 2.13 deprecates broadcast_buffers, with a warning from each rank)


def test_ctrl_c_ends_a_script_with_one_line_saying_where(monkeypatch, capsys):
    def main():
        raise KeyboardInterrupt
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for resumable, hint in ((False, ""), (True, "; --resume=true continues from the newest checkpoint, if one was "
                                                "written (they are written whole)")):
        with pytest.raises(SystemExit) as e:
            common.run_script(main, resumable=resumable)
        assert e.value.code == 130
        err = capsys.readouterr().err
        assert re.fullmatch(r"interrupted \(in main, tests/test_common.py:\d+\)" + re.escape(hint) + "\n", err), err


def test_sigterm_ends_a_script_as_ctrl_c_does_and_the_callers_handler_is_put_back(monkeypatch, capsys):
    """What a scheduler sends at preemption or its time limit: it killed the process without a word."""
    import signal

    def main():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the handler runs at once, in this frame)
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        common.run_script(main, resumable=True)
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) is before
    assert re.fullmatch(r"terminated \(SIGTERM\) \(in main, tests/test_common.py:\d+\); --resume=true continues from "
                        r"the newest checkpoint, if one was written \(they are written whole\)\n", capsys.readouterr().err)


def test_ctrl_c_that_a_library_turns_into_another_error_on_its_way_out_is_still_one_line(monkeypatch, capsys):
    """torch.save cut mid-record by Ctrl-C fails to close its zip with a RuntimeError whose context is the
    KeyboardInterrupt; a bug's error that no Ctrl-C is behind keeps its traceback."""
    def write_record():
        raise KeyboardInterrupt

    def save():
        try:
            write_record()
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2972480 vs 2972368")
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as e:
        common.run_script(save, resumable=True)
    assert e.value.code == 130
    assert re.match(r"interrupted \(in write_record, tests/test_common.py:\d+\) \(then, while stopping: RuntimeError: "
                    r"\[enforce fail .*\); --resume=true", capsys.readouterr().err)

    def bug():
        try:
            raise KeyError("x")
        finally:
            raise RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        common.run_script(bug)
    looped, other = RuntimeError("a"), RuntimeError("b")  # contexts set by hand can loop
    looped.__context__, other.__context__ = other, looped

    def loop():
        raise looped
    with pytest.raises(RuntimeError, match="a"):
        common.run_script(loop)


def test_under_torchrun_a_refusal_is_said_once(tmp_path):
    """Every rank meets the same mistyped flag: eight ranks said it eight times, above torchrun's own report."""
    returncode, out, err = launch("train_sft.py", [f"--run_dir={tmp_path}", "--max_step=10"], timeout=120)
    assert returncode != 0
    assert (out + err).count("error: command line: unknown config key(s) max_step for SFTConfig") == 1, err


RANKS_REFUSE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    import common
    def main():
        rank = int(os.environ["LOCAL_RANK"])
        if sys.argv[2] == "alone" and rank == 0:
            time.sleep(60)  # fine, and waiting (as in a collective) for the rank that fails
        time.sleep(0.5 if rank == 0 else 0)  # the first rank meets the refusal last
        raise common.ConfigError("a refusal")
    common.run_script(main)
""")


@pytest.mark.parametrize("case, said", [("all", "error: a refusal"), ("alone", "rank 1 of this node: error: a refusal")])
def test_a_refusal_is_said_once_whichever_rank_meets_it_first(tmp_path, case, said):
    """torchrun stops the other ranks at the first failure: a rank that left quietly at once had the first rank
    stopped before it said anything, and a refusal met by one rank alone was never said."""
    script = tmp_path / "refuse.py"
    script.write_text(RANKS_REFUSE)
    returncode, out, err = launch(str(script), [ROOT, case], timeout=120)
    assert returncode != 0 and (out + err).count("error: a refusal") == 1 and said in out + err, err


NODE_LOCAL_RUN_DIRS = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import common

    d = common.setup_distributed("cpu")
    # each rank on a node of its own, with a run_dir of its own at the same path
    run_dir = os.path.join(sys.argv[2], f"node{d.rank}")
    rows = "rows"
    if sys.argv[3] == "rank0_saved":  # only rank 0 sees the checkpoint rank 0 wrote
        if d.rank == 0:
            os.makedirs(os.path.join(run_dir, "checkpoints", "step_0000004"))
    elif sys.argv[3] == "other_rows":  # one shared run_dir, but each node reads its own copy of --data
        run_dir, rows = os.path.join(sys.argv[2], "shared"), f"rows of node {d.rank}"
        model = torch.nn.Linear(2, 2)
        common.save_checkpoint(run_dir, 4, model, None, extra={"sampler": {}, "data_digest": "rows of node 0"})
    else:  # each node holds a step_0000004 that a run of its own wrote, each rank as rank 0 of that run
        os.environ["RANK"] = "0"
        model = torch.nn.Linear(2, 2)
        common.save_checkpoint(run_dir, 4, model, torch.optim.AdamW(model.parameters()), extra={"sampler": {}})
        os.environ["RANK"] = str(d.rank)
    cfg = common.parse_config(common.TrainConfig, [f"--run_dir={run_dir}", "--resume=true"])
    try:
        common.maybe_resume(cfg, torch.nn.Linear(2, 2), None, None, data_digest=rows)
    except common.ConfigError as e:
        print(f"rank {d.rank} refused: {e}", flush=True)
    common.teardown_distributed()
""")


@pytest.mark.parametrize("case,refusal", [
    ("rank0_saved", r"the ranks see different checkpoints .*rank 0: step_0000004, rank 1: none\); with several nodes, "
                    r"run_dir must be on a filesystem they all share"),
    ("two_runs", r"the ranks' .*node{rank}/checkpoints/step_0000004 were written by different runs .*; with several "
                 r"nodes, run_dir must be on a filesystem they all share"),
    ("other_rows", r"the ranks do not resume alike \(their settings resolved from --model, its weights or the "
                   r"training rows differ\); with several nodes, every node must read the same files"),
])
def test_resume_refuses_when_the_ranks_see_different_checkpoints(tmp_path, case, refusal):
    """Several nodes without a shared run_dir: rank 0 would resume at step 4 and rank 1 start at 0 (or from what
    another run left at the same path), and their collectives would stop matching; every rank refuses instead. So
    with a shared run_dir and a --data each node reads a copy of: rank 0 would resume and rank 1 refuse."""
    script = tmp_path / "node_local.py"
    script.write_text(NODE_LOCAL_RUN_DIRS)
    out = torchrun(str(script), [ROOT, tmp_path, case], timeout=120)
    for rank in (0, 1):
        assert re.search(rf"rank {rank} refused: --resume: " + refusal.replace("{rank}", str(rank)), out), out
