"""``Gate``: one model's gate, the handle ``enable`` returns.

A gate owns what it puts on its model and takes all of it off again in ``detach``: the forward hook
on the LM head (which taps the head's output, ``head.HeadTap``), the forward pre-hook on the model
(which follows a head replaced after enable and runs TRL's fused head unfused), Hugging Face's loss
function without its fp32 copy (``hf_loss.py``), and the counters the watchdog reads. Which gates
exist, and what they share (the patch of ``F.cross_entropy``, the scheduler, the figures), is the
registry's (``registry.py``).
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from . import auto as auto_mod
from . import figures, hf_loss, trl_fused
from . import head as head_mod
from . import trace as trace_mod
from .config import GateConfig
from .schedule import optimizer_holds

if TYPE_CHECKING:
    from .registry import Registry

# optimizer steps after which a gate that has not yet been part of a counted step warns (the watchdog)
WATCHDOG_STEPS = 3


class _InertHook:
    """What a gate's hook becomes in a pickled or deep-copied model: nothing. The copy is not gated
    (a gate belongs to the model it was enabled on), and its outputs are the model's own."""

    def __call__(self, *args: Any) -> None:
        return None


class _GateHook:
    """A hook a gate registers on the model or its head (the head's forward hook, the model's
    forward pre-hook and, for TRL, its forward hook). It lives in the module's hook tables, which
    ``pickle``, ``torch.save`` and ``copy.deepcopy`` of the model take along: there it turns into
    an ``_InertHook``, since the gate behind it (the registry, the patch) is not the model's to
    save."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __reduce__(self) -> tuple:
        return (_InertHook, ())


class Gate:
    """The handle ``enable`` returns: one model's gate. ``remove()`` disables it."""

    def __init__(
        self, registry: Registry, gate_id: int, model: nn.Module, root: nn.Module, head: nn.Module, config: GateConfig
    ) -> None:
        self._registry = registry  # the owner: remove() asks it, the hooks read its pause flag
        self.id = gate_id  # what the head's tap holds (HeadCall.gate_id): the registry finds the gate by it
        self._model = weakref.ref(model)
        self.root = weakref.ref(root)  # the model unwrapped (DDP, torch.compile); None once collected
        self.head = head  # held weakly (the property below): the head may be the model itself
        # where the head sits in the model: a wrapper that replaces it later (PEFT's
        # get_peft_model with the head in modules_to_save, or LoRA on the head) is found there
        self.head_path = head_mod.module_path(root, head) or ""
        self.config = config
        # names the gate's running confidence average in the scheduler: stable across re-enabling
        # and across processes, so gated() blocks and resumed runs keep the same average
        d_in, d_out = head_mod.head_features(head)
        self.key = f"{type(root).__name__}:{d_in}x{d_out}"
        # the model's parameters: an optimizer that holds one of them steps the gated model
        self.param_ids = frozenset(id(p) for p in root.parameters())
        # FSDP2 (fully_shard) gathers the head's weight for its forward and may free it after; the
        # selected-rows head backward has it gathered again (its FSDPModule's unshard()) and hands
        # the weight's gradient to FSDP2's reduce-scatter as the head's own backward would
        self.fsdp_owner = _fsdp_owner(root, head)
        # the gradient takes the ordinary path through the logits and the head, not the selected-rows
        # head backward: a weight sharded otherwise (a DTensor not under FSDP2: tensor parallelism)
        # is gathered by its wrapper's own autograd ops. Heads whose output is not known to be the
        # plain affine map take that path call by call (HeadCall.narrow).
        self.through_logits = _is_sharded(root, head) and self.fsdp_owner is None
        # what the watchdog reads: head forwards, tapped (training, grad) forwards, gated losses
        self._head_calls = self._taps = self._gated = self._gated_since_step = 0
        self._steps_unproven = 0
        self._proven = False  # a counted optimizer step followed a gated loss of this model
        self._taps_since_step = 0  # tapped forwards since this model's last optimizer step
        self._local = threading.local()  # .unfused: the TRL forward this thread runs unfused
        # opaque to torch.compile: a compiled model breaks its graph at the head's hook, so the tap
        # is a real autograd node at run time rather than traced away. Prepended, so that no other
        # hook on the head changes the output before the tap sees it. The hooks are _GateHooks, which
        # a pickled or deep-copied model carries as inert stand-ins.
        self._head_hook = _GateHook(torch.compiler.disable(self._on_head_forward))
        self._handle = head.register_forward_hook(self._head_hook, prepend=True)
        # on the model: follows a head replaced after enable, and turns TRL's fused LM head off
        self._root_handle = root.register_forward_pre_hook(
            _GateHook(torch.compiler.disable(self._on_root_forward)), with_kwargs=True
        )
        self._fused_handle = None  # the forward hook that rebuilds TRL's fused output (made on first use)
        self._trl_checks = [trl_fused.UNIFORM_CHECKS]  # backward passes that check TRL's loss weighs tokens equally
        self._undo_loss = hf_loss.install(root, torch.compiler.disable(self._would_gate))  # pyright: ignore[reportArgumentType]
        self.enabled = True
        # a model dropped without disable() takes its gate with it, and the last one the patch and
        # the optimizer hook (sweeps and notebooks re-create models all the time); nothing here
        # holds the model itself strongly, so it can be collected
        self._finalizer = weakref.finalize(root, registry.on_model_collected, self)
        self._finalizer.atexit = False

    @property
    def head(self) -> nn.Module | None:
        """The gated head (None once it is garbage-collected). Held weakly: the registry's entry
        for a model must not keep the model alive, and the head can be the model itself."""
        return self._head()

    @head.setter
    def head(self, module: nn.Module) -> None:
        self._head = weakref.ref(module)

    @property
    def model(self) -> nn.Module | None:
        return self._model()

    # the forward hook on the LM head
    def _on_head_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        # module is not self.head in a shallow copy of the head, which shares its hook table (deep
        # copies and pickles carry an _InertHook instead): a copy is not gated by a gate it was not
        # enabled on
        if module is not self.head:
            return None
        self._head_calls += 1
        if not (self.enabled and module.training and torch.is_grad_enabled() and not self._registry.paused_here()):
            return None
        if not isinstance(output, Tensor) or not output.requires_grad or not args or not isinstance(args[0], Tensor):
            return None
        self._taps += 1  # a training forward (the watchdog's diagnosis)
        if self.runs_plain():
            # the timed choice (auto, plain_when_faster) runs this step as the plain loss: the head's
            # output goes on as it is, untapped (no node in the graph), so the step costs what it
            # costs without the gate. Its autograd node carries a mark (node metadata: nothing here
            # holds the graph) by which a cross entropy on it books the step (route.py): a forward
            # whose logits no F.cross_entropy reads (a custom loss) books nothing, so the watchdog
            # still sees that nothing would be gated
            if output.grad_fn is not None:
                trace_mod.mark_plain(output.grad_fn, self.id)
            return None
        self._taps_since_step += 1
        called = head_mod.called_module(module)
        # the narrow backward only where output == F.linear(hidden, weight, bias) is known; a global
        # forward hook runs before ours and may have changed the output
        narrow = (
            not self.through_logits
            and head_mod.not_plain_reason(called) is None
            and not torch.nn.modules.module._global_forward_hooks
            and not _is_dtensor(called.weight)  # FSDP2 hands the forward a gathered, plain weight
        )
        call = head_mod.HeadCall(
            gate_id=self.id,
            head=called,
            hidden=args[0],
            output=output,
            narrow=narrow,
            weight=called.weight if narrow else None,  # pyright: ignore[reportArgumentType]
            bias=called.bias if narrow else None,  # pyright: ignore[reportArgumentType]
            fsdp_owner=self.fsdp_owner if narrow else None,
        )
        return head_mod.tap_output(call)

    # the forward pre-hook on the model
    def _on_root_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        # a deep copy of the model carries this hook along: it acts on the model it was put on only
        if not (
            self.enabled
            and module is self.root()
            and module.training
            and torch.is_grad_enabled()
            and not self._registry.paused_here()
        ):
            return None
        self.follow_head(module)
        if kwargs.get("fused_lm_head") is True:
            if self.runs_plain():
                # the timed choice (auto, plain_when_faster) runs this step as the plain loss: TRL's own fused head, as
                # without the gate (its head is not called, so the step is booked here)
                labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
                if isinstance(shift_labels, Tensor):
                    self.run_plain(shift_labels.device, rows=shift_labels.numel())
                elif isinstance(labels, Tensor):
                    # the rows of the loss a gated step would take (trl_fused.fused_output shifts
                    # the labels as TRL does: one position fewer a sequence)
                    self.run_plain(labels.device, rows=labels[..., 1:].numel())
                return None
            return self._unfuse(module, args, kwargs)
        return None

    def follow_head(self, root: nn.Module) -> None:
        """Move the head's hook to the module now at the head's place, when a wrapper replaced
        the head after enable (``get_peft_model`` with ``modules_to_save=["lm_head"]``, or LoRA
        on the head): the module the loss reads is the one gated."""
        try:
            slot = root.get_submodule(self.head_path) if self.head_path else root
        except AttributeError:
            slot = None
        if slot is self.head:
            return
        if slot is None or head_mod.base_linear(slot) is None:
            self._registry.warn_once(
                f"moved:{id(self)}",
                (
                    f"cggr_hook: the LM head of {type(root).__name__} at {self.head_path!r} was replaced after enable by "
                    f"{type(slot).__name__}, which is not a head cggr_hook can gate: the loss is the plain one. "
                    "Call cggr_hook.disable(model), then cggr_hook.enable(model, head=...) on the model as it is now"
                ),
            )
            return
        with self._registry.lock:
            self._handle.remove()
            self.head = slot
            self._handle = slot.register_forward_hook(self._head_hook, prepend=True)
            self.fsdp_owner = _fsdp_owner(root, slot)
            self.through_logits = _is_sharded(root, slot) and self.fsdp_owner is None

    def _unfuse(self, root: nn.Module, args: tuple, kwargs: dict) -> Any:
        """TRL's fused LM head (``model(..., labels=..., fused_lm_head=True)``) computes
        log-probabilities from the head's weight without calling the head or ``F.cross_entropy``:
        while this gate is active, the forward runs unfused, without labels, and ``_on_root_output``
        builds TRL's output from the gated loss of the head's logits."""
        if not trl_fused.available():
            self._registry.warn_once(
                "trl", "cggr_hook: a fused_lm_head=True forward without trl's FusedCausalLMOutput: not gated"
            )
            return None
        labels, shift = kwargs.get("labels"), kwargs.get("shift_labels")
        if labels is None and shift is None:
            return None
        if self._fused_handle is None:
            self._fused_handle = root.register_forward_hook(
                _GateHook(torch.compiler.disable(self._on_root_output)), with_kwargs=True
            )
        kwargs = dict(kwargs)
        stash = tuple(kwargs.pop(k, None) for k in ("labels", "shift_labels", "num_items_in_batch"))
        kwargs["fused_lm_head"] = False
        self._local.unfused = (kwargs, stash)
        return args, kwargs

    def _on_root_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        pending = getattr(self._local, "unfused", None)
        if pending is None or pending[0] is not kwargs:
            return None
        self._local.unfused = None
        return trl_fused.fused_output(output, *pending[1], sum_loss=self._sum_loss, checks_left=self._trl_checks)

    def _sum_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, bool]:
        """``F.cross_entropy(x, y, reduction='sum')`` (x (N, V) logits, y (N,)) and whether it was
        gated; a loss this gate cannot gate is the plain one, with the route's warnings."""
        before = self._gated
        loss = torch.nn.functional.cross_entropy(x, y, reduction="sum")
        return loss, self._gated > before

    # what the route reports
    def on_gated_loss(self) -> None:
        """A cross entropy on this gate's logits was gated."""
        self._gated += 1
        self._gated_since_step += 1

    def on_plain_choice(self) -> None:
        """The timed choice (``GateConfig.auto_candidates``) ran this call as the plain loss: the
        watchdog counts it as gated."""
        self._gated_since_step += 1

    def run_plain(self, device: torch.device, valid: Any = None, rows: int = 0) -> None:
        """Book a call that the timed choice (``GateConfig.auto_candidates``) runs as the plain loss:
        its optimizer step counts (and times the plain candidate), ``metrics()`` says so (``valid``:
        a ``pipeline.HostRead`` of its valid targets' count, where known; ``rows``: its rows of
        logits, for the choice's check of the batch size), and the watchdog sees the gate's own
        choice."""
        scheduler = self._registry.scheduler
        state = scheduler.plain_call(self.key, cast(tuple, self.config.auto_candidates), device, self.param_ids, rows)
        self._registry.record(self, figures.plain_figures(scheduler.step_count + 1, self.config.scoring, state, valid))
        self.on_plain_choice()

    def runs_plain(self) -> bool:
        """Whether the timed choice (``min_tokens_ratio='auto'``, or the default's ``plain_when_faster``)
        runs the current step as the plain loss."""
        cands = self.config.auto_candidates
        return cands is not None and self._registry.scheduler.auto_state(self.key, cands).candidate() == auto_mod.PLAIN

    def _would_gate(self, logits: Tensor) -> bool:
        """Whether a cross entropy on these logits would be gated now (Hugging Face loss fast path)."""
        node = getattr(logits, "grad_fn", None)
        return (
            self.enabled
            and torch.is_grad_enabled()
            and not self._registry.paused_here()
            and logits.device.type != "meta"
            and self._registry.holds(self)
            and isinstance(node, head_mod.HeadTap._backward_cls)
            and not node.call.consumed  # pyright: ignore[reportOptionalMemberAccess]
            and node.call.gate_id == self.id  # pyright: ignore[reportOptionalMemberAccess]
            and not self.runs_plain()
        )

    # the optimizer steps, through the scheduler's step hook (registry.observe_step)
    def refresh_params(self) -> bool:
        """Take the model's parameters again (those made after enable: LoRA's, when
        ``get_peft_model`` wrapped the model after enable); returns whether they changed."""
        root = self.root()
        if root is None:
            return False
        ids = frozenset(id(p) for p in root.parameters())
        changed = ids != self.param_ids
        self.param_ids = ids
        return changed

    @property
    def gated_since_step(self) -> int:
        """Gated losses of this model since the last counted optimizer step."""
        return self._gated_since_step

    def step_counted(self) -> None:
        self._gated_since_step = 0

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Every optimizer step of this model's parameters: a timed choice (``'auto'``, the
        default's) whose step tapped the head but had no gated loss (a soft-capped or rescaled
        loss input, probability targets, a lossy cast: what the gate leaves to the plain loss)
        cannot gate there, so it runs the plain loss until its next window instead of tapping
        every forward for a probe that no counted step would advance."""
        if not optimizer_holds(optimizer, self.param_ids):
            return
        cands = self.config.auto_candidates
        if cands is not None and self._taps_since_step and not self._gated_since_step:
            self._registry.scheduler.auto_state(self.key, cands).no_gated_loss()
        self._taps_since_step = 0

    def watch(self, optimizer: torch.optim.Optimizer, counted: bool) -> None:
        """The watchdog: warn once if WATCHDOG_STEPS optimizer steps pass before any counted step
        follows a gated loss of this model, naming what was seen and the fix."""
        if self._proven or not self.enabled:
            return
        if counted and self._gated_since_step and optimizer_holds(optimizer, self.param_ids):
            self._proven = True
            return
        if self._registry.paused_here():
            return
        if not self._gated_since_step and not optimizer_holds(optimizer, self.param_ids):
            return  # another model's optimizer (a critic, a discriminator) with no gated loss waiting
        self._steps_unproven += 1
        if self._steps_unproven >= WATCHDOG_STEPS:
            self._proven = True  # once
            self._registry.warn_once(f"watchdog:{id(self)}", self._diagnosis())

    def _diagnosis(self) -> str:
        root = self.root()
        name = type(root).__name__ if root is not None else "the model"
        head = f"{self.head_path or '(the model itself)'} ({type(self.head).__name__})"
        n = self._steps_unproven
        if self._gated:
            what = (
                f"{self._gated} gated loss(es) were computed, but no optimizer that stepped holds a parameter "
                f"of {name}: cggr_hook.enable was given a module the optimizer does not see (a copy, or the model "
                "before a wrapper replaced its parameters), so the curriculum never advances. Fix: call "
                "cggr_hook.enable on the model whose parameters the optimizer updates"
            )
        elif self._taps:
            what = (
                f"its LM head {head} ran in training forwards, yet no loss was computed with "
                "torch.nn.functional.cross_entropy on its logits: a custom or fused loss (a fused linear cross "
                "entropy kernel, a loss written by hand) or a loss on changed logits (a soft-cap, a scale) takes "
                "the plain path. Fix: compute the loss with F.cross_entropy or nn.CrossEntropyLoss on the head's "
                "logits, or use cggr_hook.CGGRLoss on them"
            )
        elif self._head_calls:
            what = (
                f"its LM head {head} ran only in eval mode or without grad. cggr_hook gates training-mode "
                "forwards with grad enabled: call model.train() before training"
            )
        else:
            what = (
                f"its LM head {head} was never called: a fused loss path computes the logits from the head's "
                "weight without calling the module, the head was replaced after enable by something that is "
                "not a head, or it is not the module that produces the logits. Fix: call cggr_hook.enable on "
                "the model as it is trained (after wrapping it), pass head= the module whose output is the "
                "logits, or compute the loss with cggr_hook.CGGRLoss"
            )
        return (
            f"cggr_hook: {n} optimizer steps with a gate enabled on {name} and none followed a gated loss: {what}. "
            "Until then every loss is the plain one (this warning is given once)"
        )

    # the lifecycle
    def remove(self) -> None:
        """Disable this gate (``cggr_hook.disable(model)``)."""
        self._registry.remove(self)

    def detach(self) -> None:
        """Take off everything this gate put on its model (the registry calls it; ``remove()`` is
        the user's way)."""
        self.enabled = False
        self._finalizer.detach()
        self._handle.remove()
        self._root_handle.remove()
        if self._fused_handle is not None:
            self._fused_handle.remove()
            self._fused_handle = None
        root = self.root()
        if root is not None:
            # copies of the head (or the model) made inside the model after enable carry the hooks
            # along, as the hook itself (a shallow copy) or as its inert stand-in (a deep copy: PEFT's
            # modules_to_save): take them off too, so nothing of the gate is left
            for m in root.modules():
                _remove_hooks(m, lambda fn: fn is self._head_hook or isinstance(fn, _InertHook))
        if self._undo_loss is not None:
            self._undo_loss()
            self._undo_loss = None

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: Any) -> None:
        # leaving on an exception: an earlier call's pending target check must not replace it (it
        # stays pending for the next gated call, metrics() or disable())
        self._registry.remove(self, check_targets=exc[0] is None)

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "removed"
        if self.head is None:
            return f"Gate(collected, {state}, {self.config})"
        d_in, d_out = head_mod.head_features(self.head)
        return f"Gate({type(self.head).__name__}({d_in} -> {d_out}), {state}, {self.config})"


