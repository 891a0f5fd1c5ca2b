"""A Hugging Face ``Trainer`` run, gated by ``cggr_hook.enable(model)`` before ``trainer.train()``.

A tiny ``LlamaForCausalLM`` (random init, tied embeddings) trained on the Python standard library's
sources (``stdlib_text.py``). The Trainer computes the loss through the model's own ``labels=``
path, with gradient accumulation (so Hugging Face calls cross entropy with ``reduction='sum'`` and
divides by the number of tokens in the accumulated batch): the gate keeps that weighting, so a
gated token counts as it would in a plain ``'mean'``. ``trainer.evaluate()`` runs the model in eval
mode, where the gate steps aside: the evaluation loss is the plain loss over every held-out token,
and the script checks it equals the loss after ``cggr_hook.disable(model)``.

    python examples/hf_trainer.py                    # 40 steps, seconds on a CPU
    python examples/hf_trainer.py --max-steps 400 --min-tokens-ratio 0.5   # half of the tokens, importance-sampled
    python examples/hf_trainer.py --plain            # without gating, to compare
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stdlib_text  # noqa: E402

try:
    import cggr_hook
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cggr_hook


class Sequences(torch.utils.data.Dataset):
    """Fixed-length rows for causal LM: the Trainer's model shifts ``labels`` itself."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self):
        return self.rows.shape[0]

    def __getitem__(self, i):
        x = self.rows[i]
        return {"input_ids": x, "labels": x.clone()}


def main(argv=None):
    p = argparse.ArgumentParser(description="Hugging Face Trainer + cggr_hook on a tiny Llama.")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8, help="per-device batch (x2 gradient accumulation)")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--max-bytes", type=int, default=1_000_000)
    p.add_argument("--eval-rows", type=int, default=64, help="held-out rows to evaluate (0: all)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="cggr_hook curriculum length, from every token down to --min-tokens-ratio",
    )
    p.add_argument(
        "--min-tokens-ratio",
        type=float,
        default=None,
        help="fraction of tokens the gate keeps (default: the package's, every token)",
    )
    p.add_argument("--plain", action="store_true", help="no gating")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--output-dir", default=None, help="Trainer output dir (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    corpus = stdlib_text.load_corpus(vocab_size=args.vocab_size, max_bytes=args.max_bytes, cache_dir=args.cache_dir)
    train_ds = Sequences(corpus.train_sequences(args.seq_len))
    held = corpus.heldout_sequences(args.seq_len)
    eval_ds = Sequences(held if args.eval_rows <= 0 else held[: args.eval_rows])

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=corpus.vocab_size,
        hidden_size=args.d_model,
        intermediate_size=4 * args.d_model,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)

    cuda = torch.cuda.is_available()
    tmp = None
    if args.output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cggr_hf_")
        args.output_dir = tmp.name
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.1,
        logging_steps=max(1, args.max_steps // 4),
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )

    from cggr_hook.hf import CGGRCallback  # gate metrics in the logs, scheduler state in checkpoints

    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds)

    if not args.plain:
        CGGRCallback.attach(trainer)  # ahead of the reporters, so every one of them logs cggr/*
        options = {}
        if args.warmup_steps is not None:
            options["warmup_steps"] = args.warmup_steps
        if args.min_tokens_ratio is not None:
            options["min_tokens_ratio"] = args.min_tokens_ratio
        cggr_hook.enable(model, **options)  # CGGR: gate the loss of every training step from here on

    result = trainer.train()
    print(
        f"train: {result.global_step} optimizer steps, loss {result.training_loss:.4f}"
        + ("" if args.plain else f" (gated), scheduler step count {cggr_hook.scheduler.step_count}")
    )

    metrics = trainer.evaluate()  # eval mode: plain loss over every token of eval_ds
    print(f"eval: loss {metrics['eval_loss']:.4f} over {len(eval_ds)} x {args.seq_len} held-out tokens")
    assert math.isfinite(metrics["eval_loss"]), metrics
    if not args.plain:
        cggr_hook.disable(model)
        after = trainer.evaluate()["eval_loss"]
        same = after == metrics["eval_loss"]
        print(f"eval after cggr_hook.disable(model): {after:.4f} ({'identical' if same else 'DIFFERENT'})")
        if not same:
            return 1
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
