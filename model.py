"""The SmolLM2 / Llama transformer, its Hugging Face checkpoints, and KV-cache generation.

Read top to bottom: config -> modules -> checkpoint I/O -> generation. Parameter names mirror transformers'
LlamaForCausalLM (without the leading "model."), except that q/k/v and gate/up projections are fused into one
matmul each; to_hf_state / from_hf_state convert at the checkpoint boundary.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------------------------------------
# Config


class CheckpointError(ValueError):
    """A model folder that cannot be loaded as it is (config.json, the safetensors files): the message names the file
    and what is wrong."""


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = None  # hidden_size // num_heads unless the checkpoint says otherwise
    max_position_embeddings: int = 8192
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf_dict(cls, d, where="config.json"):
        """Read a LlamaForCausalLM config.json dict; refuse anything this module would compute differently."""
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        if archs != ["LlamaForCausalLM"]:
            raise CheckpointError(f"{where}: key 'architectures' = {archs}; only LlamaForCausalLM is supported")
        if d.get("model_type", "llama") != "llama":
            raise CheckpointError(f"{where}: key 'model_type' = {d['model_type']!r}; only 'llama' is supported")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise CheckpointError(f"{where}: key {key!r} = true is not supported (this model has no biases)")
        if d.get("attention_dropout", 0.0):
            raise CheckpointError(f"{where}: key 'attention_dropout' = {d['attention_dropout']}; attention dropout is "
                                  "not supported (transformers would apply it in training, this model never does)")
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: key 'hidden_act' = {d['hidden_act']!r}; only 'silu' is supported")
        # transformers 5 reads rope_scaling, when set, as the older name of rope_parameters, and either may carry the
        # theta, which SmolLM2's own snapshots keep at the top level.
        rope_key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
        rope = d.get(rope_key) or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"{where}: key {rope_key!r} = {rope!r} must be a dict")
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type != "default":
            raise CheckpointError(f"{where}: key {rope_key!r} has rope type {rope_type!r}; only 'default' rope is "
                                  "supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise CheckpointError(f"{where}: missing required keys {missing}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = d.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise CheckpointError(f"{where}: key {key!r} = {value!r} must be a positive integer")
        top_theta, rope_theta = d.get("rope_theta"), rope.get("rope_theta")
        if top_theta is not None and rope_theta is not None and top_theta != rope_theta:
            raise CheckpointError(f"{where}: key 'rope_theta' = {top_theta!r} and {rope_key}.rope_theta = "
                                  f"{rope_theta!r} disagree (transformers 4 reads the first, 5 the second): fix "
                                  "config.json to the theta the checkpoint was trained with")

        def positive_number(key, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise CheckpointError(f"{where}: key {key!r} = {value!r} must be a positive number")
            return float(value)
        if not isinstance(d.get("tie_word_embeddings", False), bool):
            raise CheckpointError(f"{where}: key 'tie_word_embeddings' = {d['tie_word_embeddings']!r} must be true or "
                                  "false")
        def token_id(i):
            return isinstance(i, int) and not isinstance(i, bool) and i >= 0
        # eos_token_id may list several ids (LlamaConfig takes int or list), bos_token_id may not: transformers
        # refuses a list there (at load, so a folder we saved with one would fail only for its consumer).
        bos = d.get("bos_token_id")
        if bos is not None and not token_id(bos):
            raise CheckpointError(f"{where}: key 'bos_token_id' = {bos!r} must be one token id (a non-negative "
                                  "integer; unlike eos_token_id, not a list: transformers refuses one)")
        eos = d.get("eos_token_id")
        if eos is not None and not all(token_id(i) for i in (eos if isinstance(eos, list) else [eos])):
            raise CheckpointError(f"{where}: key 'eos_token_id' = {eos!r} must be a token id or a list of them")
        num_heads = d["num_attention_heads"]
        # Fallbacks are LlamaConfig's own defaults, so a sparse config.json means what transformers reads.
        fields = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rope_theta=positive_number("rope_theta", rope_theta if rope_theta is not None else
                                       top_theta if top_theta is not None else 10000.0),
            rms_norm_eps=positive_number("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            initializer_range=positive_number("initializer_range", d.get("initializer_range", 0.02)),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=d.get("eos_token_id", 2),
        )
        try:
            return cls(**fields)
        except ValueError as e:  # the dataclass's own checks (heads, head_dim) do not know the file
            raise CheckpointError(f"{where}: {e}") from None

    def to_hf_dict(self, dtype=torch.float32):
        # Both rope forms, so transformers 4.x, 5.x and vLLM each find the theta where they look for it.
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_scaling": None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


PRESETS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, rope_theta=100000.0, initializer_range=0.041666666666666664),
    "smollm2-360m": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_layers=32, num_heads=15,
                         num_kv_heads=5, rope_theta=100000.0),
    "smollm2-1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=32,
                         num_kv_heads=32, rope_theta=130000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 max_position_embeddings=512, rope_theta=10000.0),
    "demo": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                 max_position_embeddings=1024, rope_theta=10000.0),
}

# -----------------------------------------------------------------------------------------------------------
# Modules


def rms_norm(x, weight, eps):
    if x.dtype != torch.float32:
        # Normalise in fp32 and scale after casting back, exactly as transformers does, so bf16 results match.
        return weight * F.rms_norm(x.float(), (x.size(-1),), eps=eps).to(x.dtype)
    if x.is_cuda:
        return F.rms_norm(x, (x.size(-1),), weight, eps)  # one fused kernel
    # On CPU, F.rms_norm runs a dozen small ops (scalar copies among them); transformers' formula gives the same
    # bits with six, which is 4% of a decode step at the demo size.
    return weight * (x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps)))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_tables(config, device):
    """cos and signed sin [max_pos, head_dim] in fp32 (rounded to the model dtype later, as transformers does).
    The sine's first half is negated: see apply_rope."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    freqs = torch.outer(torch.arange(config.max_position_embeddings, device=device).float(), inv_freq)
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)


