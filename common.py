"""What the trainers share: config + CLI, distributed setup, optimizer and schedule, checkpoints, logging.

The training loops themselves stay in train_sft.py / train_dpo.py / train_rlvr.py; this file is only the
plumbing they all need, written so that each piece can be read (and tested) on its own.

Run folder layout (every trainer):
    run_dir/config.json                   resolved config (after presets, overrides, --lr_bs_ratio, --template=)
    run_dir/metrics.jsonl                 one JSON object per logged step (rank 0)
    run_dir/checkpoints/step_XXXXXXX/     model.pt, optimizer.pt, state.pt (step, RNG of every rank, extra)
    run_dir/final/                        HF layout (config.json, model.safetensors, tokenizer files)
"""
import copy
import dataclasses
import datetime
import difflib
import errno
import fcntl
import inspect
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
import traceback
import typing
from contextlib import nullcontext, suppress
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import CheckpointError, ModelConfig, model_folder_problem

log = logging.getLogger("nanotulu.common")

# ----------------------------------------------------------------------------------------------------------
# Config: a dataclass, JSON presets, --key=value overrides

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    """Fields every trainer has. Trainers subclass it (@dataclass) and add their own."""
    run_dir: str = "runs/default"
    model: str = ""                 # HF folder to start from ('': SFT builds the demo model, RLVR takes the demo's)
    tokenizer: str = ""             # tokenizer folder ('' = the model folder)
    data: str = ""                  # file / folder / glob ('' = the built-in synthetic demo data)
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N (one process)
    # batch: the effective (global) batch in sequences = batch_size x grad_accum x world_size
    batch_size: int = 1             # sequences per device per micro-batch
    grad_accum: int = 1
    total_batch_size: int = 0       # > 0: derive grad_accum from it (the paper's "batch"), so presets fit any world size
    lr: float = 1e-5
    lr_bs_ratio: float = 0.0        # > 0: lr = lr_bs_ratio x effective batch (SmolTulu's lever)
    schedule: str = "linear"        # linear | cosine | constant
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0       # floor of the decay, as a fraction of lr
    epochs: int = 1
    max_steps: int = 0              # > 0: stop after this many steps (overrides epochs); RLVR counts rollouts
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0          # 0 = off
    fsdp: bool = False              # FSDP2 fully_shard per block instead of DDP
    gradient_checkpointing: bool = False
    compile: bool = False           # torch.compile each transformer block (compiling costs time at the start)
    precision: str = "auto"         # bf16 | fp32 | auto (bf16 on CUDA, fp32 on CPU): autocast and FSDP2 params
    checkpoint_every: int = 0       # steps (RLVR: rollouts); 0 = no checkpoints
    keep_checkpoints: int = 2       # the newest N are kept (0 = all)
    resume: bool = False            # continue from the newest checkpoint in run_dir/checkpoints
    overwrite: bool = False         # a fresh run may delete an earlier run's checkpoints and final/ in run_dir
    log_every: int = 1
    eval_every: int = 0             # held-out evaluation at step 0, every N steps and at the end (0: no others)
    progress: bool = True           # tqdm bar on rank 0

    def __post_init__(self):
        # Checked at start-up: lr_at reads the schedule only once warmup is over, thousands of steps in.
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}: expected {', '.join(SCHEDULES)}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range; torch and random would take more, numpy would fail
            raise ConfigError(f"seed={self.seed!r}: must be in [0, 2**32)")
        for name, low in _AT_LEAST.items():
            if hasattr(self, name) and getattr(self, name) < low:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be at least {low}")
        for name, interval in _BETWEEN.items():
            value = getattr(self, name, None)
            if value is not None and not (0.0 <= value < 1.0 or (value == 1.0 and interval.endswith("]"))):
                raise ConfigError(f"{name}={value!r}: must be in {interval}")


# the lowest value each numeric field may take (a zero batch would only fail later, dividing by it)
_AT_LEAST = {"batch_size": 1, "grad_accum": 1, "epochs": 1, "log_every": 1, "total_batch_size": 0, "max_steps": 0,
             "lr": 0.0, "lr_bs_ratio": 0.0, "weight_decay": 0.0, "grad_clip": 0.0, "checkpoint_every": 0,
             "keep_checkpoints": 0, "eval_every": 0, "adam_eps": 0.0,
             "max_seq_len": 1, "ref_batch_size": 1}  # (the last two: the trainers that have them)
# fractions: [0, 1], or [0, 1) where 1 breaks the run (Adam divides by 1 - beta; a held-out share of 1 leaves no data)
_BETWEEN = {"warmup_ratio": "[0, 1]", "min_lr_ratio": "[0, 1]", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)",
            "eval_split": "[0, 1)"}


class ConfigError(ValueError):
    pass


