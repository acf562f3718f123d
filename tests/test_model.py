"""model.py against transformers' LlamaForCausalLM (random weights, no downloads), plus packing and generation."""

import copy
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from model import (CheckpointError, Generation, ModelConfig, Transformer, filter_logits, generate,
                   grouped_decode_attention, to_hf_state)

VOCAB = 128


def hf_llama(tmp_path, name, rope_in_parameters=False, **kw):
    """Random LlamaForCausalLM saved to tmp_path/name; returns (hf model in eval mode, folder)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
                         initializer_range=0.2, bos_token_id=0, eos_token_id=0, **kw)
    model = LlamaForCausalLM(config).eval()
    path = str(tmp_path / name)
    model.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    # transformers 5 writes rope_parameters; SmolLM2's snapshots have rope_theta at top level. Test both forms.
    if rope_in_parameters:
        assert d["rope_parameters"]["rope_theta"] == kw["rope_theta"]
        d.pop("rope_theta", None)
    else:
        d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    return model, path


SMOL_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True)
SMOL_17B = dict(hidden_size=2048, intermediate_size=512, num_hidden_layers=1, num_attention_heads=32,
                num_key_value_heads=32, head_dim=64, rope_theta=130000.0, tie_word_embeddings=True)
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=50000.0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    return hf_llama(tmp_path_factory.mktemp("smol"), "hf", **SMOL_135M)


def logits_diff(ours, theirs, ids):
    with torch.no_grad():
        return (ours(ids) - theirs(ids).logits).abs().max().item()


def test_smollm2_135m_shape_matches_transformers_and_round_trips(smol, tmp_path):
    hf, path = smol
    model = Transformer.from_pretrained(path)
    assert model.config.rope_theta == 100000.0 and model.config.num_kv_heads == 3 and model.lm_head is None
    assert not model.training  # loaded for inference, as transformers' from_pretrained returns it
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    assert logits_diff(model, hf, ids) <= 1e-4
    # Our folder loads in transformers with the same logits; tied: no lm_head tensor is written.
    model.save_pretrained(str(tmp_path / "ours"))
    assert "lm_head.weight" not in load_file(str(tmp_path / "ours" / "model.safetensors"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["rope_theta"] == 100000.0
    assert back.dtype == torch.float32
    with torch.no_grad():  # same weights and same code as the original: bit-identical
        assert torch.equal(back(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("rope_in_parameters", [False, True])
def test_17b_shape_and_both_config_forms(tmp_path, rope_in_parameters):
    hf, path = hf_llama(tmp_path, "hf", rope_in_parameters=rope_in_parameters, **SMOL_17B)
    model = Transformer.from_pretrained(path)
    assert model.config.rope_theta == 130000.0 and model.config.num_kv_heads == 32
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    assert logits_diff(model, hf, ids) <= 1e-4


def test_untied_sharded_checkpoint(tmp_path):
    hf, _ = hf_llama(tmp_path, "hf", **SMALL)
    path = str(tmp_path / "sharded")
    hf.save_pretrained(path, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert not os.path.isfile(os.path.join(path, "model.safetensors"))
    model = Transformer.from_pretrained(path)
    assert model.lm_head is not None and model.config.rope_theta == 50000.0
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    assert logits_diff(model, hf, ids) <= 1e-5
    model.save_pretrained(str(tmp_path / "ours"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    assert logits_diff(model, back, ids) <= 1e-6


def test_a_shard_index_that_disagrees_with_its_shards_or_a_broken_file_is_named(tmp_path):
    hf, _ = hf_llama(tmp_path, "hf", **SMALL)
    path = tmp_path / "sharded"
    hf.save_pretrained(str(path), max_shard_size="20KB")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    counts = {f: list(index["weight_map"].values()).count(f) for f in index["weight_map"].values()}
    shards = sorted(counts, key=lambda f: -counts[f])  # the first holds several tensors: it stays listed
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    moved = {**index, "weight_map": {**index["weight_map"], name: shards[1]}}
    index_file.write_text(json.dumps(moved))
    with pytest.raises(ValueError, match=f"tensor {name} is in {shards[0]}, but .*index.json puts it in {shards[1]}"):
        Transformer.from_pretrained(str(path))
    # an index that leaves out a tensor its shard holds (transformers would ignore the tensor)
    index_file.write_text(json.dumps({**index, "weight_map": {n: f for n, f in index["weight_map"].items()
                                                              if n != name}}))
    with pytest.raises(ValueError, match=f"tensor {name} is in {shards[0]}, but .*index.json does not list it in its "
                                         "weight_map"):
        Transformer.from_pretrained(str(path))
    index_file.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], "model.extra": shards[0]}}))
    with pytest.raises(ValueError, match=r"lists tensors that no shard holds: \['model.extra'\]"):
        Transformer.from_pretrained(str(path))
    index_file.write_text(json.dumps(index))
    shard = path / shards[0]
    shard.write_bytes(shard.read_bytes()[:100])  # a download cut short
    with pytest.raises(ValueError, match=f"{shards[0]}: not a readable safetensors file"):
        Transformer.from_pretrained(str(path))
    (path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json: invalid JSON at line 1"):
        Transformer.from_pretrained(str(path))
    (path / "config.json").write_bytes(b"\xff{}")
    with pytest.raises(ValueError, match=r"config.json: not UTF-8 text \(byte 0\)"):
        Transformer.from_pretrained(str(path))
    index_file.write_text(json.dumps({**index, "weight_map": {name: 1}}))
    (path / "config.json").write_text(json.dumps(ModelConfig.from_preset("tiny").to_hf_dict()))
    with pytest.raises(ValueError, match=r"index.json: no weight_map object \(tensor name -> shard file name\)"):
        Transformer.from_pretrained(str(path))


def test_a_broken_link_is_named_as_such_not_as_a_missing_file(tmp_path):
    """A Hugging Face cache snapshot whose download was cut short: its files are links to blobs that are not there."""
    hf, _ = hf_llama(tmp_path, "hf", **SMALL)
    path = tmp_path / "snapshot"
    hf.save_pretrained(str(path), max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    os.remove(path / shard)
    os.symlink("../../blobs/abc123", path / shard)
    blob = os.path.normpath(tmp_path / "../blobs/abc123")
    with pytest.raises(ValueError, match=f"{shard} is a broken link to {blob}"):
        Transformer.from_pretrained(str(path))
    for name in ("model.safetensors.index.json", "config.json"):
        text = (path / name).read_text()
        os.remove(path / name)
        os.symlink("../../blobs/def456", path / name)
        with pytest.raises(FileNotFoundError, match=f"{path}: {name} is a broken link to "
                                                    f"{os.path.normpath(tmp_path / '../blobs/def456')}"):
            Transformer.from_pretrained(str(path))
        (path / name).unlink()
        (path / name).write_text(text)
    os.remove(path / "model.safetensors.index.json")  # a single-file checkpoint, its file a link to nothing
    os.symlink("/nonexistent/blob", path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors is a broken link to /nonexistent/blob"):
        Transformer.from_pretrained(str(path))


@pytest.mark.parametrize("marker", ["checkpoints", "metrics.jsonl"])
def test_a_run_folder_without_final_is_named_a_run_with_no_final_model_yet(tmp_path, marker):
    """A run still training (or killed) has its settings as config.json and checkpoints, but no final/ yet."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"lr": 1e-5, "run_dir": str(run)}))
    if marker == "checkpoints":
        (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    else:
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(FileNotFoundError, match=rf"{run}: a run folder \({marker}\) with no final model yet: .*a "
                                                "checkpoint is not a model folder"):
        Transformer.from_pretrained(str(run))


def test_dtype_and_device_arguments(smol):
    model = Transformer.from_pretrained(smol[1], dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_cos.dtype == torch.bfloat16
    assert model(torch.zeros(1, 3, dtype=torch.long)).dtype == torch.bfloat16


def edit_checkpoint(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_checkpoint_errors_name_the_tensor(tmp_path):
    _, path = hf_llama(tmp_path, "hf", **SMALL)
    edit_checkpoint(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: \['model.layers.1.mlp.up_proj.weight'\]"):
        Transformer.from_pretrained(path)

    _, path = hf_llama(tmp_path, "hf2", **SMALL)
    edit_checkpoint(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: \['model.layers.0.self_attn.q_proj.bias'\]"):
        Transformer.from_pretrained(path)

    _, path = hf_llama(tmp_path, "hf3", **SMALL)
    edit_checkpoint(path, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"shape mismatches: \['model.norm.weight: checkpoint \(65,\)"):
        Transformer.from_pretrained(path)

    _, path = hf_llama(tmp_path, "hf4", **{**SMALL, "tie_word_embeddings": True})
    edit_checkpoint(path, lambda t: t.update({"lm_head.weight": torch.zeros(VOCAB, 64)}))
    with pytest.raises(ValueError, match="lm_head.weight .* differs from model.embed_tokens.weight"):
        Transformer.from_pretrained(path)


def test_a_tied_checkpoint_whose_config_json_does_not_say_so_is_refused_with_the_fix(tmp_path):
    """transformers reads a config.json without tie_word_embeddings as untied and would initialise the missing
    head at random: refused, with the key to set."""
    _, path = hf_llama(tmp_path, "hf", **{**SMALL, "tie_word_embeddings": True})
    assert "lm_head.weight" not in load_file(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    del d["tie_word_embeddings"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    with pytest.raises(CheckpointError, match=r"missing tensors: \['lm_head.weight'\] \(the checkpoint has no "
                                              r"lm_head.weight and config.json does not say tie_word_embeddings: true"):
        Transformer.from_pretrained(path)


def test_config_checks_name_the_file_and_a_default_rope_scaling_is_no_scaling():
    d = ModelConfig.from_preset("tiny").to_hf_dict()
    assert ModelConfig.from_hf_dict({**d, "rope_scaling": {"rope_type": "default"}}) == ModelConfig.from_hf_dict(d)
    with pytest.raises(ValueError, match="snap/config.json: num_heads=4 is not a multiple of num_kv_heads=3"):
        ModelConfig.from_hf_dict({**d, "num_key_value_heads": 3}, where="snap/config.json")


def test_a_sparse_config_json_reads_as_transformers_llamaconfig_defaults():
    """Keys absent from config.json take LlamaConfig's defaults, not this module's (SmolLM2's) ones: transformers
    would build the checkpoint's model with those."""
    d = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    ours, theirs = ModelConfig.from_hf_dict(d), LlamaConfig(**d)
    assert theirs.rope_parameters == {"rope_type": "default", "rope_theta": ours.rope_theta}
    assert (ours.num_kv_heads, ours.head_dim, ours.max_position_embeddings, ours.rms_norm_eps,
            ours.tie_word_embeddings, ours.initializer_range, ours.bos_token_id, ours.eos_token_id) == \
        (theirs.num_key_value_heads, theirs.head_dim, theirs.max_position_embeddings, theirs.rms_norm_eps,
         theirs.tie_word_embeddings, theirs.initializer_range, theirs.bos_token_id, theirs.eos_token_id)


@pytest.mark.parametrize("key,value", [("attention_bias", True), ("mlp_bias", True), ("attention_dropout", 0.1),
                                       ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                       ("architectures", ["MistralForCausalLM"]), ("hidden_act", "gelu"),
                                       ("vocab_size", "778"), ("num_hidden_layers", 0), ("head_dim", 2.5),
                                       ("rms_norm_eps", -1.0), ("rms_norm_eps", "1e-5"), ("rope_theta", 0),
                                       ("initializer_range", "x"), ("tie_word_embeddings", "no"),
                                       ("eos_token_id", "2"), ("bos_token_id", [0, -1])])
def test_unsupported_config_features_are_refused(key, value):
    d = ModelConfig.from_preset("tiny").to_hf_dict()
    d[key] = value
    with pytest.raises(ValueError, match=f"key '{key}'"):
        ModelConfig.from_hf_dict(d)


def test_a_list_of_bos_ids_is_refused_at_load_as_transformers_refuses_it():
    """LlamaConfig takes a list of eos ids but only one bos id: a config.json with a bos list, read and saved back,
    would be a final/ that transformers refuses. A list of eos ids stays valid."""
    d = {**ModelConfig.from_preset("tiny").to_hf_dict(), "bos_token_id": [0, 1]}
    d.pop("torch_dtype")
    with pytest.raises(Exception, match="bos_token_id"):
        LlamaConfig(**d)
    with pytest.raises(CheckpointError, match=r"snap/config.json: key 'bos_token_id' = \[0, 1\] must be one token id"):
        ModelConfig.from_hf_dict(d, where="snap/config.json")
    ok = {**d, "bos_token_id": 1, "eos_token_id": [0, 5]}
    assert ModelConfig.from_hf_dict(ok).eos_token_id == LlamaConfig(**ok).eos_token_id == [0, 5]
    assert ModelConfig.from_hf_dict({**d, "bos_token_id": None}).bos_token_id is None  # LlamaConfig takes None too


def test_a_top_level_theta_that_disagrees_with_rope_parameters_is_refused():
    """transformers 4 would build the model with one theta and transformers 5 with the other."""
    d = {**ModelConfig.from_preset("tiny").to_hf_dict(), "rope_theta": 5.0}
    with pytest.raises(ValueError, match=r"key 'rope_theta' = 5.0 and rope_parameters.rope_theta = 10000.0 disagree"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("rope", [
    {"rope_theta": 500.0},
    {"rope_scaling": {"rope_type": "default", "rope_theta": 500.0}},  # transformers 5: an older name, read first
    {"rope_scaling": {"type": "default"}, "rope_parameters": {"rope_type": "default", "rope_theta": 77.0}},
    {"rope_parameters": {"type": "default", "rope_theta": 500.0}},
    {"rope_parameters": {"type": "linear", "factor": 4.0, "rope_theta": 500.0}},
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": {"rope_type": "default"}},
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
])
def test_rope_settings_are_read_where_transformers_reads_them(rope):
    """The theta transformers would use, or a refusal naming the key when its rope is not the default one."""
    d = {k: v for k, v in ModelConfig.from_preset("tiny").to_hf_dict().items()
         if k not in ("rope_theta", "rope_parameters", "rope_scaling", "torch_dtype")}
    d.update(copy.deepcopy(rope))
    theirs = LlamaConfig(**copy.deepcopy(d)).rope_parameters
    if theirs["rope_type"] == "default":
        assert ModelConfig.from_hf_dict(d).rope_theta == theirs["rope_theta"]
    else:
        with pytest.raises(ValueError, match=f"key '{next(iter(rope))}' has rope type '{theirs['rope_type']}'"):
            ModelConfig.from_hf_dict(d)


def test_config_round_trip_and_presets():
    for name in ("smollm2-135m", "smollm2-360m", "smollm2-1.7b", "tiny", "demo"):
        c = ModelConfig.from_preset(name)
        assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    c = ModelConfig.from_preset("smollm2-1.7b")
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta) == (32, 32, 64, 130000.0)
    assert ModelConfig.from_preset("demo", vocab_size=300).vocab_size == 300
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("gpt2")


def test_init_and_counts():
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", initializer_range=0.05)
    model = Transformer(config)
    assert abs(model.embed_tokens.weight.std().item() - 0.05) < 0.005
    assert abs(model.layers[0].mlp.down_proj.weight.std().item() - 0.05) < 0.005
    assert torch.equal(model.norm.weight, torch.ones(64))
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.to_hf_dict().items() if k != "torch_dtype"}))
    assert model.num_params() == sum(p.numel() for p in hf.parameters())
    assert model.flops_per_token(128) == 6 * model.num_params() + 12 * 2 * 4 * 16 * 128


def test_flops_per_token_count_the_lm_head_once_tied_or_not():
    """Untied, the embedding is a lookup (no FLOPs) and the LM head a matmul; tied, the one matrix is the LM head.
    Either way the matmul weights are the same, so the FLOPs are too."""
    shape = dict(vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=1, num_heads=2, num_kv_heads=1)
    # q, k, v, o + gate, up, down + 2 block norms + final norm + LM head; attention: 12 x layers x heads x head_dim
    expected = 6 * (8 * 8 + 4 * 8 + 4 * 8 + 8 * 8 + 3 * 12 * 8 + 2 * 8 + 8 + 10 * 8) + 12 * 1 * 2 * 4 * 16
    for tied in (True, False):
        model = Transformer(ModelConfig(**shape, tie_word_embeddings=tied))
        assert model.flops_per_token(16) == expected, f"tie_word_embeddings={tied}"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", initializer_range=0.3)).eval()


def test_packed_row_equals_each_document_alone(tiny):
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, 512, (n,), generator=g) for n in (5, 9, 3)]
    ids = torch.cat(docs + [torch.zeros(3, dtype=torch.long)])[None]  # 3 padding tokens with their own doc id
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)] + [torch.full((3,), -1)])[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs] + [torch.arange(3)])[None]
    with torch.no_grad():
        packed = tiny(ids, position_ids=pos, doc_ids=doc_ids)[0]
        alone = torch.cat([tiny(d[None])[0] for d in docs])
    assert not packed.isnan().any()
    torch.testing.assert_close(packed[:17], alone, atol=1e-5, rtol=1e-5)


