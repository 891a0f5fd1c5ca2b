"""Run by tests/test_distributed.py under torchrun: gated DDP and FSDP2 training steps on gloo.

Every rank gates its own batch; the wrapper's averaged gradient must equal the mean over ranks of
the per-rank reference gated gradients, and every rank must count the same optimizer steps.
Exits non-zero (an AssertionError) on any mismatch.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cggr_hook  # noqa: E402

from common import TinyLM, masked_reference_loss, reference_topk_rows  # noqa: E402

V = 37


def local_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(100 * rank + step))


def reference_grads(model: nn.Module, idx: torch.Tensor, ratio: float) -> dict:
    model.zero_grad()
    X = model(idx)[:, :-1].reshape(-1, V)
    t = idx[:, 1:].reshape(-1)
    rows = reference_topk_rows(X.detach().cpu(), t.cpu(), ratio).to(X.device)
    masked_reference_loss(X, t, rows).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
        g /= dist.get_world_size()
    return grads


class RecordMatmuls(TorchDispatchMode):
    """The shapes of every matrix product run inside the block."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2], args[-1]
            self.shapes.append((*a.shape, b.shape[-1]))
        return func(*args, **(kwargs or {}))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run(wrapper: str, device: torch.device) -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = TinyLM().to(device)
    if wrapper == "fsdp_tied":  # the head's weight is the embedding's, as in most LMs
        model.lm_head.weight = model.emb.weight
    ref = copy.deepcopy(model)
    if wrapper == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    else:
        from torch.distributed.fsdp import fully_shard

        if wrapper == "fsdp":
            fully_shard(model.lm_head)  # its own group: its weight is freed after forward
        fully_shard(model)  # fsdp_tied: the tied weight in the root's group
        wrapped = model
    gate = cggr_hook.enable(wrapped, preset="seed", warmup_steps=0, dynamic_threshold=False, min_tokens_ratio=0.3)
    assert gate.head is model.lm_head
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.0)  # lr 0: the weights stay the reference's
    for step in range(2):
        idx = local_batch(rank, step).to(device)
        logits = wrapped(idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))
        # both wrappers take the selected-rows head backward: its matmuls run over K rows of the
        # head's, K = keep_count(0.3, head rows), the upper bound of k that top-k at a fixed ratio
        # knows on the host (FSDP2 gathers the resharded head weight again for it)
        assert type(loss.grad_fn).__name__ == "GatedHeadCrossEntropyBackward", type(loss.grad_fn).__name__
        with RecordMatmuls() as seen:
            loss.backward()
        k = cggr_hook.metrics()["tokens_selected"]
        K = cggr_hook.kernels.spec.keep_count(0.3, idx.numel())
        head_mms = [s for s in seen.shapes if V in s]
        assert k <= K < idx.numel() and head_mms and all(K in s for s in head_mms), (wrapper, k, K, head_mms)
        expected = reference_grads(ref, idx, 0.3)
        for name, p in model.named_parameters():
            got = full(p.grad)
            torch.testing.assert_close(
                got,
                expected[name.replace("module.", "")],
                rtol=1e-4,
                atol=1e-6,
                msg=f"{wrapper} rank {rank} step {step} {name}",
            )
        opt.step()
        opt.zero_grad()
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, cggr_hook.scheduler.step_count)
    assert counts == [2] * dist.get_world_size(), counts
    cggr_hook.disable()
    cggr_hook.scheduler.reset()
    print(f"rank {rank}: {wrapper} ok ({device})", flush=True)


if __name__ == "__main__":
    # NCCL between GPUs where there are some (one a rank), else gloo on the CPU
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    try:
        for w in sys.argv[1:] or ["ddp", "fsdp"]:
            run(w, dev)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    # skip interpreter teardown: gloo's background threads can abort it after a clean run
    os._exit(0)
