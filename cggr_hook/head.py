"""The LM head: finding it, tapping its output, and tracing a loss input back to it.

A forward hook on the head routes each training-mode output through ``HeadTap``, an identity
autograd node that remembers the call (hidden states, output, batch shape). When
``F.cross_entropy`` is later called, ``trace`` walks the input's autograd graph back through
row-preserving shape and dtype operations (the fp32 upcast, the shift ``logits[:, :-1]``, reshapes,
transposes) to that node, and replays those operations on a tensor of row indices: the result maps
every cross-entropy row to the head-output row it came from. Anything else on the way (a scale, a
soft-cap, a gather) means the input is not the head's logits, and the loss stays the plain one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# how many graph nodes may stand between the head's output and the loss input
MAX_TRACE_DEPTH = 24


# --------------------------------------------------------------------------------------------------
# finding the head
# --------------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    m = model
    for _ in range(8):
        if isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            m = m.module
        elif hasattr(m, "_orig_mod") and isinstance(getattr(m, "_orig_mod"), nn.Module):
            m = m._orig_mod  # torch.compile's OptimizedModule
        else:
            break
    return m


def _model_getter(model: nn.Module, name: str) -> Any:
    """``model.<name>()`` (Hugging Face's get_input/output_embeddings), or None where the model has
    no such method or its base class leaves it unimplemented."""
    getter = getattr(model, name, None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def _vocab_size(root: nn.Module) -> int | None:
    cfg = getattr(root, "config", None)
    for name in ("vocab_size", "n_vocab", "padded_vocab_size"):
        v = getattr(cfg, name, None) if cfg is not None else None
        if isinstance(v, int) and v > 0:
            return v
    emb = _model_getter(root, "get_input_embeddings")
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    for m in root.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    return None


_HOW_TO_NAME = (
    "pass head= the nn.Linear that maps hidden states to vocabulary logits, "
    "e.g. cggr_hook.enable(model, head=model.lm_head) or head='decoder.out_proj'"
)

_NO_HEAD_MODULE = (
    "If the logits are computed from a weight without a head module (h @ wte.weight.T, "
    "F.linear(h, wte.weight)), there is no module to hook: add an nn.Linear head that shares the weight "
    "(self.lm_head = nn.Linear(D, V, bias=False); self.lm_head.weight = self.{emb}.weight; "
    "logits = self.lm_head(h)), or compute the loss with cggr_hook.CGGRLoss on the logits"
)


def base_linear(module: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` a head-like module computes with, or None.

    The module itself when it is an ``nn.Linear`` (a subclass too: bitsandbytes' Linear8bitLt and
    Linear4bit, torchao's Float8Linear); the wrapped layer of a PEFT wrapper (``get_base_layer()``
    of a LoRA layer, ``original_module`` of ``modules_to_save``). These are the modules whose output
    can be the vocabulary logits; anything else (an embedding, a block) is not a head.
    """
    m: Any = module
    for _ in range(8):
        if isinstance(m, nn.Linear):
            return m
        nxt = None
        getter = getattr(type(m), "get_base_layer", None)
        if callable(getter):
            try:
                nxt = m.get_base_layer()
            except Exception:  # a wrapper in a state it cannot answer in: not a head we know
                nxt = None
        if not isinstance(nxt, nn.Module) or nxt is m:
            nxt = m._modules.get("original_module") if isinstance(m, nn.Module) else None
        if not isinstance(nxt, nn.Module) or nxt is m:
            return None
        m = nxt
    return None


def head_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a head-like module."""
    lin = base_linear(module)
    return (lin.in_features, lin.out_features) if lin is not None else (0, 0)


def _is_modules_to_save(module: nn.Module) -> bool:
    """PEFT's ``ModulesToSaveWrapper`` (``modules_to_save=[...]``): it calls a trainable copy of the
    wrapped module, or the original when adapters are off."""
    return isinstance(module._modules.get("modules_to_save"), nn.ModuleDict) and isinstance(
        module._modules.get("original_module"), nn.Module)


def called_module(module: nn.Module) -> nn.Module:
    """The module whose output ``module``'s forward returns unchanged, as it would be called now:
    for PEFT's ``modules_to_save`` wrapper, the active adapter's copy (or the original module when
    adapters are disabled); for every other module, itself."""
    m = module
    for _ in range(4):
        if not _is_modules_to_save(m):
            return m
        active = getattr(m, "active_adapters", None) or []
        copies = m._modules["modules_to_save"]
        if getattr(m, "disable_adapters", False) or not active or active[0] not in copies:
            m = m._modules["original_module"]
        else:
            m = copies[active[0]]
    return m


def not_plain_reason(module: nn.Module) -> str | None:
    """Why ``module``'s output may not be ``F.linear(input, module.weight, module.bias)``, or None
    when it is.

    The gated head backward computes dW = G^T h and dh = G W from the selected rows, which is the
    gradient only for that affine map. It is taken as known for ``nn.Linear`` and subclasses that
    keep its ``forward``, with a floating-point weight (and bias) held as an ordinary tensor. A
    subclass with its own forward (quantized layers, Float8Linear, a scaled head), a forward
    replaced on the instance, a parametrized weight (recomputed, maybe differently, on every
    read) or a weight of another tensor type is not.
    """
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear (a wrapper adds to or changes the output)"
    if type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} has its own forward"
    if "forward" in module.__dict__:
        return f"the forward of this {type(module).__name__} is replaced on the instance"
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "its weight is parametrized (torch.nn.utils.parametrize)"
    for name in ("weight", "bias"):
        t = getattr(module, name, None)
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor) or type(t) not in (nn.Parameter, Tensor):
            return f"its {name} is a {type(t).__name__}, not a plain tensor"
        if not t.is_floating_point():
            return f"its {name} is {t.dtype}, not floating point"
    return None


def module_path(root: nn.Module, module: nn.Module) -> str | None:
    """The dotted name of ``module`` inside ``root`` ('' for root itself), or None if it is not in it."""
    for name, m in root.named_modules(remove_duplicate=False):
        if m is module:
            return name
    return None


def _in_layer_stack(root: nn.Module, name: str) -> bool:
    """Whether the submodule ``name`` sits inside an ``nn.ModuleList`` (a stack of layers): a
    vocabulary-width Linear there is a layer's projection, not the LM head."""
    m = root
    for part in name.split(".")[:-1]:
        m = m._modules.get(part)
        if m is None:
            return False
        if isinstance(m, nn.ModuleList):
            return True
    return False


def _embedding_name(root: nn.Module, vocab: int | None) -> str:
    for name, m in root.named_modules():
        if isinstance(m, nn.Embedding) and (vocab is None or m.num_embeddings == vocab):
            return name
    return "wte"


def find_head(model: nn.Module, head: nn.Module | str | None = None) -> nn.Module:
    """The LM head of ``model`` (already unwrapped): the module whose output is the logits.

    In order: ``head=`` (a module of ``model`` or a dotted submodule name), ``get_output_embeddings()``,
    ``.lm_head``, the last layer of an ``nn.Sequential``, the one ``nn.Linear`` whose width is the
    vocabulary size (from ``config.vocab_size`` or the input embedding) outside the model's layer
    stacks. Every one must be head-like (``base_linear``): an ``nn.Linear`` or a PEFT wrapper of
    one (a LoRA layer on the head, ``modules_to_save``), which is the module the loss reads.
    Several candidates of vocabulary width, or none, raise and ask for ``head=``.
    """
    if head is not None:
        if isinstance(head, str):
            try:
                found = model.get_submodule(head)
            except AttributeError as e:
                raise ValueError(f"cggr_hook.enable: head={head!r} names no submodule of {type(model).__name__}; {_HOW_TO_NAME}") from e
        else:
            found = head
            if not isinstance(found, nn.Module) or module_path(model, found) is None:
                raise ValueError(
                    f"cggr_hook.enable: head= {type(found).__name__} is not a submodule of {type(model).__name__}: "
                    "a module the model does not call gates nothing. Pass the model's own output layer, "
                    "e.g. cggr_hook.enable(model, head=model.lm_head), or its dotted name, head='lm_head'"
                )
        if base_linear(found) is None:
            raise ValueError(
                f"cggr_hook.enable: head= must be an nn.Linear (got {type(found).__name__}); {_HOW_TO_NAME}"
            )
        return found
    out = _model_getter(model, "get_output_embeddings")
    if isinstance(out, nn.Module) and base_linear(out) is not None and module_path(model, out) is not None:
        return out
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, nn.Module) and base_linear(lm_head) is not None:
        return lm_head
    if isinstance(model, nn.Sequential) and len(model) and base_linear(model[-1]) is not None:
        return model[-1]
    vocab = _vocab_size(model)
    stacked: list[str] = []
    if vocab is not None:
        candidates: list[tuple[str, nn.Module]] = []
        inside: set[int] = set()  # the parts of a head-like wrapper (LoRA's lora_A / lora_B, base_layer)
        for name, m in model.named_modules():
            if id(m) in inside:
                continue
            lin = base_linear(m)
            if lin is None or lin.out_features != vocab:
                continue
            if m is not lin:
                inside.update(id(sub) for sub in m.modules())
            if _in_layer_stack(model, name):
                stacked.append(name)
            else:
                candidates.append((name, m))
        if len(candidates) == 1:
            return candidates[0][1]
        if len(candidates) > 1:
            names = ", ".join(repr(n) for n, _ in candidates)
            raise ValueError(
                f"cggr_hook.enable: {type(model).__name__} has no get_output_embeddings() or .lm_head, and "
                f"several modules of vocabulary width {vocab} could be its LM head ({names}); pass head= the one "
                f"whose output the loss reads, e.g. cggr_hook.enable(model, head={candidates[-1][0]!r})"
            )
    where = ""
    if stacked:
        shown = ", ".join(repr(n) for n in stacked[:3]) + (", ..." if len(stacked) > 3 else "")
        where = (f"; the nn.Linear of vocabulary width {vocab} ({shown}) sit inside stacks of layers "
                 "(nn.ModuleList) and are layers' projections, not a head")
    raise ValueError(
        f"cggr_hook.enable: found no LM head in {type(model).__name__} (no get_output_embeddings(), no .lm_head, "
        f"no nn.Linear of vocabulary width outside its layers{where}). "
        + _NO_HEAD_MODULE.format(emb=_embedding_name(model, vocab)) + f". Otherwise {_HOW_TO_NAME}"
    )


