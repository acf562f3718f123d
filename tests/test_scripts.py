"""scripts/demo.py and scripts/sweep.py, end to end with very short runs: their tables, plots and reports, the
reuse of finished work on a second run, --redo, and a failed sweep point that does not stop the others; and
scripts/install.sh's refusal of a torch that is too old; no module of the repository hiding an installed package."""
import argparse
import csv
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import common  # noqa: E402
import demo  # noqa: E402
import sweep  # noqa: E402

SHORT = ["--sft_args=--max_steps=3 --eval_every=0 --cache_dir=", "--dpo_args=--max_steps=2 --eval_every=0",
         "--rlvr_args=--max_steps=1 --eval_every=0 --prompts_per_step=4 --num_samples=2 --max_response_len=16",
         "--eval_limit=6", "--threads=1"]


def stage_mtimes(out):
    return {s: os.path.getmtime(os.path.join(out, s, "final", "model.safetensors")) for s in ("sft", "dpo", "rlvr")}


def test_demo_runs_every_stage_then_reuses_them_and_redo_reruns_downstream(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out means the same folder to the script and to its trainers
    out = "demo"
    rows = demo.main(["--out", out, *SHORT])
    assert [r["stage"] for r in rows] == ["sft", "dpo", "rlvr"]
    for r in rows:
        for key in ("arith_acc", "constraint_acc", "pref_acc"):
            assert 0.0 <= r[key] <= 1.0
        assert r["train_seconds"] > 0
    report = open(os.path.join(out, "report.md")).read()
    assert "| SFT |" in report and "| DPO |" in report and "| RLVR |" in report and "from scratch" in report
    rlvr_line = next(line for line in report.splitlines() if line.startswith("- RLVR: "))
    assert "prompts_per_step=" in rlvr_line and "total_batch_size" not in rlvr_line  # RLVR takes none
    # each stage's length as it ran: max_steps (set here) in place of the epochs it overrides
    settings = [line for line in report.splitlines() if line.startswith(("- SFT: ", "- DPO: ", "- RLVR: "))]
    assert len(settings) == 3 and all("max_steps=" in line and "epochs=" not in line for line in settings)
    assert os.path.exists(os.path.join(out, "curves.png")) or os.path.exists(os.path.join(out, "curves.txt"))
    assert json.load(open(os.path.join(out, "table.json"))) == rows
    first = stage_mtimes(out)

    again = demo.main(["--out", out, *SHORT])  # nothing retrained, the same scores from the cached evaluations
    assert stage_mtimes(out) == first and again == rows

    demo.main(["--out", out, "--redo=dpo", *SHORT])  # DPO and the RLVR stage built on it run again, SFT does not
    redone = stage_mtimes(out)
    assert redone["sft"] == first["sft"] and redone["dpo"] > first["dpo"] and redone["rlvr"] > first["rlvr"]

    # other arguments for a stage: that stage is trained again, not reused
    other = [a.replace("--max_response_len=16", "--max_response_len=12") for a in SHORT]
    demo.main(["--out", out, *other])
    changed = stage_mtimes(out)
    assert changed["sft"] == first["sft"] and changed["dpo"] == redone["dpo"] and changed["rlvr"] > redone["rlvr"]

    # SFT trained again on its own (or in a run killed after it): the stages after it are not reused on top of it
    longer = [a.replace("--max_steps=3", "--max_steps=4") for a in other]
    demo.main(["--out", out, "--stages=sft", *longer])
    demo.main(["--out", out, *longer])
    last = stage_mtimes(out)
    assert last["sft"] > changed["sft"] and last["dpo"] > changed["dpo"] and last["rlvr"] > changed["rlvr"]


def test_demo_as_a_script_runs_the_avx2_cpu_kernels_and_records_them(tmp_path):
    """`python scripts/demo.py` pins PyTorch's CPU kernels before torch loads, in itself and in its trainers, so that
    a seed's table does not depend on the processor's vector width; the report says which kernels ran."""
    env = {k: v for k, v in os.environ.items() if k not in demo.CPU_KERNELS}
    pinned = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                            env={**env, **demo.CPU_KERNELS}, capture_output=True, text=True, check=True).stdout.strip()
    out = tmp_path / "demo"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), f"--out={out}", "--stages=sft",
                    *SHORT], env=env, capture_output=True, text=True, check=True, timeout=600)
    assert f"CPU kernels {pinned} (ATEN_CPU_CAPABILITY=avx2)" in (out / "report.md").read_text()