def test_return_hidden_times_output_weight_is_logits(tiny):
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(tiny(ids, return_hidden=True) @ tiny.output_weight.T, tiny(ids))


def test_gradient_checkpointing_gives_the_same_grads():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).train()
    ids = torch.randint(0, 512, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])

    def grads():
        model.zero_grad()
        F.cross_entropy(model(ids, doc_ids=doc_ids).flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


PROMPTS = [[5, 17, 33], [9, 2, 44, 61, 7, 80, 3, 11], [100], [12, 13, 14, 15, 16]]


def test_greedy_generate_equals_transformers(smol):
    hf, path = smol
    model = Transformer.from_pretrained(path)
    out = generate(model, PROMPTS, max_new_tokens=12)
    P = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(P)[None] >= torch.tensor([P - len(p) for p in PROMPTS])[:, None]).long()
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert out.tokens == ref[:, P:].tolist()
    assert len({tuple(t) for t in out.tokens}) == len(PROMPTS)  # not a degenerate constant output
    assert out.stopped == [False] * len(PROMPTS)


def full_logprobs(model, prompt, new, temperature=1.0):
    """log_softmax of each new token recomputed without a cache from the whole sequence."""
    seq = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = model(seq)[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp, logp.gather(1, torch.tensor(new)[:, None]).squeeze(1)


def test_cached_greedy_decoding_equals_full_recomputation(tiny):
    out = generate(tiny, PROMPTS, max_new_tokens=10)
    for prompt, new, lps in zip(PROMPTS, out.tokens, out.logprobs, strict=True):
        logp, chosen = full_logprobs(tiny, prompt, new)
        assert new == logp.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(lps), chosen, atol=1e-4, rtol=1e-4)


