"""The audit's working copy of the model: a float copy, its forward in full precision, and the
measurement of one group action (change of logits, loss and gradients)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .actions import Action
from .report import AuditError

__all__ = ["KeepPrecision", "READOUT", "WorkModel", "default_forward", "parse_batch"]

_LOW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_DOWNCASTS = {Tensor.float, Tensor.half, Tensor.bfloat16}


class KeepPrecision(TorchFunctionMode):
    """Inside the audit's forward, requests for a lower float precision stay in ``dtype``.

    Model code often computes norms and softmaxes "in float32" (``x.to(torch.float32)``,
    ``softmax(..., dtype=torch.float32)``), which for a float64 audit copy is a downcast:
    it would put float32 rounding (~1e-7) into every check that changes the rounding (a
    rotation) and hide exact symmetries behind it. This mode rewrites such requests to
    ``dtype``; the function computed is the same, only its precision changes.
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _DOWNCASTS and args and isinstance(args[0], Tensor):
            return args[0].to(self.dtype)  # x.float(): float64 in, float64 out; ints become float64
        if kwargs.get("dtype") in _LOW_FLOATS:
            kwargs["dtype"] = self.dtype
        if func is Tensor.to or func is Tensor.type:
            args = tuple(self.dtype if a in _LOW_FLOATS else a for a in args)
        return func(*args, **kwargs)


def default_forward(model: nn.Module, inputs: Tensor) -> Tensor:
    """``model(input_ids)`` for token ids, ``model(pixel_values=...)`` for images."""
    if inputs.is_floating_point():
        return model(pixel_values=inputs)
    return model(inputs)


#: outputs of the fixed random readout of a model without logits (an encoder, a vision tower)
READOUT = 16


def _output_of(out, where: str) -> tuple[Tensor, bool]:
    """``(tensor, is_logits)``: the logits of an output, or else its last hidden state."""
    if hasattr(out, "logits") and isinstance(out.logits, Tensor):
        out, logits = out.logits, True
    elif hasattr(out, "last_hidden_state") and isinstance(out.last_hidden_state, Tensor):
        out, logits = out.last_hidden_state, False
    elif isinstance(out, (tuple, list)):
        out, logits = out[0], True
    else:
        logits = True
    if not isinstance(out, Tensor) or out.ndim != 3:
        raise AuditError(
            f"{where}: the forward must return logits [batch, seq, vocab], an object with .logits or "
            f".last_hidden_state [batch, seq, d]; got {type(out).__name__}"
        )
    return out, logits


def parse_batch(batch) -> tuple[Tensor, Tensor | None]:
    """``(inputs, labels)`` of an audit batch: input ids ``[B, T]`` (a LongTensor, or a mapping
    with ``input_ids`` and optionally ``labels``), or images ``[B, C, H, W]`` (a float
    tensor, or a mapping with ``pixel_values``)."""
    if isinstance(batch, Mapping):
        if "input_ids" in batch:
            x, labels = batch["input_ids"], batch.get("labels")
        elif "pixel_values" in batch:
            x, labels = batch["pixel_values"], None
        else:
            raise AuditError("batch: a mapping must hold 'input_ids' (or 'pixel_values' for a vision model)")
    else:
        x, labels = batch, None
    if isinstance(x, Tensor) and x.is_floating_point() and x.ndim == 4:
        return x, None
    if not isinstance(x, Tensor) or x.dtype not in (torch.long, torch.int) or x.ndim != 2 or x.shape[1] < 2:
        raise AuditError(
            f"batch: input_ids must be an integer tensor [batch, seq >= 2] (or pixel_values a float tensor "
            f"[batch, channels, height, width]), got {getattr(x, 'dtype', '')} {getattr(x, 'shape', type(x))}"
        )
    return x, labels