def test_pinned_cpu_kernels_keep_their_own_compile_cache_and_leave_a_users_choice(monkeypatch):
    for key in (*demo.CPU_KERNELS, "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(key, raising=False)
    demo.pin_cpu_kernels()
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2" and os.environ["MKL_CBWR"] == "AVX2"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(ROOT, "runs", "torchinductor_avx2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    demo.pin_cpu_kernels()
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx512"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith("torchinductor_avx512")


def test_a_failed_demo_stage_ends_with_one_line_naming_it_not_a_traceback(tmp_path):
    """The trainer's error was followed by a CalledProcessError traceback."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), f"--out={tmp_path / 'demo'}",
                          "--sft_args=--lr=abc", "--threads=1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "error: command line: lr='abc' is not a valid float" in out.stderr  # the trainer's own message
    assert out.stderr.splitlines()[-1] == ("error: the sft stage failed: train_sft.py exited with status 1 (its "
                                           "output is above)")


def started_to_die_with_its_parent(kwargs):
    """run_child's mark on a subprocess.run call, on Linux."""
    return "preexec_fn" in kwargs or not sys.platform.startswith("linux")


def test_a_demo_stage_killed_by_a_signal_is_said_so(tmp_path, monkeypatch):
    def killed(cmd, **kwargs):
        assert started_to_die_with_its_parent(kwargs)
        return subprocess.CompletedProcess(cmd, -9)
    monkeypatch.setattr(demo.subprocess, "run", killed)
    with pytest.raises(SystemExit, match=r"^error: the sft stage failed: train_sft.py was killed by signal 9 "):
        demo.run_stage("sft", "train_sft.py", None, str(tmp_path), 0, 1, "")


def _running(pid):  # (a child whose parent died is a zombie until something reaps it: that is not running)
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_trainer_started_by_the_demo_or_the_sweep_ends_when_they_are_killed(tmp_path):
    """Killed by PID (the OOM killer, a scheduler), the demo left its trainer running, and a rerun put a second one
    in the same run folder: two writers of its checkpoints and metrics."""
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    scripts = os.path.join(ROOT, "scripts")
    parent = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {scripts!r}); import demo; "
                               f"demo.run_child([sys.executable, '-c', {child!r}])"])
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    assert _running(pid)
    parent.kill()
    parent.wait()
    for _ in range(100):
        if not _running(pid):
            break
        time.sleep(0.1)
    assert not _running(pid), "the child outlived its killed parent"


def test_ctrl_c_ends_the_demo_or_the_sweep_with_one_line(capsys):
    """The trainer under them says where it stopped; then came the script's own KeyboardInterrupt traceback."""
    def main():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        demo.interrupted_in_one_line(main)
    assert e.value.code == 130
    assert capsys.readouterr().err.count("\n") == 1


def test_the_demos_records_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A demo_time.json cut short by a kill stopped every later demo run with a JSONDecodeError."""
    path = str(tmp_path / "demo_time.json")
    demo.write_json(path, {"train_seconds": 1.0})

    def killed_midway(value, f, **kwargs):
        f.write("{")
        raise KeyboardInterrupt
    monkeypatch.setattr(demo.json, "dump", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        demo.write_json(path, {"train_seconds": 2.0})
    monkeypatch.undo()
    assert json.load(open(path)) == {"train_seconds": 1.0}


@pytest.mark.parametrize("flag, why", [("--eval_limit=-1", "--eval_limit must be 0 (every example) or more, got -1"),
                                       ("--threads=0", "--threads must be at least 1, got 0")])
def test_demo_refuses_a_count_below_its_minimum_before_any_stage(flag, why, tmp_path, capsys, monkeypatch):
    """--eval_limit=-1 scored every held-out split less its last row."""
    monkeypatch.setattr(demo, "run_stage", lambda *a: pytest.fail("trained a stage before refusing " + flag))
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "demo"), flag])
    assert why in capsys.readouterr().err


def test_demo_refuses_a_reward_model_as_its_dpo_stage_before_any_stage(tmp_path, capsys, monkeypatch):
    """Trained, it failed when the demo scored it as a policy (a reward model's folder is refused there)."""
    monkeypatch.setattr(demo, "run_stage", lambda *a: pytest.fail("trained a stage before refusing"))
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "demo"), "--dpo_args=--objective=reward_model"])
    assert "the DPO stage is the policy that RLVR starts from" in capsys.readouterr().err


def test_the_demo_and_the_sweep_score_a_model_in_the_template_it_was_trained_in(tmp_path, monkeypatch,
                                                                                write_tiny_demo_model):
    """Both scored every model in tulu: a point trained with --template=chatml was scored in a format it never saw."""
    import eval as evaluation
    _, tok, model = write_tiny_demo_model(tmp_path)
    tok.use_chat_template("chatml")
    model.save_pretrained(str(tmp_path / "chatml"), tokenizer=tok)
    used = []
    monkeypatch.setattr(evaluation, "run_demo_eval", lambda model, tok, data, template, *a: used.append(template) or (
        {name: 0.0 for name in sweep.DEMO_METRICS}, None))
    demo.evaluate_stage(str(tmp_path / "chatml"), seed=0)
    sweep.evaluate(argparse.Namespace(eval_data_dir="", eval_limit=0), str(tmp_path / "chatml"), str(tmp_path))
    assert used == ["chatml", "chatml"]