def test_forward_cached_computes_what_the_blocks_compute(tiny):
    """Generation's own pass over the layers' weights (model.forward_cached) against Transformer.forward: a prompt
    gives the same bits as forward under the same mask, and each decoded token the hidden state forward gives it."""
    import model as model_module
    ids = torch.tensor([[5, 17, 33, 9, 2, 44], [61, 7, 80, 3, 11, 12]])
    cache = model_module.KVCache(tiny.config, torch.zeros(2, dtype=torch.long), 9, torch.float32)
    weights = model_module.layer_weights(tiny)
    with torch.no_grad():
        full = tiny(torch.cat([ids, ids[:, :3]], dim=1), doc_ids=torch.zeros(2, 9, dtype=torch.long),
                    return_hidden=True)
        prompt = tiny(ids, doc_ids=torch.zeros(2, 6, dtype=torch.long), return_hidden=True)
        assert torch.equal(model_module.forward_cached(tiny, weights, ids, torch.arange(6).expand(2, 6), cache),
                           prompt)
        for t in range(3):
            step = model_module.forward_cached(tiny, weights, ids[:, t:t + 1], torch.full((2, 1), 6 + t), cache)
            torch.testing.assert_close(step, full[:, 6 + t:7 + t], rtol=0, atol=1e-5)
    assert cache.pos == 9