def apply_rope(x, cos, signed_sin):
    # Llama's "rotate half" layout, x * cos + cat(-x2, x1) * sin with x1, x2 the halves of head_dim, written as a
    # roll by half with the sign folded into the sine table: one op where the concatenation takes three, and the
    # same numbers, since negating is exact.
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * signed_sin


def grouped_decode_attention(q, k, v, mask):
    """Grouped-query attention of one new token per row (q [B, H, 1, D], k and v [B, kv_heads, L, D], one mask row
    for every head) with no grouped-query support needed from the kernel: the heads that share a kv head become
    the query rows of one attention over it. On the GPU, where the kernels that take a mask do not share kv heads,
    this replaces a copy of the whole cache per group at every decoding step. (On the CPU, SDPA's own grouped
    kernel was measured faster.)"""
    B, H, _, D = q.shape
    y = F.scaled_dot_product_attention(q.reshape(B, k.size(1), H // k.size(1), D), k, v, attn_mask=mask)
    return y.reshape(B, H, 1, D)  # (not view: a GPU kernel's output is a transposed [B, group, kv_heads, D] buffer)


def split_heads(qkv, cos, sin, num_heads, num_kv_heads):
    """The fused projection [B, T, (heads + 2 kv_heads) x head_dim] -> q [B, heads, T, head_dim] and k, v
    [B, kv_heads, T, head_dim], q and k rotated."""
    B, T, _ = qkv.shape
    # Split and rotate in the projection's [B, T, heads, D] layout, then transpose: backward concatenates the
    # gradients straight into the fused matmul's layout, and torch.compile with dynamic sequence lengths gets the
    # attention strides right (rotating after the transpose trips a stride assertion in its CPU attention
    # backward). split, not slicing: backward is one concatenation, not zero-filled copies.
    qk, v = qkv.view(B, T, num_heads + 2 * num_kv_heads, -1).split([num_heads + num_kv_heads, num_kv_heads], dim=2)
    q, k = apply_rope(qk, cos, sin).transpose(1, 2).split([num_heads, num_kv_heads], dim=1)  # rotated together
    return q, k, v.transpose(1, 2)


def attend(q, k, v, mask):
    """Grouped-query attention: q [B, heads, T, D] over k, v [B, kv_heads, L, D]; mask None (causal, T == L) or
    [B, 1, T, L] (bool, or additive)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    groups = q.size(1) // k.size(1)
    if groups > 1 and q.is_cuda:
        if q.size(2) == 1:
            return grouped_decode_attention(q, k, v, mask)
        # The GPU kernels that take an arbitrary mask do not do grouped-query attention, so share kv heads
        # explicitly rather than fall back to the math kernel that materialises every score.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        # q, k and v in one matmul (checkpoints store them apart; see to_hf_state / from_hf_state).
        qkv_dim = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q, k, v = split_heads(self.qkv_proj(x), cos, sin, self.num_heads, self.num_kv_heads)
        return self.o_proj(attend(q, k, v, mask).transpose(1, 2).reshape(B, T, -1))


def swiglu(gate_up):
    """SwiGLU of the fused gate and up projections [..., 2 x intermediate]: silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_up_proj(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask):
        # generate() runs this computation as forward_cached, over the weights: a change here goes there too
        # (test_forward_cached_computes_what_the_blocks_compute holds the two equal)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self._init_rope()
        self.apply(self._init_weights)

    def _init_rope(self):
        # Not persistent: derived from the config, never stored in checkpoints.
        cos, sin = rope_tables(self.config, self.embed_tokens.weight.device)
        dtype = self.embed_tokens.weight.dtype
        self.register_buffer("rope_cos", cos.to(dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(dtype), persistent=False)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    @property
    def output_weight(self):
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden):
        # Apart from forward, so callers can run the head on the few positions they need (eval's continuations,
        # generate's last token) rather than build [B, T, V] logits.
        return F.linear(hidden, self.output_weight)

    def forward(self, input_ids, position_ids=None, doc_ids=None, return_hidden=False):
        """input_ids [B, T] -> logits [B, T, V] (or final normed hidden [B, T, H] with return_hidden).

        doc_ids [B, T]: packed rows; a token attends causally to earlier tokens of the same doc id only.
        """
        B, T = input_ids.shape
        # cos/sin [T, 1, D] or [B, T, 1, D]: broadcast over the heads of [B, T, heads, D] (and over B when every
        # row has the same positions)
        if position_ids is None:
            if T > self.config.max_position_embeddings:
                raise ValueError(f"positions 0..{T - 1} exceed max_position_embeddings "
                                 f"({self.config.max_position_embeddings})")
            cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]
        else:
            cos, sin = self.rope_cos[position_ids].unsqueeze(2), self.rope_sin[position_ids].unsqueeze(2)
        if doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :])).unsqueeze(1)
        else:
            mask = None  # plain causal: lets SDPA pick its fastest (flash) kernel

        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        x = self.norm(x)
        return x if return_hidden else self.logits(x)

    def blank_copy(self):
        """A newly initialised model of the same shape (a plain one: type(self) is FSDP's subclass when sharded),
        which FSDP's final save loads the gathered shards into."""
        return Transformer(self.config)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per matmul weight (the embedding lookup is not a matmul unless tied, when
        it doubles as the LM head) plus attention scores and values over seq_len keys (PaLM's convention)."""
        c = self.config
        n = self.num_params() - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
        return 6 * n + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len

    # -------------------------------------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        from safetensors import safe_open

        problem = model_folder_problem(path)
        if problem:
            raise FileNotFoundError(f"{path}: {problem}")
        config_path = os.path.join(path, "config.json")
        config = ModelConfig.from_hf_dict(_read_json_object(config_path), where=config_path)

        index_path = os.path.join(path, "model.safetensors.index.json")
        weight_map = None  # tensor name -> the shard the index says holds it
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            files = {"model.safetensors"}
        elif os.path.isfile(index_path):
            weight_map = _read_json_object(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index_path}: no weight_map object (tensor name -> shard file name)")
            files = set(weight_map.values())
        else:
            broken = [_broken_link(path, f) for f in ("model.safetensors", "model.safetensors.index.json")]
            broken = [b for b in broken if b]
            if broken:
                raise FileNotFoundError(f"{path}: {'; '.join(broken)}")
            pickled = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json") if os.path.isfile(
                os.path.join(path, f))]
            hint = f" ({pickled[0]} is there: PyTorch pickles are not read; transformers' save_pretrained writes " \
                   f"safetensors)" if pickled else ""
            raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found{hint}")

        # Construct without allocating or initialising weights; every one is then assigned from the checkpoint.
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in to_hf_state(model.state_dict(), config).items()}
        tensors, where = {}, {}
        absent = sorted(f for f in files if not os.path.isfile(os.path.join(path, f)))
        broken = [b for b in (_broken_link(path, f) for f in absent) if b]  # (a cache snapshot cut short)
        if broken:
            raise CheckpointError(f"{path}: {'; '.join(broken)}")
        if absent:
            raise CheckpointError(f"{index_path}: lists shards that are not in {path}: {', '.join(absent)}")
        for file in sorted(files):
            try:
                shard = safe_open(os.path.join(path, file), framework="pt", device=str(device))
            except Exception as e:  # safetensors' errors name neither the file nor the folder
                raise CheckpointError(f"{os.path.join(path, file)}: not a readable safetensors file ({e})") from None
            with shard as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq"):  # older transformers stored this derived buffer
                        continue
                    if name in where or (weight_map is not None and weight_map.get(name) != file):
                        raise CheckpointError(f"{path}: tensor {name} is in {file}, but " + (
                            f"also in {where[name]}" if name in where else
                            f"{index_path} puts it in {weight_map[name]}" if name in weight_map else
                            f"{index_path} does not list it in its weight_map"))
                    tensors[name], where[name] = f.get_tensor(name).to(dtype), file
        listed_nowhere = sorted(n for n in weight_map or () if n not in where and not n.endswith("rotary_emb.inv_freq"))
        if listed_nowhere:
            raise CheckpointError(f"{index_path}: lists tensors that no shard holds: {listed_nowhere}")

        if config.tie_word_embeddings and "lm_head.weight" in tensors:
            # Some exports write the tied head anyway; accept it only if it really is the embedding.
            head = tensors.pop("lm_head.weight")
            emb = tensors.get("model.embed_tokens.weight")
            if emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
                raise CheckpointError(f"{path}: tie_word_embeddings is true but lm_head.weight "
                                      f"({where['lm_head.weight']}) differs from model.embed_tokens.weight")
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        mismatched = [f"{k}: checkpoint {tuple(tensors[k].shape)} ({where[k]}) vs model {tuple(expected[k])}"
                      for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k]]
        # A tied checkpoint (no lm_head.weight) whose config.json does not say so: transformers defaults
        # tie_word_embeddings to false and would initialise the head at random, so this is refused, but the fix is
        # one key in config.json.
        untied_hint = " (the checkpoint has no lm_head.weight and config.json does not say tie_word_embeddings: " \
            "true; if the output head is the embedding, as SmolLM2's is, set it to true there)" \
            if "lm_head.weight" in missing and len(missing) == 1 else ""
        problems = ([f"missing tensors: {missing}{untied_hint}"] if missing else []) + \
                   ([f"unexpected tensors: {unexpected}"] if unexpected else []) + \
                   ([f"shape mismatches: {mismatched}"] if mismatched else [])
        if problems:
            raise CheckpointError(f"{path}: checkpoint does not match its config.json: " + "; ".join(problems))

        model.load_state_dict(from_hf_state(tensors), strict=True, assign=True)
        model._init_rope()  # the tables were made on the meta device: again, on the weights' device and dtype
        return model.eval()

    def save_pretrained(self, path, tokenizer=None):
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            # in a Hugging Face cache snapshot they are links into blobs/, which other revisions share: replaced,
            # not written through
            if os.path.islink(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        dtype = self.embed_tokens.weight.dtype
        config = self.config.to_hf_dict(dtype)
        eos = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
        if tokenizer is not None:  # a data.Tokenizer: as in the snapshots, config.json carries the pad id too
            config["pad_token_id"] = tokenizer.pad_id
            if tokenizer.eos_id not in eos:  # the tokenizer's eos is the model's (ChatML's <|im_end|>: see data.py)
                listed = isinstance(config["eos_token_id"], list)  # a list keeps the others after it
                eos = [tokenizer.eos_id, *eos]
                config["eos_token_id"] = eos if listed else tokenizer.eos_id
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        generation = {"bos_token_id": self.config.bos_token_id, "eos_token_id": config["eos_token_id"]}
        if tokenizer is not None:  # generation also stops at its template's end of turn
            eos = list(dict.fromkeys([*eos, *tokenizer.end_of_turn_ids()]))
            # and pads with the tokenizer's pad token (transformers would fall back to eos, with a warning)
            generation.update(eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=tokenizer.pad_id)
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        # A tied head is the embedding itself: state_dict() does not list it, and HF does not store it either.
        state = {k: v.detach().contiguous().cpu() for k, v in to_hf_state(self.state_dict(), self.config).items()}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        # Then what an earlier save into this folder left that this one did not write (after, so that a save cut
        # short still leaves a loadable folder): see _remove_stale_files.
        _remove_stale_files(path, tokenizer is not None)


# Weight files save_pretrained does not write (it writes one model.safetensors): a sharded save's index and shards,
# and PyTorch pickles. transformers and from_pretrained read model.safetensors first, but other loaders may read
# the index or a pickle, and would load the earlier model.
_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
# value_head.safetensors is a reward model's head (train_dpo.py writes it after this save): left beside a policy
# saved over it, it would make the folder read as a reward model's.
_OLD_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                     "value_head.safetensors")
# Tokenizer files data.Tokenizer.save_pretrained does not write (tokenizer.json and tokenizer_config.json hold the
# whole tokenizer): a stale special_tokens_map.json overrides tokenizer_config.json's eos on reload, in transformers
# and in data.Tokenizer alike (its other settings were carried into tokenizer_config.json when the tokenizer was
# read); added_tokens.json would add tokens, and a slow tokenizer's vocabulary would be the earlier tokenizer's.
_OLD_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