def test_demo_rejects_an_unknown_stage(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--redo=ppo"])


def test_sweep_grid_tables_plots_resume_and_a_failed_point(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out means the same folder to the sweep, its trainers and eval
    out = "sweep"
    # batch 3 is not a multiple of the per-device batch 2 of the sweep preset: that point fails with a ConfigError
    args = ["--lrs=1e-3,4e-3", "--batch_sizes=2,3", f"--out={out}", "--eval_limit=4", "--max_steps=2",
            "--cache_dir="]
    results = sweep.main(args)
    status = {r["point"]: r["status"] for r in results}
    assert status == {"lr0.001_bs2": "ok", "lr0.001_bs3": "failed", "lr0.004_bs2": "ok", "lr0.004_bs3": "failed"}
    failed = next(r for r in results if r["status"] == "failed")
    assert failed["error"] == ("training failed (exit 1): error: total_batch_size=3 is not a multiple of batch_size x "
                               f"world_size = 2 x 1 (log: {os.path.join(out, failed['point'], 'train.log')})")
    assert "total_batch_size=3" in open(os.path.join(out, "lr0.001_bs3", "train.log")).read()
    ok = [r for r in results if r["status"] == "ok"]
    for r in ok:
        assert r["lr_bs_ratio"] == pytest.approx(r["lr"] / r["batch"])
        assert set(r["metrics"]) == {"arith_acc", "constraint_acc", "pref_acc"}
        cfg = json.load(open(os.path.join(out, r["point"], "config.json")))
        assert cfg["lr"] == pytest.approx(r["lr"]) and cfg["total_batch_size"] == r["batch"]
    with open(os.path.join(out, "sweep.csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and {row["status"] for row in table} == {"ok", "failed"}
    md = [line for line in open(os.path.join(out, "sweep.md")).read().splitlines() if line.startswith("|")]
    assert md[0].startswith("| lr | batch | lr/batch |") and len({line.count("|") for line in md}) == 1

    mtime = os.path.getmtime(os.path.join(out, "lr0.001_bs2", "sweep_point.json"))
    capsys.readouterr()
    again = sweep.main(args)  # finished points are skipped, failed ones stay failed unless --retry_failed
    assert "done before (ok), skipped" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "lr0.001_bs2", "sweep_point.json")) == mtime
    assert [r["status"] for r in again] == [r["status"] for r in results]
    # the same folder under other settings is an error, not a stale row
    with pytest.raises(SystemExit, match="other settings"):
        sweep.main(args + ["--seed=1"])


def never_trains(monkeypatch):
    """A refusal that regressed would start the grid's real training runs: fail at once instead."""
    def run_point(*args):
        raise AssertionError("the sweep started training a point instead of refusing its arguments")
    monkeypatch.setattr(sweep, "run_point", run_point)


def test_sweep_refuses_options_the_grid_sets_and_real_data_without_a_preset(tmp_path, monkeypatch):
    never_trains(monkeypatch)
    for extra in (["--lr=1e-3"], ["--total_batch_size=8"], ["--total-batch-size=8"], ["--lr_bs_ratio=1e-4"],
                  ["--grad_accum=2"],  # it would turn off the grid's total_batch_size
                  ["--data=x.jsonl"],
                  ["--data=x.jsonl", "--config=configs/sft_smoltulu_1130.json"]):  # and no --eval_data_dir
        with pytest.raises(SystemExit):
            sweep.main([f"--out={tmp_path}", *extra])


def test_a_sweep_point_counts_its_preset_data_model_and_benchmarks_by_content_and_runs_the_grids_lr(tmp_path):
    preset, rows, model, evals = tmp_path / "preset.json", tmp_path / "rows.jsonl", tmp_path / "m", tmp_path / "evals"
    preset.write_text(json.dumps({"epochs": 1, "lr_bs_ratio": 1e-5}))
    rows.write_text('{"messages": []}\n')
    for folder, name in ((model, "model.safetensors"), (evals / "arc", "test.jsonl")):
        folder.mkdir(parents=True)
        (folder / name).write_text("1")
    args = argparse.Namespace(stage="sft", config=str(preset), model=str(model), data=str(rows), seed=0,
                              eval_tasks="arc", eval_data_dir=str(evals), eval_limit=0, nproc_per_node=1)
    before = sweep.point_settings(args, 1e-3, 8, [])
    assert sweep.point_settings(args, 1e-3, 8, []) == before
    preset.write_text(json.dumps({"epochs": 2, "lr_bs_ratio": 1e-5}))  # edited in place: another point
    assert sweep.point_settings(args, 1e-3, 8, [])["preset"] != before["preset"]
    rows.write_text('{"messages": []}\n{"messages": []}\n')
    assert sweep.point_settings(args, 1e-3, 8, [])["data_files"] != before["data_files"]
    # a model retrained into the same folder, or other benchmark files: another point; scores cached beside the
    # model (the demo's) are not the model
    (model / "demo_eval_seed0_limitall.json").write_text("{}")
    assert sweep.point_settings(args, 1e-3, 8, [])["model_files"] == before["model_files"]
    (model / "model.safetensors").write_text("22")
    assert sweep.point_settings(args, 1e-3, 8, [])["model_files"] != before["model_files"]
    (evals / "arc" / "test.jsonl").write_text("22")
    assert sweep.point_settings(args, 1e-3, 8, [])["eval_data_dir_files"] != before["eval_data_dir_files"]
    # the preset's lr_bs_ratio would replace the grid's lr in the trainer
    import train_sft
    cmd = sweep.train_command(args, str(tmp_path / "run"), 1e-3, 8, [])
    cfg = common.parse_config(train_sft.SFTConfig, cmd[cmd.index(f"--config={preset}"):])
    common.resolve_batch(cfg, 1)
    assert cfg.lr == 1e-3


def test_an_interrupted_sweep_point_continues_from_its_last_checkpoint(tmp_path, monkeypatch, write_tiny_demo_model):
    demo, _, _ = write_tiny_demo_model(tmp_path)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in demo["sft_train"][:16]))
    args = argparse.Namespace(stage="sft", config=os.path.join(ROOT, "configs", "sft_demo.json"),
                              model=str(tmp_path / "model"), data=str(rows), seed=0, eval_tasks="arc",
                              eval_data_dir="evals", eval_limit=0, nproc_per_node=1, retry_failed=False,
                              out=str(tmp_path / "sweep"))
    monkeypatch.setattr(sweep, "evaluate", lambda *a: {"arc": 0.5})
    point = (1e-3, 4, 2.5e-4, ["--batch_size=4", "--max_steps=3", "--checkpoint_every=1", "--keep_checkpoints=3",
                               "--cache_dir="])
    assert sweep.run_point(args, *point)["status"] == "ok"
    run = tmp_path / "sweep" / sweep.point_name(1e-3, 4)
    for killed in ("final", "checkpoints/step_0000003", "sweep_point.json"):  # killed during step 3
        shutil.rmtree(run / killed) if (run / killed).is_dir() else (run / killed).unlink()
    assert sweep.run_point(args, *point)["status"] == "ok"
    log = (run / "train.log").read_text()
    assert "resumed from step 2" in log and log.count("\n--- attempt ") == 2  # both attempts' output