def test_sampling_is_seeded_and_logprobs_match_recomputation(tiny):
    def run(seed, **kw):
        return generate(tiny, PROMPTS, max_new_tokens=8, temperature=0.7, top_k=50, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = run(0), run(0), run(1)
    assert a == b and a.tokens != c.tokens
    for prompt, new, lps in zip(PROMPTS, a.tokens, a.logprobs, strict=True):
        # logprobs are under softmax(logits / T) before top-k/top-p filtering
        _, chosen = full_logprobs(tiny, prompt, new, temperature=0.7)
        torch.testing.assert_close(torch.tensor(lps), chosen, atol=1e-4, rtol=1e-4)


def test_top_k_1_equals_greedy_and_top_p_keeps_the_nucleus(tiny):
    greedy = generate(tiny, PROMPTS, max_new_tokens=8)
    top1 = generate(tiny, PROMPTS, max_new_tokens=8, temperature=1.5, top_k=1,
                    generator=torch.Generator().manual_seed(0))
    assert top1.tokens == greedy.tokens
    tiny_p = generate(tiny, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6,
                      generator=torch.Generator().manual_seed(0))
    assert tiny_p.tokens == greedy.tokens


def test_sampling_filters_match_transformers_warpers_including_ties():
    """The distribution a token is drawn from equals transformers' temperature -> top-k -> top-p warpers', also when
    tokens tie at the top-p cut (logits rounded to bf16, as under autocast), where the kept ones must be the same."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(4, 1000, generator=g) * 3, (torch.randn(4, 1000, generator=g) * 3).bfloat16().float(),
             torch.tensor([[2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])]
    for logits in cases:
        # top_p=1e-8: 1 - top_p rounds to 1.0 in fp32, so the whole cumulative mass is within it; the top token stays
        for temperature, top_k, top_p in [(1.0, 0, 0.5), (0.7, 0, 0.9), (1.3, 20, 0.75), (1.0, 2, 1.0),
                                          (1.0, 0, 1e-6), (1.0, 0, 0.3), (1.0, 0, 1e-8)]:
            ours = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            theirs = TemperatureLogitsWarper(temperature)(None, logits)
            if top_k:
                theirs = TopKLogitsWarper(top_k)(None, theirs)
            if top_p < 1.0:
                theirs = TopPLogitsWarper(top_p)(None, theirs)
            torch.testing.assert_close(ours, torch.softmax(theirs, dim=-1), atol=0, rtol=0)


def test_grouped_decode_attention_equals_grouped_query_attention():
    """The GPU's decoding path (CPU decoding keeps SDPA's own grouped kernel): 9 query heads on 3 kv heads, query
    head h reading kv head h // 3, with padding slots masked out per row. NANOTULU_TEST_DEVICE=cuda runs it on the
    GPU's kernels (bench/gpu_checks.sh does)."""
    device = torch.device(os.environ.get("NANOTULU_TEST_DEVICE", "cpu"))
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape).to(device) for shape in ((2, 9, 1, 16), (2, 3, 7, 16), (2, 3, 7, 16)))
    mask = torch.zeros(2, 1, 1, 7, device=device)
    mask[0, ..., :2] = float("-inf")
    mask[1, ..., 5:] = float("-inf")
    repeated = F.scaled_dot_product_attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1),
                                              attn_mask=mask)
    torch.testing.assert_close(grouped_decode_attention(q, k, v, mask), repeated, rtol=0, atol=1e-5)