# --------------------------------------------------------------------------------------------------
# tapping the head's output
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class HeadCall:
    """One training-mode forward of the head, as the tap remembers it."""

    gate: Any  # the Gate that armed the tap
    head: nn.Module  # the module whose output was tapped
    hidden: Tensor  # the head's input (..., D)
    output: Tensor  # the head's output (..., V), before the tap
    consumed: bool = False  # a cross entropy already gated this call: later ones get the plain loss
    # output == F.linear(hidden, weight, bias) is known (``not_plain_reason``): the gated backward
    # may multiply the selected rows only. Otherwise the gradient goes through the logits' graph.
    narrow: bool = True
    weight: Tensor | None = None  # the weight and bias the forward used (read at the call: a
    bias: Tensor | None = None  # weight a pre-hook computes, as old-style weight_norm does, is that one)


class HeadTap(torch.autograd.Function):
    """Identity on the head's output; its graph node marks the logits of one head call.

    The result shares the output's memory but is not a view of it (an input returned as it is, or
    a ``view_as``, would be one): the model then returns logits that are a tensor of their own, as
    without the gate. On a view, an in-place op (a temperature, a mask) is an error for a custom
    Function's output, and FSDP2 warns that it would drop its pre-backward hook. Nothing else holds
    the untapped output for backward, so the alias is safe: an in-place op on the logits takes the
    ordinary path through this node, and the loss on such logits is the plain one.
    """

    @staticmethod
    def forward(ctx, output: Tensor, call: HeadCall) -> Tensor:
        ctx.call = call
        return output.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        # other consumers of the logits (an auxiliary loss) take the ordinary path through the head
        return grad, None