@pytest.mark.parametrize("flags, why", [
    (["--batch_sizes=1.5,2.7"], "--batch_sizes: '1.5' is not a whole number"),
    (["--lrs=abc"], "--lrs: 'abc' is not a number"),
    (["--lrs=,"], "--lrs: '' is not a number"),
    (["--ratios=1e-4,-1e-4"], "--ratios: '-1e-4' is not positive"),
    (["--lrs=1e-3", "--ratios=1e-4"], "--lrs and --ratios both set the learning rates"),
    (["--eval_tasks=gsm8k"], "--eval_tasks needs --eval_data_dir"),  # (it scored the demo task and said nothing)
    (["--stage=dpo", "--model=m", "--objective=reward_model"], "--objective=reward_model: the sweep scores each "
                                                               "point as a policy")])  # (every point failed at eval)
def test_a_sweep_grid_it_cannot_run_as_written_is_refused(flags, why, tmp_path, capsys, monkeypatch):
    """Batches cut to whole numbers, a grid of no points or an --lrs the ratios would override is an error."""
    never_trains(monkeypatch)
    with pytest.raises(SystemExit):
        sweep.main([f"--out={tmp_path / 'out'}", *flags])
    assert why in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, why", [
    (["--config=PRESET_DIR/none.json", "--lrs=1e-5"], "--config=PRESET_DIR/none.json: No such file or directory"),
    (["--config=PRESET_DIR/not_json.json", "--lrs=1e-5"],
     "--config=PRESET_DIR/not_json.json: not a JSON preset (Expecting"),
    (["--config=configs/sft_smoltulu_1130.json", "--data=PRESET_DIR/none.jsonl", "--eval_data_dir=evals",
      "--lrs=1e-5"], "--data=PRESET_DIR/none.jsonl: no such file, folder or glob"),
    (["--config=configs/sft_smoltulu_1130.json"], "--config needs --lrs or --ratios"),  # it took the demo's lrs
    (["--nproc_per_node=0"], "--nproc_per_node must be at least 1, got 0"),  # it ran one process
    (["--eval_limit=-1"], "--eval_limit must be 0 (every example) or more, got -1")])  # it left the last row out
def test_a_sweep_input_it_cannot_read_or_a_count_below_one_is_one_message_before_any_point(
        flags, why, tmp_path, capsys, monkeypatch):
    """A missing or non-JSON --config, or a missing --data, ended the first point in a traceback."""
    never_trains(monkeypatch)
    monkeypatch.chdir(ROOT)
    (tmp_path / "not_json.json").write_text("{lr: 1e-3}")
    flags = [f.replace("PRESET_DIR", str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit):
        sweep.main([f"--out={tmp_path / 'out'}", *flags])
    assert why.replace("PRESET_DIR", str(tmp_path)) in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_sweep_contour_plots_with_a_full_grid(tmp_path):
    results = [{"point": sweep.point_name(lr, b), "lr": lr, "batch": b, "lr_bs_ratio": lr / b, "status": "ok",
                "metrics": {"arith_acc": lr * 100 / b, "constraint_acc": b / 10}}
               for lr in (1e-3, 3e-3, 9e-3) for b in (2, 4, 8)]
    (tmp_path / "contour_pref_acc.png").write_bytes(b"an earlier grid's plot")
    metrics, table = sweep.write_tables(results, str(tmp_path))
    paths = sweep.plot_contours(results, metrics, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["contour_arith_acc.png", "contour_constraint_acc.png"]
    assert not (tmp_path / "contour_pref_acc.png").exists()  # it would stand beside a table without its metric
    assert all(os.path.getsize(p) > 10_000 for p in paths)
    assert table.count("\n") == 1 + len(results)  # header, separator, one line per point


def test_a_ratio_sweep_is_plotted_over_batch_and_ratio(tmp_path, monkeypatch):
    """A --ratios grid over several batches has a learning rate of its own at every point: over (batch, lr) each row
    of the plot held one point, and no contour was drawn (a colorbar over an empty plot). Over (batch, ratio) the
    grid is full."""
    import matplotlib.axes
    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "contourf", lambda self, x, y, z, **k: drawn.append((z.shape, z.count()))
                        or matplotlib.axes.Axes.pcolormesh(self, x, y, z))
    results = [{"point": sweep.point_name(ratio * b, b), "lr": ratio * b, "batch": b, "lr_bs_ratio": ratio,
                "status": "ok", "metrics": {"arith_acc": ratio * b}} for ratio in (1e-4, 1e-3) for b in (2, 8)]
    assert len(sweep.plot_contours(results, ["arith_acc"], str(tmp_path), by_ratio=True)) == 1
    assert drawn == [((2, 2), 4)]  # all four points, on a 2 x 2 grid (over lr: 4 x 2, half of it empty)


def test_sweep_ratio_mode_sets_lr_from_the_ratio():
    ns = type("A", (), {"ratios": "1e-4,1e-3", "batch_sizes": "3,16", "lrs": ""})()
    points = sweep.grid(ns)
    assert [(lr, b) for lr, b, _ in points] == [(3e-4, 3), (1.6e-3, 16), (3e-3, 3), (1.6e-2, 16)]
    assert sweep.point_name(*points[0][:2]) == "lr0.0003_bs3"  # not lr0.00030000000000000003_bs3


def test_install_refuses_an_existing_torch_older_than_2_6(tmp_path):
    fake = tmp_path / "torch"  # an installed torch 2.4, as far as install.sh can tell
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "2.4.1+cu121"\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "install.sh")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "nanotulu needs torch >= 2.6, found 2.4.1+cu121" in out.stderr
    assert "pip install torch==2.13.0" in out.stderr and "-U torch" not in out.stderr  # never an unpinned torch
    assert "nanotulu: torch" not in out.stdout  # stopped before installing anything