def test_stop_tokens_per_row(tiny):
    free = generate(tiny, PROMPTS, max_new_tokens=10).tokens
    # Row 0 stops at its 3rd token, row 1 at its 6th, row 2 never (no stop ids), row 3 on either of two ids.
    stops = [[free[0][2]], [free[1][5], 999], [], [free[3][0], free[3][4]]]
    # Stopped rows decode padding while others go on. The padding id is often a stop id too (eos = pad): it must not
    # count as that row stopping again, later.
    for pad in (0, free[0][2]):
        out = generate(tiny, PROMPTS, max_new_tokens=10, stop_token_ids=stops, pad_token_id=pad)
        for row, (toks, s) in enumerate(zip(free, stops, strict=True)):
            hit = next((i for i, t in enumerate(toks) if t in s), None)
            expect = toks if hit is None else toks[:hit + 1]
            assert out.tokens[row] == expect and len(out.logprobs[row]) == len(expect), (pad, row)
            assert out.stopped[row] == (hit is not None)
    # A flat list applies to every row.
    flat = generate(tiny, PROMPTS, max_new_tokens=10, stop_token_ids=[free[0][2]])
    assert flat.tokens[0] == free[0][:3] and flat.stopped[0]
    assert isinstance(flat, Generation)


def test_reading_the_stopped_rows_every_few_steps_gives_the_same_generation(tiny, monkeypatch):
    """The GPU's schedule (STOP_CHECK_EVERY: the host reads whether all rows stopped every few steps only), run on
    the CPU: the same tokens, log-probs and stop flags, and at most check_every - 1 steps decoded past the last stop."""
    import model as model_module
    free = generate(tiny, PROMPTS, max_new_tokens=12).tokens
    stops = [[free[row][row + 2]] for row in range(len(PROMPTS))]  # the rows stop at different steps
    last = max(next(i for i, t in enumerate(toks) if t in s) for toks, s in zip(free, stops))
    decoded, forward_cached = [], model_module.forward_cached

    def counting(model, weights, input_ids, position_ids, cache):
        decoded.append(input_ids.size(1) == 1)
        return forward_cached(model, weights, input_ids, position_ids, cache)

    monkeypatch.setattr(model_module, "forward_cached", counting)
    every_step = generate(tiny, PROMPTS, max_new_tokens=12, stop_token_ids=stops)
    assert sum(decoded) == last  # the step after the last stop is never decoded
    decoded.clear()
    monkeypatch.setattr(model_module, "STOP_CHECK_EVERY", {"cpu": 4})
    every_fourth = generate(tiny, PROMPTS, max_new_tokens=12, stop_token_ids=stops)
    assert every_fourth == every_step and all(every_step.stopped)
    assert sum(decoded) == -(-last // 4) * 4 and sum(decoded) < 12


def test_generate_under_autocast_casts_the_weights_once_per_call_and_samples_the_same_tokens(tiny):
    """Under inference_mode autocast keeps no cache of casts: every decoding step cast every fp32 weight matrix
    again (at 1.7B, 6.8 GB read and 3.4 GB written a step, besides the step's own reads)."""
    from torch.profiler import profile

    matrices = {tuple(p.shape) for p in tiny.parameters() if p.dim() == 2}  # (no activation has these shapes here)

    def weight_casts(steps):
        with profile(record_shapes=True) as prof:
            out = generate(tiny, PROMPTS, max_new_tokens=steps, temperature=1.0,
                           generator=torch.Generator().manual_seed(0))
        return out, sum(1 for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
                        and tuple(e.input_shapes[0]) in matrices)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        (_, short), (out, long) = weight_casts(2), weight_casts(8)
        # the same samples as a copy whose matrices are stored in bf16, which autocast leaves as they are
        half = copy.deepcopy(tiny)
        for module in half.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = module.weight.data.to(torch.bfloat16)
        same = generate(half, PROMPTS, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert short == long == 4 * tiny.config.num_layers + 1  # every matrix and the head, once a call
    assert same == out


def test_generate_leaves_the_training_mode_as_it_was_and_rejects_empty_prompt(tiny):
    tiny.train()
    generate(tiny, [[1, 2]], max_new_tokens=2)
    assert tiny.training
    tiny.eval()
    generate(tiny, [[1, 2]], max_new_tokens=2)
    assert not tiny.training
    with pytest.raises(ValueError, match=r"prompt 1 must be a non-empty list of token ids, got \[\]"):
        generate(tiny, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 must be a non-empty list of token ids, got Tensor"):
        generate(tiny, [torch.tensor([1, 2])], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt 1 has ids outside the vocabulary \[0, 512\): \[-1, 512\]"):
        generate(tiny, [[1], [512, 3, -1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="stop_token_ids must be a list of ids .*, got int"):
        generate(tiny, [[1]], max_new_tokens=2, stop_token_ids=5)
    # a negative temperature would sample the least likely tokens, top_p=0 drop every token
    for bad in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=1.0, top_p=0.0),
                dict(temperature=1.0, top_k=-1)):
        with pytest.raises(ValueError, match="temperature >= 0, 0 < top_p <= 1 and top_k >= 0"):
            generate(tiny, [[1]], max_new_tokens=2, **bad)


def test_generation_and_forward_within_max_position_embeddings(tiny):
    """A prompt filling every position still gets one new token (it is sampled, never fed back); a sequence past
    the last position is an error that names the limit, not a shape mismatch deep inside attention."""
    limit = tiny.config.max_position_embeddings
    full = [1 + i % 100 for i in range(limit)]
    out = generate(tiny, [full, [1, 2]], max_new_tokens=1)
    assert len(out.tokens[0]) == 1 and out.tokens[0][0] == tiny(torch.tensor([full]))[0, -1].argmax().item()
    with pytest.raises(ValueError, match=rf"longest prompt \({limit}\) \+ max_new_tokens \(2\) - 1 exceeds "
                                         rf"max_position_embeddings \({limit}\)"):
        generate(tiny, [full], max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"positions 0..{limit} exceed max_position_embeddings \({limit}\)"):
        tiny(torch.ones(1, limit + 1, dtype=torch.long))


def test_saving_with_a_tokenizer_adds_its_end_of_turn_ids_to_a_list_of_eos_ids_and_its_pad_id(tmp_path):
    """config.json may list several eos ids (LlamaConfig takes int or list); generation_config.json keeps them all
    and adds the chat template's end of turn, and the tokenizer's pad id (which config.json records too)."""
    import data
    tok = data.build_demo_tokenizer(data.make_demo_data(0, n_train=32, n_heldout=8), vocab_size=300)
    tok.chat_template = "chatml"
    im_end = tok.token_to_id("<|im_end|>")
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=[0, 5]))
    model.save_pretrained(str(tmp_path / "m"), tokenizer=tok)
    generation = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, 5, im_end] and generation["pad_token_id"] == tok.pad_id
    assert json.loads((tmp_path / "m" / "config.json").read_text())["pad_token_id"] == tok.pad_id
    assert Transformer.from_pretrained(str(tmp_path / "m")).config.eos_token_id == [0, 5]
    # trained in ChatML, <|im_end|> is the eos: first in the list, which keeps the others
    tok.use_chat_template("chatml")
    model.save_pretrained(str(tmp_path / "chatml"), tokenizer=tok)
    assert json.loads((tmp_path / "chatml" / "config.json").read_text())["eos_token_id"] == [im_end, 0, 5]
    assert json.loads((tmp_path / "chatml" / "generation_config.json").read_text())["eos_token_id"] == [im_end, 0, 5]


def test_saving_into_an_earlier_hf_folder_leaves_none_of_its_weight_or_tokenizer_files(tmp_path):
    """A sharded checkpoint and a special_tokens_map.json left beside the new save would be read by some loaders
    (the index) and override the new tokenizer's eos on reload (the map): save_pretrained removes them."""
    import data
    from transformers import PreTrainedTokenizerFast
    tok = data.build_demo_tokenizer(data.make_demo_data(0, n_train=32, n_heldout=8), vocab_size=300)
    path = tmp_path / "m"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(
        str(path), max_shard_size="20KB")
    shards = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (path / "notes.txt").write_text("mine")  # not a file of a save: kept
    (path / "value_head.safetensors").write_text("an earlier reward model's head")  # would make it a reward model
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["x"] = "notes.txt"  # a broken index naming a file of the user's: only weight files go
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    tok.use_chat_template("chatml")  # trained in ChatML: <|im_end|> is the eos
    model.save_pretrained(str(path), tokenizer=tok)
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors", "notes.txt",
                                        "tokenizer.json", "tokenizer_config.json"]
    assert data.Tokenizer.from_pretrained(str(path)).eos_token == "<|im_end|>"
    assert PreTrainedTokenizerFast.from_pretrained(str(path)).eos_token == "<|im_end|>"
    back = LlamaForCausalLM.from_pretrained(str(path))
    assert torch.equal(back.model.embed_tokens.weight, model.embed_tokens.weight)


