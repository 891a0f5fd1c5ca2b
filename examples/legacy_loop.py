"""An existing PyTorch training script, gated by adding one line.

A small GPT in the nanoGPT mould (token + position embeddings, pre-norm blocks,
``self.lm_head = nn.Linear(d, vocab, bias=False)``, ``forward(idx, targets=None)`` computing
``F.cross_entropy(logits.view(-1, V), targets.view(-1))``), a plain AdamW loop and an evaluation in
``model.eval()``. Nothing in the model or the loop knows about CGGR: the single line marked
``# CGGR`` below gates the training loss (with the package's defaults every token counts, through
the gate's kernels; with ``--min-tokens-ratio 0.5`` half of each batch's tokens are drawn by
importance sampling and weighted so the loss stays an unbiased estimate of the plain one), while
the evaluation, in eval mode, still reports the plain loss over every token.

    python examples/legacy_loop.py                  # stdlib text, gated
    python examples/legacy_loop.py --plain          # the same run without the line, to compare
    python examples/legacy_loop.py --shift          # the loss computed in the loop, shifted by hand
    python examples/legacy_loop.py --data random    # random tokens, no tokenizer
    python examples/legacy_loop.py --min-tokens-ratio 0.5   # half of the tokens, by importance sampling
    python examples/legacy_loop.py --min-tokens-ratio 0.25 --warmup-steps 50 --steps 200   # a curriculum down to 25%

``--shift`` shows the other common shape of a legacy loop: the model returns logits only and the
script shifts them itself, ``F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))``
(a non-contiguous slice of the head's logits): gating handles that too.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import cggr_hook
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cggr_hook


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, d: int = 64, n_layer: int = 2, n_head: int = 4):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d)
        self.pos_emb = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def load_data(args):
    """(train stream, held-out stream, vocabulary size): 1-D int64 token tensors."""
    if args.data == "random":
        g = torch.Generator().manual_seed(1234)
        return (
            torch.randint(0, args.vocab_size, (200_000,), generator=g),
            torch.randint(0, args.vocab_size, (20_000,), generator=g),
            args.vocab_size,
        )
    import stdlib_text

    corpus = stdlib_text.load_corpus(vocab_size=args.vocab_size, max_bytes=args.max_bytes, cache_dir=args.cache_dir)
    return corpus.train_tokens.long(), corpus.heldout_tokens.long(), corpus.vocab_size


def get_batch(data, batch_size, block_size, gen):
    """nanoGPT's sampler: random windows of block_size + 1 tokens."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)
    return torch.stack([data[i : i + block_size + 1] for i in ix.tolist()])


def loss_of(model, seq, shift: bool):
    if shift:
        # the loop shifts the logits itself: a non-contiguous slice of the LM head's output
        logits, _ = model(seq)
        V = logits.size(-1)
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), seq[:, 1:].reshape(-1))
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()  # nanoGPT's (x, y) pair
    _, loss = model(x, y)
    return loss


@torch.no_grad()
def evaluate(model, data, args, shift: bool):
    model.eval()  # eval mode: the gate steps aside and this is the plain loss over every token
    gen = torch.Generator().manual_seed(4321)
    losses = [
        loss_of(model, get_batch(data, args.batch_size, args.block_size, gen).to(args.device), shift).item()
        for _ in range(args.eval_batches)
    ]
    model.train()
    return sum(losses) / len(losses)


def main(argv=None):
    p = argparse.ArgumentParser(description="A legacy nanoGPT-style loop with cggr_hook gating in one line.")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data", choices=["stdlib", "random"], default="stdlib")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--max-bytes", type=int, default=1_000_000, help="stdlib text to read (bytes)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--shift", action="store_true", help="compute the shifted loss in the loop, not in the model")
    p.add_argument("--plain", action="store_true", help="leave gating off (the script as it was)")
    p.add_argument(
        "--min-tokens-ratio",
        type=float,
        default=None,
        help="fraction of tokens the gate keeps (default: the package's, every token)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="curriculum length for cggr_hook, from every token down to --min-tokens-ratio",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train_data, val_data, vocab = load_data(args)
    model = GPT(vocab, args.block_size + 1, args.d_model, args.layers).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)

    if not args.plain:
        cggr_hook.enable(model)  # CGGR: the one added line; the rest of the script is unchanged
        options = {
            k: v
            for k, v in (("min_tokens_ratio", args.min_tokens_ratio), ("warmup_steps", args.warmup_steps))
            if v is not None
        }
        if options:  # optional: enable() again updates the gate's options
            cggr_hook.enable(model, **options)

    gen = torch.Generator().manual_seed(args.seed)
    print(
        f"{'plain' if args.plain else 'gated'} run: {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters, "
        f"vocab {vocab}, {args.steps} steps of {args.batch_size} x {args.block_size} tokens on {args.device}"
        + (", loss shifted in the loop" if args.shift else "")
    )
    print(f"step {0:4d}  val {evaluate(model, val_data, args, args.shift):.4f}")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        seq = get_batch(train_data, args.batch_size, args.block_size, gen).to(args.device)
        loss = loss_of(model, seq, args.shift)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            line = f"step {step:4d}  train {loss.item():.4f}"
            if not args.plain:
                m = cggr_hook.metrics()
                line += f" (on {m['tokens_selected']}/{m['tokens_total']} tokens, ratio {m['token_ratio']:.2f})"
            line += f"  val {evaluate(model, val_data, args, args.shift):.4f}"
            print(line, flush=True)
    elapsed = time.perf_counter() - t0

    if not args.plain:
        # the plain loss of the last training batch, in training mode, for comparison
        with cggr_hook.paused():
            plain = loss_of(model, seq, args.shift).item()
        print(f"last batch: gated loss {loss.item():.4f}, plain loss (cggr_hook.paused()) {plain:.4f}")
        print(f"scheduler step count {cggr_hook.scheduler.step_count}")
        cggr_hook.disable(model)
    final = evaluate(model, val_data, args, args.shift)
    assert math.isfinite(final), final
    print(f"done in {elapsed:.1f}s: final val {final:.4f}")


if __name__ == "__main__":
    main()