def run_script(main, *user_errors, resumable=False):
    """A script's entry point. A refused setting (ConfigError), a diverged run (Diverged) or one of `user_errors`
    (bad input: an unreadable row, a missing folder) ends the process with its message and exit status 1, as
    argparse does; any other exception is a bug and keeps its traceback. Ctrl-C ends it with one line saying where
    it was, and status 130 (and, for a `resumable` trainer, how to go on); SIGTERM likewise, with status 143."""
    # SIGTERM (a scheduler's preemption or time limit; torchrun stopping the other ranks) ends it as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
    except (ConfigError, Diverged, *user_errors) as e:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank:
            # Under torchrun the ranks of a node mostly meet the same refusal (the same command line, files and
            # devices): its first rank says it, and torchrun stops this one while it waits. Said at once, the
            # first failure would have torchrun stop the first rank before it could say anything.
            with suppress(KeyboardInterrupt):  # Ctrl-C meanwhile: the message, not a second traceback
                try:
                    time.sleep(5)
                except Terminated:  # torchrun stopped it: the first rank said it
                    sys.exit(143)
        sys.exit(f"{f'rank {local_rank} of this node: ' if local_rank else ''}error: {e}")
    except KeyboardInterrupt as e:  # (torchrun passes Ctrl-C to every rank: each printed a whole traceback)
        _say_interrupted(e, resumable)
    except Exception as e:
        # Ctrl-C inside a library can come out as another error raised while it unwinds: torch.save's zip writer,
        # cut mid-record, fails to close with a RuntimeError whose context is the KeyboardInterrupt
        cause, seen = e.__context__, {id(e)}
        while cause is not None and not isinstance(cause, KeyboardInterrupt) and id(cause) not in seen:
            seen.add(id(cause))
            cause = cause.__context__
        if not isinstance(cause, KeyboardInterrupt):
            raise
        _say_interrupted(cause, resumable, then=e)
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, ended as Ctrl-C is: one line saying where, and how to resume."""


def _terminated(signum, frame):
    raise Terminated


def _say_interrupted(e, resumable, then=None):
    from tqdm import tqdm
    here = os.path.dirname(os.path.abspath(__file__))
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(here + os.sep)
              and "-packages" + os.sep not in os.path.relpath(f.filename, here)  # (a venv in the checkout)
              and f.name != _terminated.__name__]  # (where the signal arrived, not its handler)
    last = frames[-1] if frames else traceback.extract_tb(e.__traceback__)[-1]  # in the project's own code
    rank = int(os.environ.get("RANK", 0))
    terminated = isinstance(e, Terminated)
    if terminated and rank:  # every rank was sent it (or torchrun stops them for another's error): one says it
        sys.exit(143)
    hint = "; --resume=true continues from the newest checkpoint, if one was written (they are written whole)"
    stopping = f" (then, while stopping: {type(then).__name__}: {then})" if then is not None else ""
    tqdm.write(f"{f'rank {rank}: ' if rank else ''}{'terminated (SIGTERM)' if terminated else 'interrupted'} (in "
               f"{last.name}, {os.path.relpath(last.filename, here)}:{last.lineno}){stopping}"
               f"{hint if resumable and not rank else ''}", file=sys.stderr)
    sys.exit(143 if terminated else 130)


def refuse_unused(cfg, names, why):
    """A setting the run would ignore is an error, not a silent no-op."""
    given = [f"--{name}={getattr(cfg, name)}" for name in names if getattr(cfg, name)]
    if given:
        raise ConfigError(f"{' '.join(given)}: {why}")


def check_folder(cfg, name, hint=""):
    """A model folder named by --name that is not there, or not a model folder (model.model_folder_problem), is an
    error saying so, before anything tries to read it; `hint` is added when there is nothing at all. Every such
    setting but --value_model is loaded as a causal LM, so a reward model's folder is refused there too."""
    path = getattr(cfg, name)
    problem = path and (model_folder_problem(path) or (name != "value_model" and reward_model_problem(path)))
    if problem:
        raise FileNotFoundError(f"--{name}={path}: {problem}{'' if os.path.exists(path) else hint}")


def reward_model_problem(path):
    """Why the folder `path` is not to be loaded as a causal LM (a policy, DPO's reference, a model to evaluate)
    when it is a reward model's, else None. Its backbone is a valid causal-LM folder, so it would load without a
    word, but it was trained to score with its value head, not to generate."""
    if os.path.isfile(os.path.join(path, VALUE_HEAD)):
        return (f"a reward model's folder ({VALUE_HEAD}: train_dpo.py --objective=reward_model wrote it), not a "
                "policy: read here, its backbone would be taken for a causal LM and its head dropped; "
                "train_rlvr.py --algo=ppo takes it as --value_model")
    return None


