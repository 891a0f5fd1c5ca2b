"""The LM head: finding it in a model, and tapping its output.

``find_head`` picks the module whose output is the logits. A forward hook on it (``gate.py``)
routes each training-mode output through ``HeadTap``, an identity autograd node that remembers the
call (``HeadCall``: hidden states, output, the gate that armed it), where ``trace.py`` finds it
again from a cross entropy's input.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


# --------------------------------------------------------------------------------------------------
# finding the head
# --------------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    m = model
    for _ in range(8):
        if isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            m = m.module
        elif hasattr(m, "_orig_mod") and isinstance(m._orig_mod, nn.Module):
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
        module._modules.get("original_module"), nn.Module
    )


def called_module(module: nn.Module) -> nn.Module:
    """The module whose output ``module``'s forward returns unchanged, as it would be called now:
    for PEFT's ``modules_to_save`` wrapper, the active adapter's copy (or the original module when
    adapters are disabled); for every other module, itself."""
    m: Any = module
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
                raise ValueError(
                    f"cggr_hook.enable: head={head!r} names no submodule of {type(model).__name__}; {_HOW_TO_NAME}"
                ) from e
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
        where = (
            f"; the nn.Linear of vocabulary width {vocab} ({shown}) sit inside stacks of layers "
            "(nn.ModuleList) and are layers' projections, not a head"
        )
    raise ValueError(
        f"cggr_hook.enable: found no LM head in {type(model).__name__} (no get_output_embeddings(), no .lm_head, "
        f"no nn.Linear of vocabulary width outside its layers{where}). "
        + _NO_HEAD_MODULE.format(emb=_embedding_name(model, vocab))
        + f". Otherwise {_HOW_TO_NAME}"
    )


# --------------------------------------------------------------------------------------------------
# tapping the head's output
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class HeadCall:
    """One training-mode forward of the head, as the tap remembers it."""

    gate_id: int | None  # ``Gate.id`` of the gate that armed the tap (the registry finds it by that)
    head: nn.Module  # the module whose output was tapped
    hidden: Tensor  # the head's input (..., D)
    output: Tensor  # the head's output (..., V), before the tap
    consumed: bool = False  # a cross entropy already gated this call: later ones get the plain loss
    # output == F.linear(hidden, weight, bias) is known (``not_plain_reason``): the gated backward
    # may multiply the selected rows only. Otherwise the gradient goes through the logits' graph.
    narrow: bool = True
    weight: Tensor | None = None  # the weight and bias the forward used (read at the call: a
    bias: Tensor | None = None  # weight a pre-hook computes, as old-style weight_norm does, is that one)
    fsdp_owner: Any = None  # the FSDPModule that gathers ``weight``: the gated backward gathers it again
    tapped: Any = None  # weak reference to the tap's result (the logits the model returns)
    # under FSDP2: the zero gradient the gated backward hands the tapped logits, only so that the
    # hooks FSDP2 put on a module's outputs run; the tap passes nothing on for it
    sentinel: Any = None


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
        if grad is ctx.call.sentinel:  # the gated loss's marker (FSDP2's output hooks have run): no gradient
            return None, None
        # other consumers of the logits (an auxiliary loss) take the ordinary path through the head
        return grad, None


def tap_output(call: HeadCall) -> Tensor:
    tapped = HeadTap.apply(call.output, call)
    call.tapped = weakref.ref(tapped)
    return tapped