def test_no_module_of_the_repository_shadows_an_installed_package():
    """Every script puts its own folder (and the repository root) first on sys.path, so a module there named like
    an installed package hides that package from everything imported after it. transformers >= 5.25 imports
    Hugging Face's `kernels`, which the fused losses' folder, once called kernels/, hid."""
    installed = importlib.metadata.packages_distributions()
    ours = set()
    for folder in (ROOT, *(os.path.join(ROOT, d) for d in ("bench", "scripts", "tests"))):
        for entry in os.listdir(folder):
            path = os.path.join(folder, entry)
            if entry.endswith(".py"):
                ours.add(entry[:-3])
            elif os.path.isfile(os.path.join(path, "__init__.py")):
                ours.add(entry)
    assert "nanotulu_kernels" in ours and "model" in ours  # the walk found the root's package and modules
    assert {name: installed[name] for name in ours if name in installed} == {}


def test_sweep_grid_ratio_is_lr_over_batch_and_every_lr_gets_its_own_folder():
    ns = argparse.Namespace(ratios="", lrs="1e-3,4e-3", batch_sizes="2,8")
    assert sweep.grid(ns) == [(1e-3, 2, 5e-4), (1e-3, 8, 1.25e-4), (4e-3, 2, 2e-3), (4e-3, 8, 5e-4)]
    with pytest.raises(ValueError, match="--lrs: '0' is not positive"):  # a grid point that would not train
        sweep.numbers("1e-3,0", "--lrs", float)
    assert sweep.point_name(1e-3, 8) == "lr0.001_bs8"
    assert sweep.point_name(1.0000001e-3, 8) != sweep.point_name(1e-3, 8)


def test_sweep_tables_sort_by_ratio_show_percent_and_keep_failed_points(tmp_path):
    results = [
        {"point": "a", "lr": 4e-3, "batch": 2, "lr_bs_ratio": 2e-3, "status": "ok", "train_seconds": 5.0,
         "metrics": {"arith_acc": 0.5}},
        {"point": "b", "lr": 1e-3, "batch": 8, "lr_bs_ratio": 1.25e-4, "status": "failed"},
        {"point": "c", "lr": 4e-3, "batch": 8, "lr_bs_ratio": 5e-4, "status": "ok", "train_seconds": 7.0,
         "metrics": {"arith_acc": 0.25, "pref_acc": 0.125}},
        {"point": "d", "lr": 1e-3, "batch": 2, "lr_bs_ratio": 5e-4, "status": "ok", "train_seconds": 6.0,
         "metrics": {"arith_acc": 1.0, "pref_acc": 0.0}},
    ]
    metrics, table = sweep.write_tables(results, str(tmp_path))
    assert metrics == ["arith_acc", "pref_acc"]  # every point's metrics, not the first point's
    assert table.splitlines()[2:] == [
        "| 0.001 | 8 | 0.000125 | - | - | failed |",
        "| 0.001 | 2 | 0.0005 | 100.0 | 0.0 | ok |",  # equal ratios: the smaller batch first
        "| 0.004 | 8 | 0.0005 | 25.0 | 12.5 | ok |",
        "| 0.004 | 2 | 0.002 | 50.0 | - | ok |"]
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["point", "lr", "batch", "lr_bs_ratio", "status", "train_seconds", "arith_acc", "pref_acc"]
    assert rows[1:] == [["a", "0.004", "2", "0.002", "ok", "5.0", "0.5", ""],  # in grid order
                        ["b", "0.001", "8", "0.000125", "failed", "", "", ""],
                        ["c", "0.004", "8", "0.0005", "ok", "7.0", "0.25", "0.125"],
                        ["d", "0.001", "2", "0.0005", "ok", "6.0", "1.0", "0.0"]]