def refuse_if_given(cfg, name, why):
    """refuse_unused for a setting whose default is not empty: an error when the command line gave it."""
    if name in getattr(cfg, "command_line", ()):
        raise ConfigError(f"--{name}={getattr(cfg, name)}: {why}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text):
    """True / False for the words a config or command line may spell them with (true, 1, yes, on / false, 0, no,
    off; any case), None for anything else."""
    word = text.lower()
    return True if word in _TRUE else False if word in _FALSE else None


def _coerce(key, value, typ, where):
    """Convert a JSON value or a command-line string to the field's declared type, or say what is wrong."""
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    bad = ConfigError(f"{where}: {key}={value!r} is not a valid {getattr(typ, '__name__', typ)}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        word = parse_bool(value) if isinstance(value, str) else None
        if word is not None:
            return word
        raise bad
    if typ is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if typ is float:
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value) if isinstance(value, (int, float, str)) else None
        except ValueError:
            raise bad from None
        if number is None or not math.isfinite(number):  # an inf lr or a nan clip would only fail (or not) later
            raise bad
        return number
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{where}: field {key} has unsupported type {typ}")


# Settings whose value another one replaces when it is on: lr = lr_bs_ratio x effective batch, grad_accum =
# total_batch_size / (batch_size x world size). Later wins between the two as for any one key: a command-line lr or
# grad_accum given after its replacer, or over a preset's, turns the replacer off.
REPLACED_BY = {"lr": "lr_bs_ratio", "grad_accum": "total_batch_size"}


def parse_config(cls, argv=None):
    """Build `cls` from `--config=file.json` (a preset) and then `--key=value` overrides (later wins).

    Keys starting with '_' in a preset are notes and are ignored. A bare `--flag` sets a bool field to True.
    Unknown keys are an error naming them and where they came from. Later wins across the pairs of REPLACED_BY
    too. The keys the command line gave are kept in the config's `command_line` attribute (not a field), for
    refuse_if_given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    want_help = "--help" in argv or "-h" in argv
    argv = [a for a in argv if a not in ("--help", "-h")]
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}

    def apply(pairs, where):
        unknown = [k for k, _ in pairs if k not in names]
        if unknown:
            close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            guesses = "".join(f"; did you mean {m[0]} for {k}?" for k, m in close.items() if m)
            raise ConfigError(f"{where}: unknown config key(s) {', '.join(unknown)} for {cls.__name__}{guesses}")
        for k, v in pairs:
            values[k] = _coerce(k, v, hints[k], where)

    overrides, presets = [], []
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --key=value, got {arg!r}")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "config":
            if not val:
                raise ConfigError("command line: --config needs a preset file (--config=configs/NAME.json)")
            presets.append(val)
            continue
        if not eq:
            if key in names and hints[key] is bool:
                val = "true"
            else:
                raise ConfigError(f"command line: --{key} needs a value (--{key}=...)")
        overrides.append((key, val))
    for path in presets:
        if not os.path.isfile(path):
            raise ConfigError(f"--config={path}: no such file")
        with open(path, encoding="utf-8") as f:
            try:
                preset = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
        if not isinstance(preset, dict):
            raise ConfigError(f"{path}: a config preset must be a JSON object")
        apply([(k, v) for k, v in preset.items() if not k.startswith("_")], path)
    apply(overrides, "command line")
    last = {k: i for i, (k, _) in enumerate(overrides)}  # where each key last appears on the command line
    for key, setter in REPLACED_BY.items():
        if key in last and setter in names and last.get(setter, -1) < last[key]:
            values[setter] = 0
    if want_help:  # after the presets and overrides, so that it shows the values this command would run with
        print(config_help(cls, values))
        sys.exit(0)
    cfg = cls(**values)
    cfg.command_line = frozenset(k for k, _ in overrides)
    return cfg


def parse_trainer_config(cls, argv, demo_preset, example_preset):
    """parse_config for a trainer, on its demo preset (configs/<demo_preset>) when argv names no --config. That
    preset is tuned for the synthetic demo, a ~1M-parameter model trained from scratch (SFT's lr is 4e-3), so a run
    on real data (--data) without --config is refused rather than given it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.startswith("--config=") for a in argv):
        return parse_config(cls, argv)
    demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", demo_preset)
    cfg = parse_config(cls, [f"--config={demo}", *argv])
    if cfg.data:
        with open(demo) as f:
            lr = json.load(f)["lr"]
        raise ConfigError(f"--data={cfg.data} without --config: the settings would be the demo preset's ({demo}, lr "
                          f"{lr:g}, made for the synthetic demo's tiny model trained from scratch); pass a preset "
                          f"(configs/ holds the paper's, e.g. --config=configs/{example_preset}), or --config={demo} "
                          f"to train with the demo's settings anyway")
    return cfg


def config_help(cls, values=None):
    """The script's docstring, then every field with its value (the default unless `values` sets it) and the
    comment beside it in the dataclass."""
    notes = {}
    for klass in reversed(cls.__mro__[:-1]):  # base class first, so a subclass's comment wins
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
            if m:
                notes[m.group(1)] = m.group(2)
    main_doc = (sys.modules["__main__"].__doc__ or "").strip()
    lines = [main_doc, "", "Options (--config=preset.json first, then --key=value; later wins):"]
    for f in dataclasses.fields(cls):
        lines.append(f"  --{f.name}={(values or {}).get(f.name, f.default)!r}".ljust(38) + notes.get(f.name, ""))
    return "\n".join(lines)


def config_dict(cfg):
    return dataclasses.asdict(cfg)


def resolve_batch(cfg, world_size):
    """Fix grad_accum (from total_batch_size) and lr (from lr_bs_ratio) for this world size.

    Returns the effective batch in sequences. Mutates cfg so that config.json records what actually ran."""
    if cfg.total_batch_size > 0:
        per_step = cfg.batch_size * world_size
        if cfg.total_batch_size % per_step:
            raise ConfigError(f"total_batch_size={cfg.total_batch_size} is not a multiple of batch_size x "
                              f"world_size = {cfg.batch_size} x {world_size}")
        cfg.grad_accum = cfg.total_batch_size // per_step
    effective = cfg.batch_size * cfg.grad_accum * world_size
    cfg.total_batch_size = effective
    if cfg.lr_bs_ratio > 0:
        cfg.lr = cfg.lr_bs_ratio * effective
    return effective


# ----------------------------------------------------------------------------------------------------------
# Distributed: torchrun env -> process group; DDP or FSDP2 wrapping

@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def is_distributed(self):
        return self.world_size > 1


def setup_distributed(device="auto"):
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; start gloo (CPU) or nccl (CUDA) when world > 1."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if rank != 0:  # every rank reads the same data: rank 0's warnings speak for all, as print0's lines do
        logging.getLogger("nanotulu").setLevel(logging.ERROR)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r}: this torch ({torch.__version__}) sees no CUDA GPU")
        if world_size > 1 and dev.index is not None:
            raise ConfigError(f"device={device!r} under torchrun: every rank takes the GPU of its LOCAL_RANK, so pass "
                              f"'cuda' (choose GPUs with CUDA_VISIBLE_DEVICES)")
        if dev.index is None:
            gpus = torch.cuda.device_count()
            # checked on every rank of the node, its first included (which reports errors: see run_script)
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
            if max(local_rank + 1, local_ranks) > gpus:  # else an "invalid device ordinal" from deep inside CUDA
                raise ConfigError(f"{local_ranks} ranks on this node (LOCAL_WORLD_SIZE), but each sees {gpus} GPU(s) "
                                  f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): each "
                                  f"rank takes GPU LOCAL_RANK of the GPUs it sees, as torchrun starts them, so start "
                                  f"at most as many ranks per node as it sees GPUs")
            dev = torch.device("cuda", local_rank)
        # Triton launches, the CUDA RNG state saved in checkpoints and NCCL all use the current device
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None,
                                timeout=datetime.timedelta(minutes=60))
    return Dist(rank, local_rank, world_size, dev)


def teardown_distributed():
    """End the process group once every rank is done with it.

    A gloo worker thread lets go of a finished collective's tensors only when it gets the GIL. Whoever then drops the
    group's last reference (DDP's reducer, when the trainer's locals go) joins those threads while holding the GIL:
    if a worker is still waiting for it, both wait forever (6 of 44 2-rank DPO runs hung so at exit, two or three at
    once on a 2-core box; at interpreter exit the same state aborts instead). So the ranks meet in a last all-reduce,
    then wait with the GIL released until gloo's worker has let go of it: its hold on the tensor shows in the
    tensor's Python reference count."""
    release_run_dir_locks()  # the run is over: its folder may be taken by another
    if not dist.is_initialized():
        return
    gloo = dist.get_backend() == "gloo"
    done = torch.zeros(1, device="cpu" if gloo else torch.device("cuda", torch.cuda.current_device()))
    ours = sys.getrefcount(done)
    dist.all_reduce(done)
    deadline = time.monotonic() + 10
    while gloo and sys.getrefcount(done) > ours:
        if time.monotonic() > deadline:
            print(f"rank {dist.get_rank()}: gloo still holds the last all-reduce after 10 s; ending the process group "
                  "anyway", file=sys.stderr)
            break
        time.sleep(0.001)
    dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def main_rank_first(fn):
    """fn() on rank 0, then on the other ranks once it is done: rank 0 fills a cache (the tokenization's) that the
    others then read instead of all computing it at once."""
    is_main = int(os.environ.get("RANK", 0)) == 0
    out = fn() if is_main else None
    barrier()
    return out if is_main else fn()