def _remove_stale_files(path, tokenizer_saved):
    """Remove from a folder save_pretrained just wrote the weight files (and, when it saved a tokenizer, the
    tokenizer files) of an earlier save there, as transformers' save_pretrained removes stale shards."""
    stale = {f for f in os.listdir(path) if _SHARD.fullmatch(f)} | set(_OLD_WEIGHT_FILES)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):  # shards under other names
        try:
            weight_map = _read_json_object(os.path.join(path, index)).get("weight_map")
        except (OSError, CheckpointError):  # no index, or a broken one: its shards are matched by name above
            continue
        if isinstance(weight_map, dict):  # only weight files, not whatever else a broken index names
            stale |= {f for f in weight_map.values() if isinstance(f, str) and os.path.basename(f) == f
                      and f.endswith((".safetensors", ".bin"))}
    if tokenizer_saved:
        stale |= set(_OLD_TOKENIZER_FILES)
    stale -= {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    for name in sorted(stale):
        file = os.path.join(path, name)
        if os.path.islink(file) or os.path.isfile(file):
            os.remove(file)


def model_folder_problem(path):
    """Why `path` is not a Hugging Face model folder, or None when it looks like one; the mistakes users make (a
    file, a run folder, a Hugging Face cache folder) are named as such."""
    if not os.path.exists(path):
        return "no such folder"
    if not os.path.isdir(path):
        return "a file, not a folder (a model is the Hugging Face folder of config.json and the weights)"
    if os.path.isfile(os.path.join(path, "final", "config.json")):  # a run folder's own config.json is its settings
        return f"a run folder; its trained model is {os.path.join(path, 'final')}"
    run_files = [f for f in ("checkpoints", "metrics.jsonl") if os.path.exists(os.path.join(path, f))]
    weights = [f for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                           "pytorch_model.bin.index.json") if os.path.lexists(os.path.join(path, f))]
    if run_files and not weights:  # a run still training, or killed: its config.json is settings, not a model's
        return (f"a run folder ({' and '.join(run_files)}) with no final model yet: final/ is written when the run "
                "finishes, and a checkpoint is not a model folder; let the run finish, or resume it (--resume=true) "
                "to finish")
    broken = _broken_link(path, "config.json")
    if broken:
        return broken
    if not os.path.isfile(os.path.join(path, "config.json")):
        snapshots = os.path.join(path, "snapshots")
        hint = f"; in a Hugging Face cache folder the model is {snapshots}/<revision>" \
            if os.path.isdir(snapshots) else ""
        return f"no config.json, so not a Hugging Face model folder{hint}"
    return None