class WorkModel:
    """A ``dtype`` deep copy of the model with name -> tensor tables, run on one batch."""

    def __init__(
        self, model: nn.Module, batch, dtype: torch.dtype, forward: Callable, keep_precision: bool, grads: bool
    ):
        x, labels = parse_batch(batch)
        self.name = type(model).__name__
        self.dtype, self.forward_fn, self.keep_precision, self.grads = dtype, forward, keep_precision, grads
        self.model = copy.deepcopy(model).to(dtype).eval()
        first = next(self.model.parameters(), None)
        if first is None:
            raise AuditError(f"{self.name}: the model has no parameters")
        self.device = first.device
        #: the forward's input: token ids, or images (then ``ids`` is None: nothing to relabel)
        self.x = x.to(self.device, dtype) if x.is_floating_point() else x.to(self.device, torch.long)
        self.ids = None if x.is_floating_point() else self.x
        self.params = dict(self.model.named_parameters(remove_duplicate=False))
        self.buffers = dict(self.model.named_buffers(remove_duplicate=False))
        self.config = getattr(self.model, "config", None)
        self.notes = self._eager_experts()
        self.readout: Tensor | None = None  # fixed readout [READOUT, d] of a model without logits
        with torch.no_grad():
            out, is_logits = _output_of(self.call(self.x), self.name)
        gen = torch.Generator().manual_seed(12345)
        if not is_logits:
            d = out.shape[-1]
            self.readout = (torch.randn(READOUT, d, generator=gen, dtype=torch.float64) / d**0.5).to(self.device, dtype)
            self.notes.append(
                f"no logits: the last hidden state [.., {d}] is read out by a fixed random [{READOUT}, {d}] matrix "
                "(not a model weight: no group acts on it)"
            )
        if labels is not None:
            self.labels = labels.to(self.device, torch.long)
        elif self.ids is not None and self.readout is None:
            self.labels = self.ids
        else:  # fixed random targets for the readout (ids modulo its size for token inputs)
            shape = out.shape[:2]
            self.labels = (
                self.ids % READOUT
                if self.ids is not None and self.ids.shape == shape
                else torch.randint(0, READOUT, tuple(shape), generator=gen)
            ).to(self.device, torch.long)

    def _eager_experts(self) -> list[str]:
        """Fused MoE kernels (HF ``grouped_mm``) take float32/16 only: the audit copy runs the
        model's own reference ("eager") expert loop, the same function in float64."""
        notes = []
        for mname, mod in self.model.named_modules():
            cfg = getattr(mod, "config", None)
            impl = getattr(cfg, "_experts_implementation", None) if cfg is not None else None
            if cfg is not None and impl not in (None, "eager"):
                cfg._experts_implementation = "eager"
                notes.append(f"{mname or 'model'}: experts_implementation {impl!r} -> 'eager'")
        return notes

    def tensor(self, name: str) -> Tensor:
        if name in self.params:
            return self.params[name]
        if name in self.buffers:
            return self.buffers[name]
        raise AuditError(f"{name}: no such parameter or buffer")

    def module_of(self, name: str) -> nn.Module:
        """The module owning tensor ``name``."""
        return self.model.get_submodule(name.rpartition(".")[0])

    # -- running ---------------------------------------------------------------------------
    def call(self, x: Tensor):
        if self.keep_precision:
            with KeepPrecision(self.dtype):
                return self.forward_fn(self.model, x)
        return self.forward_fn(self.model, x)

    def run(self, x: Tensor, labels: Tensor, want: list[str]):
        """``(logits, loss, {name: grad})`` of the model on the input ``x`` (ids or images)."""
        logits, is_logits = _output_of(self.call(x), self.name)
        if not is_logits:
            if self.readout is None:
                raise AuditError(f"{self.name}: the forward returned hidden states, then logits")
            logits = logits @ self.readout.mT
        V = logits.shape[-1]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, V).to(torch.float64), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        grads = {}
        if self.grads and want:
            ts = [self.params[n] for n in want]
            gs = torch.autograd.grad(loss, ts, allow_unused=True)
            grads = {n: (torch.zeros_like(t) if g is None else g) for n, t, g in zip(want, ts, gs)}
        return logits.detach(), loss.detach(), grads

    @torch.no_grad()
    def _apply(self, action: Action) -> dict[str, Tensor]:
        """Apply the edits (each sees the original value); returns the saved originals."""
        saved: dict[str, Tensor] = {}
        for ed in action.edits:
            saved.setdefault(ed.name, self.tensor(ed.name).detach().clone())
        for ed in action.edits:
            t = self.tensor(ed.name)
            new = ed.fn(saved[ed.name])
            if new.shape != t.shape:
                raise AuditError(f"{ed.name}: group action changed the shape {tuple(t.shape)} -> {tuple(new.shape)}")
            t.copy_(new)
        return saved

    def measure(self, action: Action, grad_names: list[str], base) -> tuple[float, float, float]:
        """Relative logits error, |delta loss| and relative gradient error of ``action``
        against ``base`` = the unmodified model's ``(logits, loss, grads)``."""
        base_logits, base_loss, base_grads = base
        saved = self._apply(action)
        try:
            x = self.x if action.input_map is None else action.input_map[self.x]
            labels = self.labels
            if action.target_map is not None:
                labels = torch.where(labels >= 0, action.target_map[labels.clamp_min(0)], labels)
            logits, loss, grads = self.run(x, labels, grad_names)
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    self.tensor(n).copy_(v)
        diff = logits - (base_logits[..., action.logit_perm] if action.logits == "perm" else base_logits)
        if action.logits == "shift":
            diff = diff - diff.mean(-1, keepdim=True)
        scale = base_logits.abs().max().clamp_min(torch.finfo(base_logits.dtype).tiny)
        return (
            float(diff.abs().max() / scale),
            float((loss - base_loss).abs()),
            self._grad_error(action, grad_names, grads, base_grads),
        )

    @staticmethod
    def _grad_error(action: Action, names: list[str], grads, base_grads) -> float:
        if not grads:
            return float("nan")
        num, den = 0.0, 0.0
        edits = {ed.name: ed for ed in action.edits}
        for n in names:
            ed = edits.get(n)
            expected = ed.grad_fn(base_grads[n]) if ed is not None and ed.grad_fn is not None else base_grads[n]
            num = max(num, float((grads[n] - expected).abs().max()))
            den = max(den, float(expected.abs().max()))
        return num / den if den > 0 else (0.0 if num == 0 else float("inf"))

    # -- points ------------------------------------------------------------------------------
    @torch.no_grad()
    def perturb(self, names: list[str], seed: int, scale: float) -> None:
        """The generic point: every tensor of ``names`` plus relative Gaussian noise."""
        gen = torch.Generator().manual_seed(seed)
        for n in names:
            p = self.params[n]
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
            p.add_(noise * (scale * max(float(p.abs().mean()), 0.1)))

    @torch.no_grad()
    def neutralise(self, suspects: list[str]) -> Callable[[], None]:
        """Set tensors to their mean and ``config.<key>`` entries to None; returns an undo."""
        undo = []
        for s in suspects:
            if s.startswith("config."):
                key = s[len("config.") :]
                undo.append(("config", key, getattr(self.config, key)))
                setattr(self.config, key, None)
            else:
                t = self.tensor(s)
                undo.append(("tensor", s, t.detach().clone()))
                t.fill_(float(t.mean()) if t.is_floating_point() else 0)

        @torch.no_grad()
        def restore():
            for kind, key, value in reversed(undo):
                if kind == "config":
                    setattr(self.config, key, value)
                else:
                    self.tensor(key).copy_(value)

        return restore