def test_sweep_point_reruns_only_failed_points_with_retry_failed_and_refuses_other_settings(tmp_path, monkeypatch):
    preset = tmp_path / "preset.json"
    preset.write_text("{}")
    args = argparse.Namespace(stage="sft", config=str(preset), model="", data="", seed=0, eval_tasks="arc",
                              eval_data_dir="", eval_limit=4, nproc_per_node=1, retry_failed=False,
                              out=str(tmp_path / "out"))
    trained = []
    outcome = {"train": "fail"}

    def fake_run(cmd, check, stdout, stderr, **kwargs):  # the trainer, failing on demand
        assert started_to_die_with_its_parent(kwargs)
        trained.append(cmd)
        if outcome["train"] == "fail":
            raise subprocess.CalledProcessError(1, cmd)
        run_dir = next(c.split("=", 1)[1] for c in cmd if c.startswith("--run_dir="))
        os.makedirs(os.path.join(run_dir, "final"), exist_ok=True)

    def fake_evaluate(args, final, run_dir):
        if outcome["train"] == "eval_error":
            raise ValueError("bad eval file")
        return {"arith_acc": 0.5}

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    monkeypatch.setattr(sweep, "evaluate", fake_evaluate)
    point = (1e-3, 2, 5e-4, ["--max_steps=2"])
    assert sweep.run_point(args, *point)["status"] == "failed" and len(trained) == 1
    outcome["train"] = "ok"
    assert sweep.run_point(args, *point)["status"] == "failed" and len(trained) == 1  # kept, not rerun
    args.retry_failed = True
    assert sweep.run_point(args, *point)["metrics"] == {"arith_acc": 0.5} and len(trained) == 2
    assert sweep.run_point(args, *point)["status"] == "ok" and len(trained) == 2  # an ok point never reruns
    # an evaluation that raises fails its point, the sweep goes on
    outcome["train"] = "eval_error"
    failed = sweep.run_point(args, 1e-3, 4, 2.5e-4, [])
    assert failed["status"] == "failed" and "ValueError in evaluation" in failed["error"]
    # retried, a point whose training finished is evaluated again on its model, not trained again
    outcome["train"] = "ok"
    runs = len(trained)
    again = sweep.run_point(args, 1e-3, 4, 2.5e-4, [])
    assert again["metrics"] == {"arith_acc": 0.5} and len(trained) == runs
    assert again["train_seconds"] == failed["train_seconds"]
    outcome["train"] = "eval_error"
    # the trainer's options and the evaluation's settings decide the stored numbers too; their order does not
    with pytest.raises(SystemExit, match="other settings"):
        sweep.run_point(args, 1e-3, 2, 5e-4, ["--max_steps=3"])
    args.eval_limit = 0
    with pytest.raises(SystemExit, match="other settings"):
        sweep.run_point(args, *point)
    # the same options in another order, or a repeated one whose last value is the same, make the same point
    outcome["train"] = "ok"
    assert sweep.run_point(args, 2e-3, 2, 1e-3, ["--max-steps=3", "--beta=1"])["status"] == "ok"
    runs = len(trained)
    assert sweep.run_point(args, 2e-3, 2, 1e-3, ["--beta=1", "--max_steps=2", "--max_steps=3"])["status"] == "ok"
    assert len(trained) == runs


def test_sweep_launches_torchrun_and_passes_the_eval_limit_to_eval_py(tmp_path, monkeypatch):
    args = argparse.Namespace(stage="sft", config="", model="", data="", seed=3, nproc_per_node=2, eval_tasks="arc",
                              eval_data_dir="evals", eval_limit=5)
    cmd = sweep.train_command(args, "run", 1e-3, 8, [])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    calls = []

    def fake_run(cmd, check, **kwargs):
        assert started_to_die_with_its_parent(kwargs)
        calls.append(cmd)
        with open(os.path.join(str(tmp_path), "eval.json"), "w") as f:
            json.dump({"summary": {"arc": {"value": 0.25}}}, f)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    assert sweep.evaluate(args, "final", str(tmp_path)) == {"arc": 0.25}
    assert "--limit=5" in calls[0] and "--tasks=arc" in calls[0]


def test_demo_curves_skip_rows_without_a_step_or_a_value_and_a_stage_depends_on_its_parents_weights(tmp_path):
    os.makedirs(tmp_path / "sft" / "final")
    (tmp_path / "sft" / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"loss": 1.5}\n{"step": 2, "loss": null}\n'
        '{"step": 3, "loss": 1.0, "eval_loss": 1.25}\n')
    assert demo.curves(str(tmp_path), ["sft"]) == [("sft", "loss", [1, 3], [2.0, 1.0]),
                                                   ("sft", "eval_loss", [3], [1.25])]
    weights = tmp_path / "sft" / "final" / "model.safetensors"
    weights.write_bytes(b"first")
    before = demo.stage_settings(str(tmp_path), "sft", 0, "--max_steps=2")
    assert before["args"] == ["--max_steps=2"] and before == demo.stage_settings(str(tmp_path), "sft", 0, "--max_steps=2")
    weights.write_bytes(b"second")  # SFT trained again: DPO on top of it is another stage
    assert demo.stage_settings(str(tmp_path), "sft", 0, "--max_steps=2") != before