def all_reduce_sum(x):
    """Sum a tensor (in place) over ranks; a no-op on one process."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def print0(*args):
    if int(os.environ.get("RANK", 0)) == 0:
        from tqdm import tqdm
        # through tqdm, which lifts a progress bar off the line first: printed under a bar, the line was appended
        # to it (the final evaluation's, on the finished bar's line)
        tqdm.write(" ".join(map(str, args)), file=sys.stdout)
        sys.stdout.flush()


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolved_precision(precision, device):
    """'bf16' or 'fp32' for --precision on this device ('auto': bf16 on CUDA, fp32 elsewhere). The trainers store
    the result in cfg, so config.json records what ran. bf16 on CPU runs the GPU recipe's numerics slowly."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision={precision!r}: expected auto, bf16 or fp32")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device, precision="auto"):
    """bf16 autocast for --precision=bf16 (weights and optimizer state stay fp32); plain fp32 otherwise."""
    if resolved_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def frozen_copy(model, precision, device):
    """A frozen eval-mode copy of `model`, for a reference. Under bf16 its nn.Linear weights are stored in bf16:
    autocast casts them to bf16 before every matmul anyway, and a frozen weight is cast again at every call (the
    cast cache keeps only weights that require grad), so the copy computes the same bits without those casts in
    about half the memory. The embedding and norms stay fp32, as the residual stream does under autocast; a head
    tied to the embedding (every SmolLM2) is still cast at each call."""
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    if resolved_precision(precision, device) == "bf16":
        for module in frozen.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(torch.bfloat16)
    return frozen


def compile_blocks(model):
    """torch.compile every transformer block in place, before any DDP / FSDP2 wrapping (as torchtitan does).

    Regional rather than whole-model: the blocks share one compiled graph, so compiling takes seconds rather than
    minutes, parameter names (checkpoints) are unchanged and FSDP2 still shards plain blocks. A new sequence
    length recompiles once, after which lengths are symbolic. generate() does not call the blocks (see
    model.forward_cached)."""
    for block in model.layers:
        block.compile()


def wrap_model(model, d, fsdp=False, compile=False, precision="auto"):
    """DDP (or FSDP2 per transformer block + root) for world > 1; the bare model otherwise. compile: see
    compile_blocks. Under FSDP2 with bf16 precision the blocks compute with bf16 copies of the parameters
    (gradients reduced in fp32), so a frozen model must go through the same wrapping to give the same numbers.

    The trainers call the wrapper for the forward and `unwrap(model)` for attributes such as output_weight."""
    if compile:
        compile_blocks(model)
    if fsdp and not d.is_distributed:
        print0("--fsdp=true in a single process: there is nothing to shard, so the model runs unwrapped")
    if fsdp and d.is_distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if resolved_precision(precision, d.device) == "bf16" else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        # the root holds the (tied) embedding / LM head; it stays gathered between forward and backward, so the
        # fused loss can use output_weight outside the forward
        fully_shard(model, mp_policy=mp, reshard_after_forward=False)
        return model
    if d.is_distributed:
        # The only buffers are the rope tables, the same on every rank: not broadcast at every forward. (Newer
        # torch deprecates broadcast_buffers, with a warning from every rank, for forward_sync_buffers.)
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
            "broadcast_buffers"
        # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets rather than a second copy of
        # them (6.8 GB at 1.7B in fp32)
        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, gradient_as_bucket_view=True,
                   **{no_sync: False})
    return model


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


def _is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def grad_sync(model, sync):
    """Context for one micro-batch backward: all-reduce gradients only on the last micro-batch of a step."""
    if isinstance(model, DDP) and not sync:
        return model.no_sync()
    if _is_fsdp(model):
        model.set_requires_gradient_sync(sync)
    return nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule

def build_optimizer(model, cfg, device):
    """AdamW; weight decay only on matrices (not on norms' gains, which pull towards 0 for no reason)."""
    # A no-grad forward before this (DPO's reference pass) leaves FSDP's root holding temporary full tensors in
    # place of its sharded parameters; an optimizer built on those never updates the real ones.
    if _is_fsdp(model):
        _reshard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=device.type == "cuda")


def lr_at(step, total_steps, base_lr, schedule="linear", warmup_ratio=0.0, min_lr_ratio=0.0):
    """Learning rate of optimizer step `step` (0-based), as transformers' get_*_schedule_with_warmup, which the
    Tulu 3 / SmolTulu runs used: warmup = ceil(ratio x total) steps rising from 0, then linear or cosine decay."""
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return base_lr * step / max(1, warmup)
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        frac = max(0.0, 1.0 - progress)
    elif schedule == "cosine":
        frac = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    else:
        raise ConfigError(f"schedule={schedule!r}: expected {', '.join(SCHEDULES)}")
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * frac)


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


class Diverged(RuntimeError):
    """A gradient that is not finite: the run stops before the update it would make."""


def clip_grad(model, max_norm, step):
    """Clip the global gradient norm; returns the norm before clipping (a float) for logging. A nan or inf norm
    (the same on every rank) raises Diverged before optimizer step `step`: clipped by it, every gradient would be
    nan, then every weight and Adam moment, and every checkpoint and final model the run wrote after it."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    norm = norm.item()
    if not math.isfinite(norm):
        raise Diverged(f"step {step}: the gradient norm is {norm}: stopped before the update, so the weights and the "
                       f"checkpoints are as they were (a learning rate too high, or this step's batch)")
    return norm


def check_positions(longest, model, where):
    """A sequence longer than the model's positions fails deep inside it (an IndexError on CPU, a device-side assert
    on GPU): say so before training."""
    limit = model.config.max_position_embeddings
    if longest > limit:
        raise ConfigError(f"{where}: the longest sequence has {longest} tokens, more than the model's "
                          f"max_position_embeddings ({limit}); set --max_seq_len={limit} or less")


def total_steps_for(cfg, num_items, items_per_step):
    """Optimizer steps of the run: --max_steps, or --epochs x the whole steps in one pass over num_items, taken
    items_per_step (the effective batch) at a time. The sampler carries each epoch's last partial batch into the
    next epoch, so the run stops (num_items mod items_per_step) x epochs items short of the last epoch's end."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if num_items < items_per_step:
        raise ConfigError(f"the data has {num_items} items, fewer than one optimizer step takes (the effective "
                          f"batch, {items_per_step})")
    return num_items // items_per_step * cfg.epochs


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: atomic (temp dir, then rename), keep the last K, exact resume (RNG of every rank)