def _remove_hooks(module: nn.Module, match: Any) -> None:
    """Remove the forward hooks and forward pre-hooks of ``module`` for which ``match(fn)`` holds,
    with their entries in the tables that record how each hook is called."""
    for table, extras in (
        (module._forward_hooks, ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
        (module._forward_pre_hooks, ("_forward_pre_hooks_with_kwargs",)),
    ):
        for key in [k for k, fn in table.items() if match(fn)]:
            del table[key]
            for name in extras:
                getattr(module, name, {}).pop(key, None)


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        return False
    return isinstance(t, DTensor)


def _is_sharded(root: nn.Module, head: nn.Module) -> bool:
    """Whether the head's weight is sharded (a DTensor) or the model is under FSDP2."""
    if _is_dtensor(getattr(head_mod.base_linear(head), "weight", None)):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in root.modules())


def _fsdp_owner(root: nn.Module, head: nn.Module) -> Any:
    """The FSDP2 module whose parameter group holds the head's weight: the head itself when it was
    given to ``fully_shard``, else its nearest ancestor that was (None without FSDP2). A weight
    tied to a module sharded in another group (an embedding given its own ``fully_shard``) is not
    found this way; FSDP2 itself assigns a tied weight to one group only."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    path = head_mod.module_path(root, head)
    if path is None:
        return None
    chain = [root]
    for name in path.split(".") if path else []:
        chain.append(getattr(chain[-1], name))
    for m in reversed(chain):
        if isinstance(m, FSDPModule):
            return m
    return None