@pytest.mark.parametrize("script,args,message", [
    ("train_sft.py", ["--no_such_key=1"], "error: command line: unknown config key(s) no_such_key for SFTConfig"),
    ("train_sft.py", ["--config=/no/such/preset.json"], "error: --config=/no/such/preset.json: no such file"),
    ("train_sft.py", ["--model=/no/such/folder"], "error: --model=/no/such/folder: no such folder"),
    ("train_dpo.py", ["--model=/no/such/folder"], "error: --model=/no/such/folder: no such folder"),
    ("train_dpo.py", ["--model=/no/such/folder", "--loss_type=kto"], "error: preference loss: loss_type must be"),
    ("train_rlvr.py", ["--grad_accum=2"], "error: --grad_accum=2: RLVR batches are prompts_per_step"),
    ("train_rlvr.py", ["--model=/no/such/folder"], "error: --model=/no/such/folder: no such folder"),
    ("train_rlvr.py", ["--model=MODEL", "--algo=ppo", "--value_model=/no/such/folder"],
     "error: --value_model=/no/such/folder: no such folder"),
    ("train_sft.py", ["--template=ChatML"], "error: --template=ChatML: expected tulu or chatml"),
    ("train_dpo.py", ["--model=MODEL", "--template=ChatML"], "error: --template=ChatML: expected tulu or chatml"),
    ("train_rlvr.py", ["--template=ChatML"], "error: --template=ChatML: expected tulu or chatml"),
    ("train_rlvr.py", ["--advantage_norm=zscore"], "error: advantage_norm='zscore': expected std or center"),
    ("eval.py", ["--model=/no/such/folder"], "error: no model at /no/such/folder"),
    # the demo presets' settings (SFT: lr 4e-3 for a tiny model trained from scratch) on real data: a preset is needed
    ("train_sft.py", ["--data=rows.jsonl"], "error: --data=rows.jsonl without --config: the settings "
     f"would be the demo preset's ({ROOT}/configs/sft_demo.json, lr 0.004,"),
    ("train_dpo.py", ["--data=rows.jsonl"], "error: --data=rows.jsonl without --config:"),
    ("train_rlvr.py", ["--data=rows.jsonl"], "error: --data=rows.jsonl without --config:"),
])
def test_a_refused_setting_or_missing_input_is_one_message_not_a_traceback(script, args, message, tmp_path,
                                                                           write_tiny_demo_model):
    if "--model=MODEL" in args:  # a model folder, to get past the check of --model to the one tested
        write_tiny_demo_model(tmp_path)
        args = [a.replace("MODEL", str(tmp_path / "model")) for a in args]
    run_dir = [] if script == "eval.py" else [f"--run_dir={tmp_path / 'run'}"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args, *run_dir], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1
    assert out.stderr.startswith(message) and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before the run folder was touched


def model_folder_mistakes(root, write_tiny_demo_model):
    """{what: (the --model folder or file, a fragment of the error that must name it)}: the mistakes users make
    with model folders, each built from one good folder."""
    import shutil

    import data
    write_tiny_demo_model(root / "good")
    good = root / "good" / "model"

    def copy(name, change):
        folder = root / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    def edit_json(file, **keys):
        def change(folder):
            content = json.loads((folder / file).read_text())
            (folder / file).write_text(json.dumps({**content, **keys}))
        return change

    def move_into(inner):
        def change(folder):
            os.makedirs(folder / inner)
            for name in os.listdir(folder):
                if name != inner.split("/")[0]:
                    os.replace(folder / name, folder / inner / name)
        return change

    def lose_a_shard(folder):  # the weights as shard 1 of 2 in an index, shard 2 missing
        from safetensors import safe_open
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            names = list(f.keys())
        os.replace(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
        index = {name: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, name in enumerate(names)}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))

    run = copy("run", move_into("final"))
    (run / "config.json").write_text(json.dumps({"lr": 1e-3}))  # a trainer's settings
    training = root / "training"  # a run still training (or killed): checkpoints, no final/ yet
    (training / "checkpoints" / "step_0000002").mkdir(parents=True)
    (training / "config.json").write_text(json.dumps({"lr": 1e-3}))

    def reward_model(folder):
        import torch
        from safetensors.torch import save_file
        save_file({"score.weight": torch.zeros(1, 8)}, str(folder / "value_head.safetensors"))
    return {
        "rope scaling": (copy("rope", edit_json("config.json", rope_scaling={"rope_type": "llama3"})),
                         "config.json: key 'rope_scaling' has rope type 'llama3'"),
        "attention bias": (copy("bias", edit_json("config.json", attention_bias=True)),
                           "config.json: key 'attention_bias' = true is not supported"),
        "shapes": (copy("shapes", edit_json("config.json", intermediate_size=96)),
                   "checkpoint does not match its config.json: shape mismatches"),
        "vocab": (copy("vocab", lambda f: data.build_demo_tokenizer(data.make_demo_data(0, n_train=256, n_heldout=64),
                                                                    vocab_size=600).save_pretrained(f)),
                  "ids but the model's vocab_size is 512"),
        "tokenizer.json": (copy("tokenizer", lambda f: (f / "tokenizer.json").write_text("{not json")),
                           "tokenizer.json: not a readable tokenizer"),
        "eos": (copy("eos", edit_json("tokenizer_config.json", eos_token="</s>")),
                "tokenizer_config.json: eos_token '</s>' is not in the vocabulary of tokenizer.json"),
        "run folder": (run, f"{run}: a run folder; its trained model is {run / 'final'}"),
        "run in progress": (training, f"{training}: a run folder (checkpoints) with no final model yet"),
        "reward model": (copy("rm", reward_model), "a reward model's folder (value_head.safetensors"),
        "cache root": (copy("models--org--name", move_into("snapshots/0123abc")),
                       "in a Hugging Face cache folder the model is"),
        "pickle": (copy("pickle", lambda f: os.replace(f / "model.safetensors", f / "pytorch_model.bin")),
                   "(pytorch_model.bin is there: PyTorch pickles are not read"),
        "pickle beside a training log": (copy("pickle_log", lambda f: (
            os.replace(f / "model.safetensors", f / "pytorch_model.bin"), (f / "metrics.jsonl").write_text(""))),
            "(pytorch_model.bin is there: PyTorch pickles are not read"),
        "a file": (good / "model.safetensors", "model.safetensors: a file, not a folder"),
        "a shard": (copy("shard", lose_a_shard), "model.safetensors.index.json: lists shards that are not in "
                    f"{root / 'shard'}: model-00002-of-00002.safetensors"),
    }