def _broken_link(folder, name):
    """'<name> is a broken link to <target>' when folder/name is a symbolic link to nothing (a Hugging Face cache
    snapshot whose download was cut short links to a blob that never arrived), else None: such a file is there,
    and saying it is missing would send the user looking for the wrong mistake."""
    file = os.path.join(folder, name)
    if not os.path.islink(file) or os.path.exists(file):
        return None
    target = os.path.normpath(os.path.join(folder, os.readlink(file)))
    return f"{name} is a broken link to {target} (a download cut short? fetch the model again)"


def _read_json_object(path):
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def to_hf_state(state, config):
    """Our state dict -> LlamaForCausalLM tensor names and layout (fused projections split apart)."""
    H, Hkv, D = config.num_heads, config.num_kv_heads, config.head_dim
    out = {}
    for name, t in state.items():
        prefix = "" if name.startswith("lm_head.") else "model."
        if name.endswith("qkv_proj.weight"):
            stem = prefix + name.removesuffix("qkv_proj.weight")
            for part, w in zip("qkv", t.split([H * D, Hkv * D, Hkv * D]), strict=True):
                out[f"{stem}{part}_proj.weight"] = w
        elif name.endswith("gate_up_proj.weight"):
            stem = prefix + name.removesuffix("gate_up_proj.weight")
            out[stem + "gate_proj.weight"], out[stem + "up_proj.weight"] = t.chunk(2)
        else:
            out[prefix + name] = t
    return out


