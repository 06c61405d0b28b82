"""PruneTrain through transformers.Trainer: a small Llama (grouped kv heads) brought to half its FLOPs while it
trains, saved as an ordinary Hugging Face checkpoint and reloaded with AutoModelForCausalLM.

    python examples/hf_trainer.py --steps 40 --out runs/hf-llama                       # train, prune, save
    python examples/hf_trainer.py --steps 80 --out runs/hf-llama --resume runs/hf-llama/checkpoint-20
    torchrun --nproc-per-node 2 examples/hf_trainer.py --steps 40 --out runs/hf-llama-ddp         # DDP (gloo on CPUs)

Tiny config and synthetic tokens (a repeating pattern plus noise), so it runs anywhere in seconds; for a real
model, load it with from_pretrained and give the Trainer your tokenised data: the callback line is the same.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

from ptgraph.integrations.hf import PruneTrainCallback, PruneTrainer


class Tokens(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start, one token in ten replaced at random."""

    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % vocab
        noise = torch.rand(n, length, generator=g) < 0.1
        self.ids[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="runs/hf-llama")
    p.add_argument("--target-flops", type=float, default=0.5)
    p.add_argument("--prune-until", type=float, default=0.5)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--resume", default=None, help="a checkpoint-N folder of an earlier run with the same --out")
    p.add_argument("--rank-out", default=None, help="write each rank's weights, plans and logits here (rank{r}.pt)")
    a = p.parse_args(argv)

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                         intermediate_size=128, vocab_size=128, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    model = LlamaForCausalLM(config)
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=8, learning_rate=3e-3,
                             lr_scheduler_type="cosine", logging_steps=5, save_steps=a.save_steps, report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0)
    callback = PruneTrainCallback(target_flops=a.target_flops, prune_until=a.prune_until)
    # PruneTrainer is transformers.Trainer whose steps follow the shrinks with a new DDP wrapper under torchrun
    trainer = PruneTrainer(model=model, args=args, train_dataset=Tokens(512, 32, config.vocab_size),
                           callbacks=[callback])
    trainer.train(resume_from_checkpoint=a.resume)
    final = Path(a.out) / "final"
    trainer.save_model(str(final))  # rank 0 writes config.json with the pruned widths, model.safetensors
    trainer.accelerator.wait_for_everyone()
    if a.rank_out:
        Path(a.rank_out).mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            logits = model.eval()(torch.arange(2, 18).unsqueeze(0)).logits
        torch.save({"state": model.state_dict(), "plans": [p.to_json() for p in callback.pt.plans],
                    "flops_share": callback.pt.flops / callback.pt.dense_flops, "logits": logits},
                   Path(a.rank_out) / f"rank{args.process_index}.pt")

    reloaded = AutoModelForCausalLM.from_pretrained(final).eval()
    prompt = torch.arange(2, 8).unsqueeze(0)
    text = reloaded.generate(prompt, max_new_tokens=8, do_sample=False)
    c = reloaded.config
    summary = {"flops_share": callback.pt.flops / callback.pt.dense_flops, "hidden_size": c.hidden_size,
               "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
               "num_key_value_heads": c.num_key_value_heads, "generated": text[0].tolist()}
    print(f"FLOPs {summary['flops_share']:.0%} of dense; saved {final}: hidden {c.hidden_size}, MLP "
          f"{c.intermediate_size}, heads {c.num_attention_heads} ({c.num_key_value_heads} kv); generated "
          f"{summary['generated']}")
    return summary


if __name__ == "__main__":
    main()
