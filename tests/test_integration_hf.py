"""transformers.Trainer with PruneTrainCallback on tiny configs (nothing downloaded): half the FLOPs counted
independently on the reloaded checkpoint, from_pretrained without a warning, the same logits, generate, resume."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

tf = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from ptgraph.errors import UserError  # noqa: E402
from ptgraph.integrations.hf import PruneTrainCallback, save_pruned  # noqa: E402

VOCAB, LENGTH = 128, 16


def llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              hidden_size=64, intermediate_size=128, vocab_size=VOCAB,
                                              max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                                              pad_token_id=1))


def qwen2():
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              hidden_size=64, intermediate_size=128, vocab_size=VOCAB,
                                              max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                                              pad_token_id=1, tie_word_embeddings=False))


def mistral():
    return tf.MistralForCausalLM(tf.MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  hidden_size=64, intermediate_size=128, vocab_size=VOCAB,
                                                  max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                                                  pad_token_id=1, sliding_window=None))


def gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=64,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=1, resid_pdrop=0.0,
                                            embd_pdrop=0.0, attn_pdrop=0.0))


def bert():
    return tf.BertForSequenceClassification(tf.BertConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128, vocab_size=VOCAB,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def vit():
    return tf.ViTForImageClassification(tf.ViTConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


class Data(torch.utils.data.Dataset):
    def __init__(self, kind: str, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.kind, self.tokens = kind, torch.randint(2, VOCAB, (n, LENGTH), generator=g)
        self.images, self.labels = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        if self.kind == "lm":
            return {"input_ids": self.tokens[i], "labels": self.tokens[i]}
        if self.kind == "image":
            return {"pixel_values": self.images[i], "labels": self.labels[i]}
        return {"input_ids": self.tokens[i], "labels": self.labels[i]}


MODELS = {"llama": (llama, "lm"), "qwen2": (qwen2, "lm"), "mistral": (mistral, "lm"), "gpt2": (gpt2, "lm"),
          "bert": (bert, "cls"), "vit": (vit, "image")}


def make_trainer(name: str, out, steps: int = 12, callback=None, **args):
    build, kind = MODELS[name]
    torch.manual_seed(0)
    model = build()
    callback = callback or PruneTrainCallback(target_flops=0.5, prune_until=0.5, reconfigurations=3)
    args = dict(dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=2e-3,
                     logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                     dataloader_num_workers=0), **args)
    targs = tf.TrainingArguments(**args)
    return tf.Trainer(model=model, args=targs, train_dataset=Data(kind), callbacks=[callback]), callback


def probe(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=g) if name == "vit" else torch.randint(2, VOCAB, (2, LENGTH), generator=g)


def flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def load_quietly(cls, directory):
    """from_pretrained, failing on any warning or logged warning (a size mismatch, unused or missing weights)."""
    handler, logger = Records(), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = cls.from_pretrained(directory)
    finally:
        logger.removeHandler(handler)
    assert not handler.records, handler.records
    return model.eval()


AUTO = {"llama": "AutoModelForCausalLM", "qwen2": "AutoModelForCausalLM", "mistral": "AutoModelForCausalLM",
        "gpt2": "AutoModelForCausalLM", "bert": "AutoModelForSequenceClassification",
        "vit": "AutoModelForImageClassification"}
EXTRA = {"llama": dict(gradient_accumulation_steps=2, bf16=True)}  # accumulation and bf16 autocast on one model


@pytest.mark.parametrize("name", list(MODELS))
def test_trainer_prunes_to_half_the_flops_and_saves_a_standard_checkpoint(name, tmp_path):
    trainer, cb = make_trainer(name, tmp_path / "run", **EXTRA.get(name, {}))
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()  # bf16 autocast off
    x = probe(name)
    dense = flops(MODELS[name][0]().eval(), x)
    trainer.save_model(str(tmp_path / "out"))
    reloaded = load_quietly(getattr(tf, AUTO[name]), tmp_path / "out")
    assert type(reloaded) is type(model)
    share = flops(reloaded, x) / dense  # counted by torch, not by ptgraph
    assert abs(share - 0.5) <= 0.05, (name, share)
    assert cb.pt.target_reached and abs(cb.pt.flops / cb.pt.dense_flops - share) <= 0.05
    with torch.no_grad():
        assert (reloaded(x).logits - model(x).logits).abs().max() <= 1e-5
    sizes = {(k, tuple(v.shape)) for k, v in reloaded.state_dict().items()}
    assert sizes == {(k, tuple(v.shape)) for k, v in model.state_dict().items()}
    logged = [r for r in trainer.state.log_history if "flops_share" in r]
    assert logged and logged[-1]["flops_share"] == pytest.approx(cb.pt.flops / cb.pt.dense_flops)
    assert logged[0]["lasso_lambda"] > 0
    opt = trainer.optimizer.optimizer  # Adam's moments shrank with their parameters
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape
    assert trainer.lr_scheduler.last_epoch == 12
    if AUTO[name] == "AutoModelForCausalLM":
        a = reloaded.generate(x[:, :4], max_new_tokens=5, do_sample=False)
        b = model.generate(x[:, :4], max_new_tokens=5, do_sample=False)
        assert a.shape == (2, 9) and torch.equal(a, b)


def test_resume_from_a_trainer_checkpoint_ends_where_an_unbroken_run_ends(tmp_path):
    whole, _ = make_trainer("gpt2", tmp_path / "b", save_strategy="steps", save_steps=4)
    whole.train()
    resumed, cb = make_trainer("gpt2", tmp_path / "b", save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))  # after two shrinks
    assert cb.resumed_shapes and cb.pt.steps == 12
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-6), k


def test_a_shape_its_config_cannot_express_is_one_clear_error(tmp_path):
    from ptgraph.passes import PrunePlan
    from ptgraph.trainers import PruneTrain

    model = llama()
    model.config.use_cache = False  # torch.export cannot return a cache
    pt = PruneTrain(model, (probe("llama"),), torch.optim.SGD(model.parameters(), lr=0.1), self_check=False)
    mlp = next(g for g in pt.analysis.groups if g.prunable and g.size == 128)  # one layer's MLP, not the other's
    pt.reconfigure(PrunePlan({mlp.id: tuple(range(100))}))
    with pytest.raises(UserError, match="does not describe its pruned weights: 'model.layers.0.mlp"):
        save_pruned(model, str(tmp_path / "out"))


def test_the_example_script_prunes_saves_reloads_and_resumes(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "run"
    first = example.main(["--steps", "10", "--save-steps", "5", "--out", str(out)])
    assert abs(first["flops_share"] - 0.5) <= 0.05 and first["hidden_size"] % 8 == 0 and len(first["generated"]) == 14
    assert first["num_attention_heads"] == 2 * first["num_key_value_heads"]
    again = example.main(["--steps", "10", "--save-steps", "5", "--out", str(out), "--resume", str(out / "checkpoint-5")])
    assert again == first  # resumed from a checkpoint after pruning began: the same model


def test_two_processes_under_torchrun_end_identical_and_save_a_standard_checkpoint(tmp_path):
    """PruneTrainer on 2 gloo processes (examples/hf_trainer.py under torchrun): rank 0 plans, both shrink alike and
    train on through a rebuilt DDP wrapper (a stale one leaves the ranks apart, silently), and rank 0's save_model
    output reloads with the pruned model's logits and half the dense FLOPs, counted by torch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(root / "examples" / "hf_trainer.py"), "--steps", "10", "--save-steps", "1000",
           "--out", str(tmp_path / "run"), "--rank-out", str(tmp_path / "ranks")]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["plans"] == r1["plans"] and len(r0["plans"]) >= 2
    assert r0["state"].keys() == r1["state"].keys()
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    reloaded = load_quietly(tf.AutoModelForCausalLM, tmp_path / "run" / "final")
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == {k: v.shape for k, v in r0["state"].items()}
    x = torch.arange(2, 18).unsqueeze(0)  # the example's probe
    with torch.no_grad():
        assert (reloaded(x).logits - r0["logits"]).abs().max() <= 1e-5
    share = flops(reloaded, x) / flops(llama().eval(), x)  # the example's config is this file's llama()
    assert abs(share - 0.5) <= 0.05 and abs(r0["flops_share"] - share) <= 0.05, share


def test_a_plain_trainer_under_torchrun_and_a_prunetrainer_without_the_callback_are_refused(tmp_path):
    from types import SimpleNamespace

    from ptgraph.integrations.hf import PruneTrainer

    trainer, cb = make_trainer("llama", tmp_path / "run")
    args = SimpleNamespace(world_size=2)
    with pytest.raises(UserError, match="use ptgraph.integrations.hf.PruneTrainer in place of Trainer"):
        cb.on_train_begin(args, trainer.state, trainer.control, model=trainer.model, optimizer=None)
    with pytest.raises(UserError, match="its callbacks hold 0; pass callbacks=\\[PruneTrainCallback"):
        PruneTrainer(model=llama(), args=trainer.args, train_dataset=Data("lm"))
