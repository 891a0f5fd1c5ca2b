"""TRL's ``SFTTrainer``, gated by ``cggr_hook.enable(model)``: the one added line.

A tiny ``LlamaForCausalLM`` (random init) learns to count: "count from 3" -> "4 5 6 7". Everything
is built here (a word-level tokenizer, a chat template, the data), so nothing is downloaded and a
run takes seconds on a CPU.

``SFTTrainer`` computes its loss through TRL's fused LM head (``model(..., fused_lm_head=True)``),
which never calls the head module or ``F.cross_entropy``; while the gate is enabled, the gate runs
that forward unfused and hands TRL the gated loss, so the tokens TRL would train on (completion
tokens only, or assistant turns only) are the tokens the gate selects from. ``--lora`` wraps the
model with PEFT inside the trainer (``peft_config=``) after ``enable``: the gate follows it.

    python examples/trl_sft.py                          # prompt-completion data, completion-only loss
    python examples/trl_sft.py --data conversations     # chat data, assistant-only loss
    python examples/trl_sft.py --lora                   # LoRA adapters (PEFT) made by the trainer
    python examples/trl_sft.py --plain                  # without gating, to compare
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

try:
    import cggr_hook
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cggr_hook

from cggr_hook.hf import CGGRCallback  # noqa: E402

WORDS = ["count", "from", "user", "assistant", ":"] + [str(i) for i in range(40)]
SPECIALS = ["<pad>", "<eos>", "<unk>"]
# assistant turns are marked for TRL's assistant-only loss ({% generation %})
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}assistant : {% generation %}{{ m['content'] }} <eos>"
    "{% endgeneration %} {% else %}{{ m['role'] }} : {{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tokenizer():
    """A word-level tokenizer over WORDS (whitespace-separated), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, d_model: int = 32, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(cfg)


def make_dataset(kind: str, n: int = 64, seed: int = 0):
    """``completions``: prompt-completion pairs; ``conversations``: chat messages."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, length = rng.randrange(0, 30), rng.randrange(2, 8)
        prompt = f"count from {start}"
        answer = " ".join(str(i) for i in range(start + 1, start + 1 + length))
        if kind == "completions":
            rows.append({"prompt": prompt, "completion": " " + answer})
        else:
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return Dataset.from_list(rows)


def make_trainer(
    model,
    tokenizer,
    data: str,
    max_steps: int,
    output_dir: str,
    lora: bool = False,
    batch_size: int = 8,
    lr: float = 3e-3,
    callbacks=None,
    **config,
):
    """An SFTTrainer on ``make_dataset(data)``; ``config``: more SFTConfig fields."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        logging_steps=max(1, max_steps // 4),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        max_length=32,
        dataset_num_proc=None,
        assistant_only_loss=data == "conversations",
        completion_only_loss=data == "completions" or None,
        seed=0,
        disable_tqdm=True,
        **config,
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, modules_to_save=["lm_head"]
        )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=make_dataset(data),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description="TRL SFTTrainer + cggr_hook on a tiny Llama.")
    p.add_argument("--data", choices=["completions", "conversations"], default="completions")
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--min-tokens-ratio", type=float, default=0.5)
    p.add_argument("--warmup-steps", type=int, default=10, help="curriculum length in optimizer steps")
    p.add_argument("--lora", action="store_true", help="LoRA adapters (and a trained copy of the head)")
    p.add_argument("--plain", action="store_true", help="no gating")
    a = p.parse_args(argv)

    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    if not a.plain:
        cggr_hook.enable(model, min_tokens_ratio=a.min_tokens_ratio, warmup_steps=a.warmup_steps)  # the one line
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(model, tokenizer, a.data, a.max_steps, out, lora=a.lora, callbacks=[CGGRCallback()])
        result = trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    for e in logs:
        extra = (
            f"  kept {e['cggr/token_ratio']:.2f} of {e['cggr/tokens_total']} tokens" if "cggr/token_ratio" in e else ""
        )
        print(
            f"step {e['step']:3d}  loss {e['loss']:.3f}  token accuracy {e.get('mean_token_accuracy', float('nan')):.2f}{extra}"
        )
    print(f"train loss {result.training_loss:.3f}; gated optimizer steps counted: {cggr_hook.scheduler.step_count}")
    cggr_hook.disable()
    return trainer


if __name__ == "__main__":
    main()