def tap_output(call: HeadCall) -> Tensor:
    return HeadTap.apply(call.output, call)


# --------------------------------------------------------------------------------------------------
# tracing a loss input back to a tap
# --------------------------------------------------------------------------------------------------
_SAME_ROWS = {"ToCopyBackward0", "CloneBackward0", "AliasBackward0"}
_RESHAPES = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "_ReshapeAliasBackward0"}


def _signed(v: int) -> int:
    # saved int64 arguments come back as unsigned 64-bit numbers
    return v - (1 << 64) if v >= (1 << 63) else v


@dataclass
class Trace:
    call: HeadCall
    rows: Tensor | None  # (N_ce,) int64 (None once the call is consumed): the head-output row of every cross-entropy row, in the loss's order
    exact: bool  # every dtype change on the way is exact (an upcast), so head rows hold the same values


# a dtype change is exact when it widens: half/bfloat16 -> float32 -> float64
_FLOAT_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _exact_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    return src == dst or _FLOAT_RANK.get(dst, 0) > _FLOAT_RANK.get(src, 9)


def trace(x: Tensor, class_dim: int) -> Trace | None:
    """Map the cross-entropy input ``x`` (class dim ``class_dim``) back to a tapped head call."""
    node = x.grad_fn
    if node is not None and type(node).__name__ == "CompiledFunctionBackward":
        return _trace_compiled(x, class_dim, node)
    ops = []
    for _ in range(MAX_TRACE_DEPTH):
        if node is None:
            return None
        if isinstance(node, HeadTap._backward_cls):
            break
        name = type(node).__name__
        if not (name in _SAME_ROWS or name in _RESHAPES or name in (
                "SliceBackward0", "SelectBackward0", "TransposeBackward0", "TBackward0",
                "PermuteBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
                "SqueezeBackward2")):
            return None
        nxt = node.next_functions
        if len(nxt) != 1 and name != "SliceBackward0":
            return None
        ops.append(node)
        node = nxt[0][0]
    else:
        return None
    call: HeadCall = node.call
    if call.consumed:
        return Trace(call, None, False)
    head_out = call.output
    V = head_out.shape[-1]

    # shapes after each op, from the loss input backwards
    shapes = [tuple(x.shape)]
    for op in ops:
        out = shapes[-1]
        name = type(op).__name__
        if name in _SAME_ROWS:
            inp = out
        elif name in ("TransposeBackward0", "TBackward0"):
            d0, d1 = (0, 1) if name == "TBackward0" else (_signed(op._saved_dim0), _signed(op._saved_dim1))
            inp = list(out)
            d0, d1 = d0 % len(out), d1 % len(out)
            inp[d0], inp[d1] = inp[d1], inp[d0]
            inp = tuple(inp)
        elif name == "PermuteBackward0":
            dims = [_signed(d) % len(out) for d in op._saved_dims]
            inp = [0] * len(out)
            for i, d in enumerate(dims):
                inp[d] = out[i]
            inp = tuple(inp)
        elif name == "UnsqueezeBackward0":
            d = _signed(op._saved_dim) % len(out)
            inp = out[:d] + out[d + 1:]
        else:
            inp = tuple(op._saved_self_sym_sizes)
        shapes.append(tuple(int(s) for s in inp))
    if shapes[-1] != tuple(head_out.shape):
        return None

    # replay on row indices, keeping the vocabulary dim as a size-1 dim
    lead = head_out.shape[:-1]
    R = torch.arange(head_out.numel() // max(V, 1), device=head_out.device).view(*lead, 1)
    vdim = R.dim() - 1
    for i in range(len(ops) - 1, -1, -1):
        op, out_shape = ops[i], shapes[i]
        name = type(op).__name__
        if name in _SAME_ROWS:
            continue
        if name in _RESHAPES:
            if vdim != R.dim() - 1 or out_shape[-1] != V:
                return None  # a reshape that mixes the vocabulary with other dims
            R = R.reshape(*out_shape[:-1], 1)
            vdim = R.dim() - 1
        elif name == "SliceBackward0":
            d = _signed(op._saved_dim) % R.dim()
            start, end, step = _signed(op._saved_start), _signed(op._saved_end), _signed(op._saved_step)
            if d == vdim:
                if range(V)[start:end:step] != range(V):
                    return None  # part of the vocabulary only
                continue
            index = [slice(None)] * R.dim()
            index[d] = slice(start, end, step)
            R = R[tuple(index)]
        elif name == "SelectBackward0":
            d = _signed(op._saved_dim) % R.dim()
            if d == vdim:
                return None
            R = R.select(d, _signed(op._saved_index))
            vdim -= 1 if d < vdim else 0
        elif name in ("TransposeBackward0", "TBackward0"):
            d0, d1 = (0, 1) if name == "TBackward0" else (_signed(op._saved_dim0) % R.dim(), _signed(op._saved_dim1) % R.dim())
            R = R.transpose(d0, d1)
            vdim = d1 if vdim == d0 else d0 if vdim == d1 else vdim
        elif name == "PermuteBackward0":
            dims = [_signed(d) % R.dim() for d in op._saved_dims]
            R = R.permute(dims)
            vdim = dims.index(vdim)
        elif name == "UnsqueezeBackward0":
            d = _signed(op._saved_dim) % (R.dim() + 1)
            R = R.unsqueeze(d)
            vdim += 1 if d <= vdim else 0
        elif name.startswith("SqueezeBackward"):
            in_shape = shapes[i + 1]
            if name == "SqueezeBackward0":
                asked = range(len(in_shape))
            else:
                saved = op._saved_dim
                asked = [_signed(d) % len(in_shape) for d in (saved if isinstance(saved, tuple) else (saved,))]
            removed = sorted(d for d in asked if in_shape[d] == 1)
            if vdim in removed:
                return None
            if removed:
                R = R.squeeze(tuple(removed))
            vdim -= sum(1 for d in removed if d < vdim)
        if tuple(s for j, s in enumerate(R.shape) if j != vdim) != tuple(
                s for j, s in enumerate(out_shape) if j != vdim):
            return None
    if vdim != class_dim:
        return None
    rows = R.movedim(vdim, -1).reshape(-1)
    n_casts = sum(1 for op in ops if type(op).__name__ == "ToCopyBackward0")
    exact = n_casts == 0 or (n_casts == 1 and _exact_cast(head_out.dtype, x.dtype))
    return Trace(call, rows, exact)


def _trace_compiled(x: Tensor, class_dim: int, node: Any) -> Trace | None:
    """The loss input is the output of a torch.compile'd region fed by a tap: the operations in
    between are compiled away, so the row map is inferred. Candidates are the ways a causal-LM
    loss takes the head's rows (all of them, or each sequence without its last / first position).
    Three vocabulary columns pick the candidate; it is taken only if it is the only one that fits
    there and the whole input then equals those head rows exactly (checked in chunks, so a
    compiled region that changes any logit keeps the plain loss). Two host reads, on this path
    only."""
    taps = [n for n, _ in node.next_functions if isinstance(n, HeadTap._backward_cls)]
    if len(taps) != 1 or taps[0].call.consumed:
        return None
    call: HeadCall = taps[0].call
    out = call.output
    V = out.shape[-1]
    if x.dim() < 1 or x.shape[class_dim] != V or x.device != out.device or not _exact_cast(out.dtype, x.dtype):
        return None
    X = x.detach().movedim(class_dim, -1).reshape(-1, V)
    B, T = (out.shape[0], out.shape[1]) if out.dim() == 3 else (1, out.numel() // max(V, 1))
    grid = torch.arange(B * T, device=out.device).view(B, T)
    candidates = [grid.reshape(-1), grid[:, :-1].reshape(-1), grid[:, 1:].reshape(-1)]
    candidates = [c for c in candidates if c.numel() == X.shape[0]]
    if not candidates:
        return None
    H = out.detach().reshape(-1, V)
    cols = torch.tensor(sorted({0, V // 2, V - 1}), device=out.device)
    probe = X[:, cols]
    matches = torch.stack([(H[c][:, cols].to(X.dtype) == probe).all() for c in candidates]).tolist()
    if sum(matches) != 1:
        return None
    rows = candidates[matches.index(True)]
    step = max(1, (1 << 24) // max(V, 1))  # rows per chunk: at most 16M elements of temporaries
    same = torch.ones((), dtype=torch.bool, device=out.device)
    for a in range(0, rows.numel(), step):
        same &= (H[rows[a:a + step]].to(X.dtype) == X[a:a + step]).all()
    if not bool(same):
        return None
    return Trace(call, rows, True)


def tap_behind(x: Tensor, max_nodes: int = 64) -> str | None:
    """If an unconsumed tap lies a few graph nodes behind ``x`` through other operations (a
    soft-cap, a scale), the names of those operations; else None. Used to warn that such a loss
    is not gated."""
    start = x.grad_fn
    if start is None:
        return None
    seen = {id(start)}
    frontier = [(start, ())]
    visited = 0
    while frontier and visited < max_nodes:
        node, path = frontier.pop(0)
        visited += 1
        if isinstance(node, HeadTap._backward_cls):
            return None if node.call.consumed else " <- ".join(path) or "(none)"
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                frontier.append((nxt, path + (type(node).__name__,)))
    return None