def test_saving_into_a_cache_snapshot_replaces_its_links_and_leaves_the_blobs_they_share(tmp_path):
    import data
    tok = data.build_demo_tokenizer(data.make_demo_data(0, n_train=32, n_heldout=8), vocab_size=300)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.save_pretrained(str(tmp_path / "first"), tokenizer=tok)
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "main"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    names = sorted(os.listdir(tmp_path / "first"))
    for name in names:  # as the hub's cache lays a revision out: links into content-addressed blobs
        shutil.copy(tmp_path / "first" / name, blobs / name)
        os.symlink(os.path.join("..", "..", "blobs", name), snapshot / name)
    before = {name: (blobs / name).read_bytes() for name in names}
    tok.use_chat_template("chatml")  # another eos and template: other config and tokenizer files
    Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).save_pretrained(str(snapshot),
                                                                                             tokenizer=tok)
    assert {name: (blobs / name).read_bytes() for name in names} == before
    assert not any(os.path.islink(snapshot / name) for name in names)
    assert data.Tokenizer.from_pretrained(str(snapshot)).eos_token == "<|im_end|>"


def test_to_hf_state_splits_fused_projections(tiny):
    state = to_hf_state(tiny.state_dict(), tiny.config)
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert state["model.layers.0.mlp.up_proj.weight"].shape == (128, 64)


def test_kv_cache_takes_the_autocast_dtype_with_the_same_generation(tiny, monkeypatch):
    """Under bf16 autocast with fp32 weights the cache is bf16 (half the memory of RLVR's rollouts), and the tokens
    and log-probs equal those of an fp32 cache, since attention casts what it reads to bf16 anyway."""
    import model as model_module
    made, forced = [], {}

    class RecordingCache(model_module.KVCache):
        def __init__(self, config, pad, max_len, dtype):
            made.append(dtype)
            super().__init__(config, pad, max_len, forced.get("dtype", dtype))

    monkeypatch.setattr(model_module, "KVCache", RecordingCache)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_cache = generate(tiny, PROMPTS, max_new_tokens=10)
        forced["dtype"] = torch.float32
        fp32_cache = generate(tiny, PROMPTS, max_new_tokens=10)
    assert made == [torch.bfloat16, torch.bfloat16]
    assert bf16_cache.tokens == fp32_cache.tokens and bf16_cache.logprobs == fp32_cache.logprobs
    made.clear()
    generate(tiny, PROMPTS, max_new_tokens=2)
    assert made == [torch.float32]  # without autocast: the weights' dtype