def test_a_model_folder_that_cannot_load_is_one_message_before_any_tokenizing(tmp_path, write_tiny_demo_model):
    """Each mistake ends SFT with its message (naming the file), no traceback and nothing tokenized (on the full
    mixture that takes minutes); eval.py says the same."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "4"}]}) + "\n")
    for what, (model, said) in model_folder_mistakes(tmp_path, write_tiny_demo_model).items():
        cache = tmp_path / f"cache_{what}"
        for cmd in ([os.path.join(ROOT, "train_sft.py"), f"--config={ROOT}/configs/sft_demo.json", f"--model={model}",
                     f"--data={rows}", f"--run_dir={tmp_path / 'out'}", f"--cache_dir={cache}", "--overwrite=true"],
                    [os.path.join(ROOT, "eval.py"), f"--model={model}", "--limit=1"]):
            out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120, cwd=ROOT)
            assert out.returncode == 1 and out.stderr.startswith("error: ") and said in out.stderr, (what, out.stderr)
            assert "Traceback" not in out.stderr, (what, out.stderr[-2000:])
        assert not cache.exists() or not os.listdir(cache), what


@pytest.mark.parametrize("script", ["train_sft.py", "train_dpo.py", "train_rlvr.py"])
def test_a_kernel_backend_the_device_cannot_run_stops_the_trainer_at_start_up(script, tmp_path, write_tiny_demo_model):
    env = {**os.environ, "NANOTULU_KERNELS": "triton", "TRITON_INTERPRET": "0"}
    if script == "train_dpo.py":  # (DPO checks its model folder first)
        write_tiny_demo_model(tmp_path)
    model = [f"--model={tmp_path / 'model'}"] if script == "train_dpo.py" else []
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--device=cpu", *model], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 1
    assert out.stderr.startswith("error: NANOTULU_KERNELS=triton on a cpu device") and "Traceback" not in out.stderr


def test_rlvr_help_says_which_shared_settings_it_refuses():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_rlvr.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    lines = {line.split("=")[0].strip(): line for line in out.stdout.splitlines() if line.startswith("  --")}
    for name in ("--fsdp", "--grad_accum", "--total_batch_size"):
        assert "not supported" in lines[name] or "not used" in lines[name], lines[name]


def test_a_failed_point_says_the_trainers_own_error_even_under_torchrun(tmp_path):
    (tmp_path / "train.log").write_text("step 0: held-out loss 6.71\nerror: --lr=abc: not a number\n"
                                        "E1207 ... failed (exitcode: 1)\nTraceback (most recent call last):\n"
                                        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
                                        "============================================================\n")
    assert sweep.why_training_failed(str(tmp_path)) == (f"error: --lr=abc: not a number (log: "
                                                         f"{tmp_path / 'train.log'})")
    # an interrupted point resumed under other settings: the refusal, and how to start the point over
    refused = "--- attempt 1: ...\nerror: --resume: step_0000002 was trained with other settings (...)\n"
    (tmp_path / "train.log").write_text(refused)
    assert sweep.why_training_failed(str(tmp_path)).endswith(f"; delete {tmp_path} to train this point from the start")
    # then retried with the settings put back, killed without a word: not the first attempt's refusal
    (tmp_path / "train.log").write_text(refused + "--- attempt 2: ...\nresumed from step 2\nstep 3: loss 1.2\n")
    assert sweep.why_training_failed(str(tmp_path)) == f"step 3: loss 1.2 (log: {tmp_path / 'train.log'})"


def test_a_demo_point_stored_with_the_old_eval_tasks_default_is_reused(tmp_path, capsys):
    """Demo points are scored on the demo split whatever eval_tasks says; earlier sweeps stored its old default."""
    args = argparse.Namespace(stage="sft", config=os.path.join(sweep.ROOT, sweep.DEMO_CONFIGS["sft"]), model="",
                              data="", seed=0, eval_tasks="", eval_data_dir="", eval_limit=4, nproc_per_node=1,
                              out=str(tmp_path), retry_failed=False)
    stored = {**sweep.point_settings(args, 1e-3, 2, []), "eval_tasks": "arc,gsm8k,hellaswag,ifeval"}
    (tmp_path / "lr0.001_bs2").mkdir()
    (tmp_path / "lr0.001_bs2" / "sweep_point.json").write_text(json.dumps({"status": "ok", "settings": stored}))
    assert sweep.run_point(args, 1e-3, 2, 5e-4, [])["status"] == "ok"
    assert "done before (ok), skipped" in capsys.readouterr().out