def from_hf_state(tensors):
    """Inverse of to_hf_state, for a checkpoint whose names and shapes were already checked."""
    out = {}
    for name, t in tensors.items():
        ours = name.removeprefix("model.")
        if ours.endswith("q_proj.weight"):
            stem = name.removesuffix("q_proj.weight")
            ours = ours.removesuffix("q_proj.weight") + "qkv_proj.weight"
            t = torch.cat([tensors[stem + p + "_proj.weight"] for p in "qkv"])
        elif ours.endswith("gate_proj.weight"):
            stem = name.removesuffix("gate_proj.weight")
            ours = ours.removesuffix("gate_proj.weight") + "gate_up_proj.weight"
            t = torch.cat([tensors[stem + "gate_proj.weight"], tensors[stem + "up_proj.weight"]])
        elif ours.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            continue  # folded into the fused tensor above
        out[ours] = t
    return out


# -----------------------------------------------------------------------------------------------------------
# Generation


class KVCache:
    """Keys and values for every layer, allocated once for prompt + new tokens; `pos` slots are filled.

    Prompts are left padded, so `valid` marks which slots hold real tokens: real tokens attend only to real
    ones and padding only to padding (which keeps every attention row non-empty, hence free of NaNs).
    """

    def __init__(self, config, pad, max_len, dtype):
        """pad [B]: row b's prompt is left padded by pad[b] slots (to the longest prompt's length)."""
        shape = (config.num_layers, pad.size(0), config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=pad.device)
        self.v = torch.zeros(shape, dtype=dtype, device=pad.device)
        self.pos = 0
        self.valid = torch.arange(max_len, device=pad.device)[None, :] >= pad[:, None]
        # A decoded token is real, so it sees exactly the real slots: one additive bias for every layer and step
        # (float, so SDPA need not convert a boolean mask in each layer).
        self.decode_bias = torch.zeros(self.valid.shape, dtype=dtype, device=pad.device)
        self.decode_bias.masked_fill_(~self.valid, float("-inf"))

    def attention_mask(self, start, T):
        """Mask for the T new slots from `start` over the filled ones: [B, 1, T, start + T] (bool or additive)."""
        end = start + T
        if T == 1:
            return self.decode_bias[:, None, None, :end]
        slots = torch.arange(end, device=self.valid.device)
        causal = slots[None, :] <= slots[start:end, None]
        same = self.valid[:, None, :end] == self.valid[:, start:end, None]
        return (causal & same).unsqueeze(1)


