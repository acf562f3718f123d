import pytest
import torch

import data
from model import ModelConfig, Transformer


@pytest.fixture(autouse=True)
def _run_dir_locks_end_with_the_test():
    """A trainer's main() run in the test process and stopped midway keeps its run_dir locked, as its process would
    until it ended; a test is such a process's whole life."""
    yield
    import common
    common.release_run_dir_locks()


@pytest.fixture(scope="session")
def demo_sft_model(tmp_path_factory):
    """The demo SFT model (`python train_sft.py`'s preset, ~2 CPU minutes), trained once and shared by the DPO and
    RLVR tests that check the recipe's later stages improve on it. Its greedy outputs mostly break held-out
    constraints, because most constraint demonstrations in the demo data ignore them."""
    import train_sft
    run_dir = tmp_path_factory.mktemp("demo_sft")
    train_sft.main([f"--run_dir={run_dir}", "--progress=false", "--cache_dir=", "--eval_every=0"])
    return str(run_dir / "final")


@pytest.fixture(scope="session")
def write_tiny_demo_model():
    """A function root -> (demo data, tokenizer, model): a random 'tiny' model with a tokenizer trained on the demo
    data, saved with it to root/model. The DPO and RLVR tests build their fixtures on it."""
    def write(root):
        demo = data.make_demo_data(0, n_train=256, n_heldout=64)
        tok = data.build_demo_tokenizer(demo, vocab_size=512)
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
        model.save_pretrained(str(root / "model"), tokenizer=tok)
        return demo, tok, model
    return write


@pytest.fixture(scope="session")
def retrain_in_place():
    """A function model_dir -> None that changes one weight of the saved model, as retraining it would."""
    from safetensors.torch import load_file, save_file

    def retrain(model_dir):
        path = f"{model_dir}/model.safetensors"
        weights = load_file(path)
        weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
        save_file(weights, path, metadata={"format": "pt"})
    return retrain