def _rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _reshard(model):
    """Put every FSDP module back to its sharded parameters. A no-grad forward (held-out evaluation) leaves the
    root unsharded, since it reshards only after backward; its parameters are then plain tensors, not the
    DTensors the optimizer holds, and the state-dict API no longer finds the optimizer's parameters in the model
    (KeyError in get_optimizer_state_dict) or would load into a temporary copy."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _full_state(model, optimizer):
    """Full (unsharded) model and optimizer state dicts on CPU; collective under FSDP, so every rank calls it."""
    if _is_fsdp(model):
        _reshard(model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
            get_optimizer_state_dict
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
        return get_model_state_dict(model, options=opts), optim_sd
    return unwrap(model).state_dict(), (optimizer.state_dict() if optimizer is not None else None)


def checkpoint_dir(run_dir):
    return os.path.join(run_dir, "checkpoints")


def _gather(value):
    """Every rank's `value`, in rank order."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def save_checkpoint(run_dir, step, model, optimizer, extra=None, keep=2):
    """Write run_dir/checkpoints/step_XXXXXXX atomically and delete all but the newest `keep`.

    Every rank must call it (RNG states are gathered from all ranks; FSDP gathers shards). `extra` is any
    picklable dict (the sampler's state, the config, the starting weights' digest) and comes back from
    load_checkpoint."""
    model_sd, optim_sd = _full_state(model, optimizer)
    extra = {**(extra or {}), "model_config": model_configs(model)}
    rngs = _gather(_rng_state()) if dist.is_initialized() else [_rng_state()]
    if int(os.environ.get("RANK", 0)) == 0:
        root = checkpoint_dir(run_dir)
        final = os.path.join(root, f"step_{step:07d}")
        tmp = os.path.join(root, f".tmp_step_{step:07d}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save(model_sd, os.path.join(tmp, "model.pt"))
        if optim_sd is not None:
            torch.save(optim_sd, os.path.join(tmp, "optimizer.pt"))
        # the id tells this save from a same-named one another run left in a folder of the same path (maybe_resume)
        torch.save({"step": step, "rng": rngs, "extra": extra, "id": os.urandom(8).hex()},
                               os.path.join(tmp, "state.pt"))
        replace_dir(tmp, final)  # re-saving the same step (e.g. the end of a resumed run) replaces it whole
        prune_checkpoints(run_dir, keep)
    barrier()


def prune_checkpoints(run_dir, keep):
    """Delete all but the newest `keep` checkpoints (0: keep all). Each is renamed out of the listing first, so a
    kill halfway through never leaves a half-deleted folder that looks like a checkpoint; the next prune finishes
    what a killed one started. It also deletes what a killed save left (.tmp_step_N, .old_step_N) once the newest
    checkpoint is step N or later: a resumed run may never save step N again (--checkpoint_every may change), and
    until then a complete copy of step N may be among them (a kill between replace_dir's two renames)."""
    root = checkpoint_dir(run_dir)
    ckpts = list_checkpoints(run_dir)
    newest = int(os.path.basename(ckpts[-1])[5:]) if ckpts else -1
    for old in ckpts[:-keep] if keep > 0 else []:
        os.replace(old, os.path.join(root, f".deleting_{os.path.basename(old)}"))
    for name in os.listdir(root) if os.path.isdir(root) else []:
        left = re.fullmatch(r"\.(tmp|old)_step_(\d+)", name)
        if name.startswith(".deleting_") or (left and int(left[2]) <= newest):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def replace_dir(tmp, path):
    """Put the finished folder tmp at path. An earlier folder there is renamed aside first and deleted after, so
    that a kill leaves path without a complete folder only between two renames, not for a whole rmtree (and the
    earlier one, under .old_<name>, until the new one is in place). tmp's files are on disk before the rename and
    the rename is on disk before the earlier folder goes: after a power cut, the folder at path could otherwise
    hold empty or cut-short files (the kernel writes a new file's data back later than the rename)."""
    for folder, _, names in os.walk(tmp):
        for name in names:
            _sync(os.path.join(folder, name))
        _sync(folder)
    parent = os.path.dirname(path) or "."
    aside = os.path.join(parent, f".old_{os.path.basename(path)}")
    shutil.rmtree(aside, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, aside)
    os.replace(tmp, path)
    _sync(parent)
    shutil.rmtree(aside, ignore_errors=True)


_CANNOT_SYNC = {errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _sync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # a folder on a filesystem that cannot sync one (some network and FUSE mounts): its files
        if not (e.errno in _CANNOT_SYNC and os.path.isdir(path)):  # were synced
            raise
    finally:
        os.close(fd)


def list_checkpoints(run_dir):
    """Complete checkpoints, oldest first (temporary .tmp_* dirs of an interrupted save are not listed)."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    names = sorted((n for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit()),
                   key=lambda n: int(n[5:]))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(run_dir):
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _read_checkpoint_file(path, weights_only=False):
    """torch.load, with an error that names the file and what to do when it is missing or cannot be read (a save
    is atomic, so that takes a damaged disk or a copy cut short).

    The file is memory-mapped: every rank of a node loads the same full checkpoint, and read into each process it
    would take the whole of it per rank (at 1.7B, 20 GB of weights and AdamW moments, times 8 ranks); mapped, the
    ranks share one copy in the page cache and each copies out only what it puts on its device. The mapping is
    private (writes to a loaded tensor never reach the file) and checkpoints are never rewritten in place, only
    replaced by renames, so a tensor still mapped from a pruned checkpoint keeps its values. Where the file cannot
    be mapped (a network filesystem without mmap) it is read whole, as before, rather than called damaged."""
    folder = os.path.dirname(path)

    def fallback():
        ckpts = list_checkpoints(os.path.dirname(os.path.dirname(folder)))
        older = ckpts[:ckpts.index(folder)] if folder in ckpts else []
        return f"delete {folder} to resume from {older[-1]}" if older else "no earlier checkpoint is left"
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing, so this checkpoint cannot resume training exactly: {fallback()}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except Exception:
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e}); the file is damaged or cut "
                              f"short: {fallback()}") from e


def _state_by_name(optim_sd, model, optimizer):
    """An optimizer state dict as FSDP's state-dict API takes it, keyed by parameter name. A checkpoint saved
    without FSDP (one rank, or DDP) keys it by the parameters' positions in the optimizer's groups, which the API
    cannot read (KeyError 'state.0.step'); the positions are those of this optimizer, built the same way."""
    if not all(isinstance(i, int) for group in optim_sd["param_groups"] for i in group["params"]):
        return optim_sd
    name_of = {id(p): name for name, p in unwrap(model).named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {names[i]: value for i, value in optim_sd["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in optim_sd["param_groups"]]}


def load_checkpoint(path, model, optimizer=None):
    """Restore model, optimizer and this rank's RNG state; returns {'step': int, 'extra': dict}."""
    model_sd = _read_checkpoint_file(os.path.join(path, "model.pt"), weights_only=True)
    optim_sd = _read_checkpoint_file(os.path.join(path, "optimizer.pt")) if optimizer is not None else None
    try:
        if _is_fsdp(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
                set_optimizer_state_dict
            opts = StateDictOptions(full_state_dict=True)
            _reshard(model)
            set_model_state_dict(model, model_sd, options=opts)
            if optim_sd is not None:
                set_optimizer_state_dict(model, optimizer, _state_by_name(optim_sd, model, optimizer), options=opts)
        else:
            unwrap(model).load_state_dict(model_sd)
            if optim_sd is not None:
                optimizer.load_state_dict(optim_sd)
    except (RuntimeError, ValueError) as e:
        # other tensor names or shapes (torch's own messages; FSDP2 fills a parameter missing from the checkpoint
        # with the model's and stops at its optimizer state), as when --model was replaced by another architecture
        # since: said in a line; anything else (out of memory, a failed collective) keeps its traceback
        what = " ".join(str(e).split())
        if not what.startswith(("Error(s) in loading state_dict", "loaded state dict", "Missing optimizer state for "
                                "parameter", "Missing key")):
            raise
        raise CheckpointError(f"{path}: does not fit the model built from --model, which is not the one this run "
                              f"started from ({what[:300]}{' ...' if len(what) > 300 else ''})") from e
    state = _read_checkpoint_file(os.path.join(path, "state.pt"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    saved = state["rng"]  # one per rank that saved it
    _set_rng_state(saved[rank % len(saved)])
    if rank >= len(saved):  # resumed on more ranks: a stream of its own, seeded from that one, not a copy of it
        seed_all((int(torch.randint(2**31, (1,))) + rank) % 2**32)  # (RLVR's ranks must sample different noise)
    return {"step": state["step"], "extra": state["extra"]}


# What a resumed run may change: where its folder is, how it reports, checkpoints, splits its batch and runs, not
# what it trains on or how (the effective batch is total_batch_size, which is compared).
RESUMABLE_CHANGES = {"run_dir", "resume", "overwrite", "device", "progress", "log_every", "eval_every", "eval_data",
                     "eval_batch_size", "samples_per_step", "checkpoint_every", "keep_checkpoints", "cache_dir",
                     "batch_size", "grad_accum", "fsdp", "compile", "gradient_checkpointing", "eval_max_new_tokens"}


def weights_digest(model):
    """A hash of every weight and of the config that gives them their meaning (rope_theta, rms_norm_eps, the head
    split: none of it is in the state dict, and a config.json corrected in place changes every log-prob). Take it
    before wrapping: FSDP2 shards the parameters in place."""
    h = hashlib.sha256()
    if hasattr(model, "config"):
        h.update(json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_configs(model):
    """The settings that shape what each model in `model` computes (the policy, a value model's backbone), by module
    name: rope_theta, rms_norm_eps and the head split come from config.json, not from a checkpoint's tensors. Its
    token ids, position limit and init scale do not change what a trained model computes, and may be edited."""
    return {name: _computed(dataclasses.asdict(m.config))
            for name, m in unwrap(model).named_modules() if isinstance(getattr(m, "config", None), ModelConfig)}


def _computed(config):
    return {k: v for k, v in config.items() if k not in ("bos_token_id", "eos_token_id", "max_position_embeddings",
                                                          "initializer_range")}


def check_resume(cfg, start_weights=None, data_digest=None, model_config=None):
    """-> the checkpoint a --resume continues from, or None when there is none; refused unless every rank sees the
    same one and it was trained with this run's settings. `start_weights`: the weights_digest of the model the run
    started from, where it matters after step 0 (DPO's and RLVR's reference is that model, rebuilt from --model on
    resume), checked against the one the checkpoint recorded; `data_digest`: the training rows' (data.Rows.digest),
    likewise, since --data names files that may have changed since; `model_config`: model_configs of the model
    built from --model, which the checkpoint's weights are loaded into. maybe_resume calls it; DPO calls it first
    as well (without the data, not yet tokenized), so that a refused resume has not tokenized and run the
    reference pass."""
    path = latest_checkpoint(cfg.run_dir) if cfg.resume else None
    # Only rank 0 writes checkpoints. A node that cannot see its run_dir would start over with other weights and
    # other steps, or resume from what another run left there, and the ranks' collectives would stop matching (a
    # hang): every rank must take the same checkpoint, by name and then by the id its save drew.
    shared = "with several nodes, run_dir must be on a filesystem they all share"
    if cfg.resume and dist.is_initialized():
        chosen = _gather(os.path.basename(path) if path else None)
        if len(set(chosen)) > 1:
            seen = ", ".join(f"rank {r}: {c or 'none'}" for r, c in enumerate(chosen))
            raise ConfigError(f"--resume: the ranks see different checkpoints in {checkpoint_dir(cfg.run_dir)} "
                              f"({seen}); {shared}")
    if not path:
        return None
    header = _read_checkpoint_file(os.path.join(path, "state.pt"))
    if dist.is_initialized() and len(set(_gather(header.get("id")))) > 1:
        raise ConfigError(f"--resume: the ranks' {path} were written by different runs (the ranks see other "
                          f"folders under that path); {shared}")
    extra = header["extra"]
    saved = extra.get("config")
    now = config_dict(cfg)
    changed = {k: (saved.get(k), v) for k, v in now.items()
               if saved is not None and k not in RESUMABLE_CHANGES and saved.get(k) != v}
    # Every rank refuses alike, or the others would go on into collectives and hang: nodes that read their own
    # copies of --model or --data may disagree on the settings resolved from them (the template), on the starting
    # weights or on the rows.
    if dist.is_initialized() and len(set(_gather((tuple(sorted(changed)), start_weights, data_digest,
                                                   json.dumps(model_config, sort_keys=True))))) > 1:
        raise ConfigError(f"--resume: the ranks do not resume alike (their settings resolved from --model, its weights "
                          f"or the training rows differ); with several nodes, every node must read the same files")
    if changed:
        diff = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
        if changed.get("total_batch_size", (0,))[0]:  # recorded even where the command line gave grad_accum
            diff += (f"; total_batch_size is the effective batch (batch_size x grad_accum x ranks): "
                     f"--total_batch_size={changed['total_batch_size'][0]} keeps it on any number of ranks")
        final = os.path.join(cfg.run_dir, "final")
        further = f" (to train the finished model further: a new run with --model={final} and another --run_dir)" \
            if os.path.isdir(final) else ""
        raise ConfigError(f"--resume: {path} was trained with other settings ({diff}); resume with the same ones, "
                          f"or start a new run{further}")
    # after the settings, which name a changed --model (or beta) for what it is
    if start_weights is not None and extra.get("start_weights", start_weights) != start_weights:
        raise ConfigError(f"--resume: the model at --model={cfg.model} (its weights or config.json) is not the one "
                          f"the run in {cfg.run_dir} started from (was it retrained, or its config edited?), and the "
                          f"reference must be that starting model: put it back, or start a new run")
    # (checkpoints from before it was recorded: not checked; some recorded settings it no longer compares)
    saved_models = {name: _computed(config) for name, config in extra.get("model_config", model_config or {}).items()}
    if model_config is not None and saved_models != model_config:
        diff, sources = [], set()
        for name in sorted(set(saved_models) | set(model_config)):
            then, now = saved_models.get(name, {}), model_config.get(name, {})
            changed = [f"{name + ' ' if name else ''}{key}: {then.get(key)!r} then, {now.get(key)!r} now"
                       for key in sorted(set(then) | set(now)) if then.get(key) != now.get(key)]
            diff += changed
            if changed:  # (RLVR's value model is built from --value_model)
                key = "value_model" if name.startswith("value") and getattr(cfg, "value_model", "") else "model"
                sources.add(f"--{key}={getattr(cfg, key) or '(the demo preset)'}")
        raise ConfigError(f"--resume: the model built from {' and '.join(sorted(sources))} is not configured as the "
                          f"one {path} trained ({'; '.join(diff)}): its config.json was edited since, or it is another "
                          f"model; put it back, or start a new run")
    if data_digest is not None and extra.get("data_digest", data_digest) != data_digest:
        rows = f"--data={cfg.data}" if cfg.data else "the demo's"
        raise ConfigError(f"--resume: the training rows ({rows}) are not the ones the run in {cfg.run_dir} trained on "
                          f"(rows edited, added, removed or reordered, or another tokenizer): put them back, or start "
                          f"a new run")
    return path


def maybe_resume(cfg, model, optimizer, sampler, start_weights=None, data_digest=None):
    """With --resume and a checkpoint in run_dir (see check_resume): restore model, optimizer, RNG and the
    sampler's state, and return the step to continue from; otherwise 0. Checkpoints save `data_digest` in their
    extra as "data_digest"."""
    path = check_resume(cfg, start_weights, data_digest, model_configs(model))
    if not path:
        if cfg.resume:
            print0(f"--resume=true: no checkpoint in {checkpoint_dir(cfg.run_dir)}, so starting from step 0"
                   + ("" if cfg.checkpoint_every else " (and --checkpoint_every=0 writes none)"))
        return 0
    state = load_checkpoint(path, model, optimizer)
    try:
        sampler.load_state_dict(state["extra"]["sampler"])
    except ValueError as e:  # a checkpoint with no data digest: another number of rows still says so
        raise ConfigError(f"--resume: {path}: {e}") from None
    if int(os.environ.get("RANK", 0)) == 0:  # a kill may have come between a save and its prune
        prune_checkpoints(cfg.run_dir, cfg.keep_checkpoints)
    print0(f"resumed from step {state['step']} ({path})")
    return state["step"]


# ----------------------------------------------------------------------------------------------------------
# Run folder, metrics, progress bar, final save

def prepare_run_dir(cfg, d):
    """Create run_dir. A fresh run (or a --resume that finds no checkpoint) starts its folder over, since old
    checkpoints, metrics and config would otherwise be mistaken for this run's; but only with --overwrite=true when
    the folder holds an earlier run's checkpoints or final model, which a relaunch that forgot --resume=true would
    otherwise destroy. The run's config.json is written later (write_run_config), once every setting is resolved."""
    final = os.path.join(cfg.run_dir, "final")
    earlier = [p for p in (checkpoint_dir(cfg.run_dir), final) if os.path.isdir(p) and os.listdir(p)]
    resumable = latest_checkpoint(cfg.run_dir) is not None
    if not (cfg.resume and resumable):
        for key in ("model", "tokenizer", "value_model"):  # what this run reads must not be what it deletes
            given = getattr(cfg, key, "")
            if given and os.path.realpath(given) == os.path.realpath(cfg.run_dir):
                raise ConfigError(f"--{key}={given} is run_dir, whose config.json a fresh run replaces: pass another "
                                  f"--run_dir")
            for stale in (checkpoint_dir(cfg.run_dir), final):
                if given and os.path.isdir(stale) and _inside(given, stale):
                    raise ConfigError(f"--{key}={given} is inside {stale}, which a fresh run in run_dir="
                                      f"{cfg.run_dir} deletes: pass another --run_dir")
    in_use = None
    if d.is_main:  # before the checks of what the folder holds: a folder in use is refused as that
        os.makedirs(cfg.run_dir, exist_ok=True)
        try:
            lock_run_dir(cfg.run_dir)
        except ConfigError as e:
            in_use = str(e)
    if dist.is_initialized():  # said by every rank, not left to the others as a broken collective
        in_use = _gather(in_use)[0]
    if in_use:
        raise ConfigError(in_use)
    if earlier and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"run_dir={cfg.run_dir} holds an earlier run ({', '.join(earlier)}): pass "
                          + ("--resume=true to continue it, " if resumable else "")
                          + "--overwrite=true to replace it, or another --run_dir")
    if cfg.resume and not resumable and final in earlier and not cfg.overwrite:
        raise ConfigError(f"--resume=true: run_dir={cfg.run_dir} holds a finished model ({final}) but "
                          f"no checkpoint to continue from, so the run would start over from step 0 and replace "
                          f"it: pass --overwrite=true for that, or another --run_dir")
    if d.is_main:
        if not (cfg.resume and resumable):  # a fresh run, or a resume with nothing to resume: from step 0
            for stale in (checkpoint_dir(cfg.run_dir), final):
                shutil.rmtree(stale, ignore_errors=True)
            for name in ("metrics.jsonl", "config.json"):
                if os.path.exists(os.path.join(cfg.run_dir, name)):
                    os.remove(os.path.join(cfg.run_dir, name))
    barrier()


_RUN_DIR_LOCKS = []  # the open lock file of the run this process trains, until release_run_dir_locks or its end


def lock_run_dir(run_dir):
    """Refuse a second run in run_dir while one is training there (a job launched twice, a rerun while the first is
    still going): two writers would interleave their metrics and replace each other's checkpoints. The lock is the
    kernel's (flock; over NFS Linux makes it a POSIX lock) and goes with the process that holds it, however that
    process ends. A process trains one run at a time: a run started in it lets go of its earlier run's folder (that
    of a main() that raised, in a notebook or a script calling the trainers)."""
    release_run_dir_locks()
    f = open(os.path.join(run_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise ConfigError(f"run_dir={run_dir} is in use: {holder} is training there (wait for it to end, stop it, "
                              f"or pass another --run_dir)") from None
        log.warning(f"run_dir={run_dir}: its filesystem does not lock files ({e}), so a second run started in it "
                    f"would not be refused")
        return
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _RUN_DIR_LOCKS.append(f)


def release_run_dir_locks():
    """Let go of this process's run_dir lock (a trainer's main() that returns; the tests, between runs)."""
    while _RUN_DIR_LOCKS:
        _RUN_DIR_LOCKS.pop().close()


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def write_run_config(cfg, **resolved):
    """run_dir/config.json: the settings that ran, with `resolved` values in place of cfg's. Called by the trainers
    after maybe_resume, when every setting is resolved (--template= included) and a resumed run's are known to fit
    its checkpoint (a refused resume leaves the record of the run its checkpoints belong to)."""
    if int(os.environ.get("RANK", 0)) == 0:
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            json.dump({**config_dict(cfg), **resolved}, f, indent=2)


def drop_records_after(path, step):
    """Keep only the records of a run log (jsonl, one 'step' per record) up to `step`, where a resumed run picks up;
    step 0 (no checkpoint was reached: the run starts over) keeps none. Rewritten atomically: a run killed while
    resuming keeps its history."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not line.endswith("\n"):  # cut short by the kill this run resumes from
                print0(f"{path}: dropping its last line, written only in part ({line[:40]!r}...)")
                continue
            raise ValueError(f"{path} line {i}: not JSON ({e.msg}); delete the line to resume") from None
        if step and record.get("step", 0) <= step:
            keep.append(line)
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


class MetricsLogger:
    """Appends one JSON line per call to run_dir/metrics.jsonl on rank 0. On resume it first drops the lines
    logged after the checkpoint, so the file reads as one uninterrupted run."""

    def __init__(self, run_dir, enabled=True, resume_step=None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        if enabled and resume_step is not None:
            drop_records_after(self.path, resume_step)

    def log(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                # 8 significant digits, not decimals: learning rates of 5e-7 keep their precision
                f.write(json.dumps({k: (float(f"{v:.8g}") if isinstance(v, float) else v) for k, v in record.items()})
                        + "\n")


# bf16 dense peak FLOP/s per device, for MFU (vendor datasheets, no sparsity)
# (the first name found in the device's name wins, so the PCIe / NVL parts come before the SXM ones)
_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H200": 989e12, "H100": 989e12,
               "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def peak_flops(device):
    """bf16 peak of the current GPU, or None (CPU / unknown GPU: no MFU is reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


class Throughput:
    """Tokens/s (and MFU when the device's peak is known) of a training step, timed from `start` to `stop`, so
    that the held-out evaluations and checkpoints between steps do not count as training time."""

    def __init__(self, flops_per_token, device, world_size):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device)
        self.world_size = world_size

    def start(self):
        self.t = time.perf_counter()

    def stop(self, tokens_global):
        tps = tokens_global / max(time.perf_counter() - self.t, 1e-9)
        out = {"tok_per_s": tps}
        if self.peak:
            out["mfu"] = self.flops_per_token * tps / (self.peak * self.world_size)
        return out


def progress_bar(total, initial, enabled, desc):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


# A reward model's score head, beside its backbone's HF files: train_dpo.py --objective=reward_model writes it,
# train_rlvr.py --algo=ppo reads it as the value model's starting head.
VALUE_HEAD = "value_head.safetensors"


def score_readout(hidden, score):
    """hidden @ score.weight.T -> [...] in fp32 whatever the autocast: a bf16 readout rounds a reward or a value near
    PPO's score of 10 to a step of 1/16."""
    with torch.autocast(hidden.device.type, enabled=False):
        return hidden.float() @ score.weight.float()[0]  # (not a view, which FSDP2 warns about as a module output)


def save_final(run_dir, model, tokenizer=None):
    """HF layout in run_dir/final (loads with transformers' AutoModelForCausalLM). Every rank calls it.

    Written to a temporary folder and renamed, so a run killed while saving never leaves a half-written final/
    that a later stage (or the demo's "already done" check) would take for a finished model."""
    path = os.path.join(run_dir, "final")
    tmp = os.path.join(run_dir, ".tmp_final")
    raw = unwrap(model)
    if _is_fsdp(model):
        # shards -> a full state dict -> a plain CPU copy of the model that save_pretrained understands
        model_sd, _ = _full_state(model, None)
        if int(os.environ.get("RANK", 0)) == 0:
            raw = raw.blank_copy()
            raw.load_state_dict(model_sd)
    if int(os.environ.get("RANK", 0)) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raw.save_pretrained(tmp, tokenizer=tokenizer)
        replace_dir(tmp, path)
    barrier()
    return path

