"""Gated training under torchrun: DistributedDataParallel or FSDP2, one added line.

    torchrun --nproc_per_node 2 examples/torchrun_train.py --wrapper ddp
    torchrun --nproc_per_node 2 examples/torchrun_train.py --wrapper fsdp --steps 30

Each rank trains a Llama-style model from transformers on its own random batches, first with
Hugging Face's plain ``labels=`` loss and then gated (``cggr_hook.enable(model)``, 25% of tokens),
and rank 0 prints the median step time and tokens/s of both (all ranks together) and the scheduler's
step count, which must equal the number of optimizer steps on every rank. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

try:
    import cggr_hook
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cggr_hook


def build(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.wrapper == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, model


def run(args, device, gated: bool) -> list[float]:
    model, wrapped = build(args, device)
    if gated:
        cggr_hook.enable(wrapped, min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    rank = dist.get_rank()
    g = torch.Generator(device="cpu").manual_seed(1000 + rank)
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if gated:
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, cggr_hook.scheduler.step_count)
        assert counts == [args.warmup + args.steps] * dist.get_world_size(), counts
        cggr_hook.disable()
        cggr_hook.scheduler.reset()
    del model, wrapped, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wrapper", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        results = {name: run(args, device, gated) for name, gated in (("plain", False), ("cggr25", True))}
        if dist.get_rank() == 0:
            world = dist.get_world_size()
            tokens = args.batch * args.seq * world
            card = torch.cuda.get_device_name(device) if cuda else "cpu"
            print(f"{args.wrapper}: {world} x {card}, {tokens} tokens a step, V = {args.vocab}")
            base = None
            for name, times in results.items():
                med = statistics.median(times)
                tps = tokens / med
                base = base or tps
                print(f"  {name:7s} {med * 1e3:8.1f} ms/step {tps / 1e3:8.1f}k tokens/s  x{tps / base:.3f}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