def layer_weights(model, matmul_dtype=None):
    """Each layer's weights, in the order forward_cached takes them; with matmul_dtype, its matrices cast to it once
    (the cast autocast would make at every call: under inference_mode it keeps no cache of casts)."""
    def matrix(w):
        return w if matmul_dtype is None else w.to(matmul_dtype)
    return [(layer.input_layernorm.weight, matrix(layer.self_attn.qkv_proj.weight),
             matrix(layer.self_attn.o_proj.weight), layer.post_attention_layernorm.weight,
             matrix(layer.mlp.gate_up_proj.weight), matrix(layer.mlp.down_proj.weight))
            for layer in model.layers]


def forward_cached(model, weights, input_ids, position_ids, cache):
    """Transformer.forward for generate, written over the layers' weights (layer_weights) rather than through the
    modules: at one token a step, nn.Module calls and parameter lookups took about 14% of a CPU decoding step. The
    same computation as Block.forward (test_forward_cached_computes_what_the_blocks_compute checks it); hooks on
    the blocks, and blocks compiled for training, are therefore not run in generation.

    input_ids [B, T] at position_ids [B, T] attend to the cache's filled slots and to each other, their keys and
    values are stored from slot cache.pos on, and the final normed hidden states [B, T, H] come back."""
    c = model.config
    B, T = input_ids.shape
    start, end = cache.pos, cache.pos + T
    cos, sin = model.rope_cos[position_ids].unsqueeze(2), model.rope_sin[position_ids].unsqueeze(2)
    mask = cache.attention_mask(start, T)
    x = model.embed_tokens(input_ids)
    for (input_norm, qkv, o, post_norm, gate_up, down), k_cache, v_cache in zip(weights, cache.k, cache.v):
        q, k, v = split_heads(F.linear(rms_norm(x, input_norm, c.rms_norm_eps), qkv), cos, sin, c.num_heads,
                              c.num_kv_heads)
        k_cache[:, :, start:end] = k  # [B, kv_heads, max_len, head_dim]
        v_cache[:, :, start:end] = v
        y = attend(q, k_cache[:, :, :end], v_cache[:, :, :end], mask)
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, -1), o)
        x = x + F.linear(swiglu(F.linear(rms_norm(x, post_norm, c.rms_norm_eps), gate_up)), down)
    cache.pos = end
    return model.norm(x)


@dataclass
class Generation:
    tokens: list = field(default_factory=list)    # new token ids per row, up to and including a stop token
    logprobs: list = field(default_factory=list)  # log-prob of each returned token, at the sampling temperature
    #                                               (1 when greedy) and before top-k / top-p filtering
    stopped: list = field(default_factory=list)   # whether the row ended on a stop token


def filter_logits(logits, top_k, top_p):
    """Set to -inf every token outside the top_k (0: no limit) and outside the top_p nucleus, as transformers'
    TopKLogitsWarper then TopPLogitsWarper do; the most likely token always survives."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # From the least likely up, drop tokens while their mass stays within 1 - top_p. Ascending, as transformers
        # and vLLM sort, so that tokens tied at the cut are the same ones.
        sorted_logits, order = torch.sort(logits, dim=-1)
        drop = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits, temperature, top_k, top_p, generator):
    """logits [B, V] fp32 -> (token [B], its log-prob [B] under softmax(logits / T), before any filtering; T = 1
    when greedy)."""
    if temperature == 0.0:
        logp = torch.log_softmax(logits, dim=-1)
        token = logits.argmax(dim=-1)
        return token, logp.gather(1, token[:, None]).squeeze(1)
    logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
    token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return token, logp.gather(1, token[:, None]).squeeze(1)


STOP_CHECK_EVERY = {"cuda": 8}  # decoding steps between host reads of whether every row has stopped (else 1)


@torch.inference_mode()  # lighter than no_grad: no version counters or view tracking on the many tiny ops
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, stop_token_ids=(),
             generator=None, pad_token_id=0):
    """Continue each prompt (a list of token ids) by up to max_new_tokens; see Generation for the result."""
    B = len(prompts)
    if not temperature >= 0 or not 0 < top_p <= 1 or top_k < 0:  # (`not >=` refuses a NaN too)
        raise ValueError(f"generate: need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got temperature="
                         f"{temperature}, top_p={top_p}, top_k={top_k}")
    if not isinstance(stop_token_ids, (list, tuple)):
        raise ValueError(f"generate: stop_token_ids must be a list of ids (or one list per prompt), got "
                         f"{type(stop_token_ids).__name__}")
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            raise ValueError(f"generate: prompt {i} must be a non-empty list of token ids, got "
                             f"{p if isinstance(p, (list, tuple)) else type(p).__name__}")
        if not all(0 <= t < vocab for t in p):
            raise ValueError(f"generate: prompt {i} has ids outside the vocabulary [0, {vocab}): "
                             f"{sorted({t for t in p if not 0 <= t < vocab})[:5]}")
    lengths = [len(p) for p in prompts]
    P, limit = max(lengths), model.config.max_position_embeddings
    if P + max_new_tokens - 1 > limit:  # the last new token is sampled, never fed back, so it needs no position
        raise ValueError(f"generate: longest prompt ({P}) + max_new_tokens ({max_new_tokens}) - 1 exceeds "
                         f"max_position_embeddings ({limit})")
    if max_new_tokens <= 0:
        return Generation([[] for _ in prompts], [[] for _ in prompts], [False] * B)
    weight = model.output_weight
    device = weight.device

    # Stop ids as a [B, S] tensor (padded with -1, never a token) so the per-step check is one comparison.
    per_row = len(stop_token_ids) > 0 and isinstance(stop_token_ids[0], (list, tuple))
    rows = [list(s) for s in stop_token_ids] if per_row else [list(stop_token_ids)] * B
    if len(rows) != B:
        raise ValueError(f"generate: {len(rows)} per-row stop_token_ids lists for {B} prompts")
    width = max(len(r) for r in rows)
    stops = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long, device=device) \
        if width else None

    ids = torch.tensor([[pad_token_id] * (P - n) + p for p, n in zip(prompts, lengths)], device=device)
    lens = torch.tensor(lengths, device=device)
    # Under autocast SDPA casts the cached keys and values to the autocast dtype before every use, so with fp32
    # weights (RLVR's rollouts: bf16 compute) storing them in it gives the same tokens in half the memory. (With
    # 16-bit weights of the other kind, they are rounded once, to the autocast dtype, instead of twice.)
    cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
    cache = KVCache(model.config, P - lens, P + max_new_tokens, cache_dtype)
    positions = (torch.arange(P, device=device)[None, :] - (P - lens)[:, None]).clamp(min=0)

    tokens, logprobs = [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # Reading `done` on the host waits for the device to finish the step, so on a GPU it is read every few steps
    # only and the CPU keeps queueing the next ones; rows that stopped meanwhile decode padding, which is cut off.
    check_every = STOP_CHECK_EVERY.get(device.type, 1)
    num_new = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)

    # Under autocast the matrices are cast once per call here, not once per step: an fp32 1.7B model's decoding step
    # would otherwise read its 6.8 GB of fp32 weights and write and read a 3.4 GB bf16 copy of them (bit-identical
    # tokens; the copy is held during the call).
    matmul_dtype = cache_dtype if torch.is_autocast_enabled(device.type) else None
    weights = layer_weights(model, matmul_dtype)
    head = weight if matmul_dtype is None else weight.to(matmul_dtype)
    hidden = forward_cached(model, weights, ids, positions, cache)[:, -1]
    for t in range(max_new_tokens):
        logits = F.linear(hidden, head).float()  # prefill kept only the last hidden state: no [B, T, V] logits
        token, logp = sample(logits, temperature, top_k, top_p, generator)
        if stops is not None:  # stopped rows keep decoding padding (cut off below) so the batch stays rectangular
            token = token.masked_fill(done, pad_token_id)
            hit = (token[:, None] == stops).any(dim=1) & ~done
            num_new = torch.where(hit, t + 1, num_new)
            done |= hit
        tokens.append(token)
        logprobs.append(logp)
        if t == max_new_tokens - 1 or (stops is not None and t % check_every == 0 and bool(done.all())):
            break
        hidden = forward_cached(model, weights, token[:, None], (lens + t)[:, None], cache)[:, 0]

    num_new, stopped = num_new.tolist(), done.tolist()
    tokens, logprobs = torch.stack(tokens, dim=1).tolist(), torch.stack(logprobs, dim=1).tolist()
    return Generation([row[:n] for row, n in zip(tokens, num_new)],
                      [row[:n] for row, n in zip(logprobs, num_new)], stopped)
