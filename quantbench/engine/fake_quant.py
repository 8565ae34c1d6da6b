"""Fake-quantize modules inserted into the graph: static, LSQ, TQT, derived bias.

One module instance serves one *quantization group*: a tensor, or several
tensors that must share one scale (concat inputs and output, max-pool input
and output, reshape input and output). Every call site of the group in the
graph calls the same module, so a shared scale is shared by construction.

Modes (set by :mod:`quantbench.engine.modes` context managers, never by
global flags):

* calibration: the observer records, the tensor passes through unchanged;
* fake-quant: values are rounded to the grid (``x / s``, half-even, exactly
  as onnxruntime's QuantizeLinear);
* both (static QAT): the observer keeps updating the scale each step until it
  is frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbench.engine.learnable import (
    lsq_fake_quantize,
    lsq_grad_scale,
    lsq_init_scale,
    lsq_min_step,
    ste_fake_quantize,
    tqt_fake_quantize,
    tqt_init_log2t_max,
    tqt_init_log2t_weight,
    tqt_scale,
)
from quantbench.engine.observers import build_observer
from quantbench.engine.spec import QuantizationSpec

__all__ = [
    "FakeQuantizeBase",
    "FakeQuantize",
    "LSQFakeQuantize",
    "TQTFakeQuantize",
    "DerivedBiasFakeQuantize",
    "build_fake_quantize",
]


class FakeQuantizeBase(nn.Module):
    """Shared state of every quantizer: spec, role, mode flags, names.

    Attributes:
        spec: the :class:`QuantizationSpec` of this group.
        role: ``"activation"``, ``"weight"`` or ``"const"``.
        name: the graph nodes this quantizer serves (for messages and tables).
        observer_enabled / fake_quant_enabled: the mode flags.
    """

    def __init__(self, spec: QuantizationSpec, role: str = "activation", name: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.role = role
        self.name = name
        self.observer_enabled = True
        self.fake_quant_enabled = False

    @property
    def ch_axis(self) -> int | None:
        return self.spec.ch_axis if self.spec.per_channel else None

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current (scale, zero_point), detached; shape () or (C,)."""
        raise NotImplementedError

    def current_scale(self) -> torch.Tensor:
        """The detached scale alone (what a derived quantizer reads every step)."""
        return self.qparams()[0]

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{self.role}, {s.dtype}, {s.qscheme}, {s.scale_type}, learnable={s.learnable}, "
                f"observe={self.observer_enabled}, fq={self.fake_quant_enabled}")


class _Observed(FakeQuantizeBase):
    """A quantizer with an observer (for calibration or for static QAT)."""

    def __init__(self, spec: QuantizationSpec, role: str = "activation", name: str = "") -> None:
        super().__init__(spec, role, name)
        self.observer = build_observer(spec, name)

    @property
    def name(self) -> str:  # keeps the observer's label in sync for its error messages
        return self.__dict__.get("_name", "")

    @name.setter
    def name(self, value: str) -> None:
        self.__dict__["_name"] = value
        if "observer" in self._modules:
            self._modules["observer"].name = value

    def _resize_on_load(self, state_dict, prefix, keys, param: bool) -> None:
        """Give a tensor the saved shape (a per-channel scale) before loading into it.

        Only when the shape differs: a parameter that keeps its shape keeps its
        identity, so an optimizer built before ``load_state_dict`` (a resumed
        QAT run) still updates the tensor the model uses.
        """
        for key in keys:
            saved, current = state_dict.get(prefix + key), getattr(self, key)
            if saved is not None and saved.shape != current.shape:
                value = torch.empty_like(saved, device=current.device)
                setattr(self, key, nn.Parameter(value) if param else value)


class _Learnable(_Observed):
    """A quantizer with one learned tensor, initialised once (from calibration or a first batch).

    ``_ready`` caches the ``initialized`` buffer on the Python side, so the
    training step does not read a device flag (a GPU sync) per quantizer.
    """

    param_name = ""

    def __init__(self, spec: QuantizationSpec, role: str = "activation", name: str = "") -> None:
        super().__init__(spec, role, name)
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._resize_on_load(state_dict, prefix, (self.param_name,), param=True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = False

    def _is_initialized(self) -> bool:
        if not self._ready:
            self._ready = bool(self.initialized)
        return self._ready

    @torch.no_grad()
    def _set_param(self, value: torch.Tensor) -> None:
        """Set the learned tensor; in place when the shape matches, so optimizers keep their reference."""
        value = value.detach().to(torch.float32)
        current = getattr(self, self.param_name)
        if current.shape == value.shape:
            current.copy_(value.to(current.device))
        else:
            setattr(self, self.param_name, nn.Parameter(value.to(current.device).clone()))
        self.initialized.fill_(True)
        self._ready = True


class FakeQuantize(_Observed):
    """Static fake-quant: an observer sets the scale; gradients pass straight through."""

    def __init__(self, spec: QuantizationSpec, role: str = "activation", name: str = "") -> None:
        super().__init__(spec, role, name)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._resize_on_load(state_dict, prefix, ("scale", "zero_point"), param=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale.detach(), self.zero_point.detach()

    @torch.no_grad()
    def update_qparams(self) -> None:
        """Copy the observer's current range into the scale / zero point."""
        if not self.observer.has_data:
            return
        scale, zp = self.observer.calculate_qparams()
        self.scale = scale.to(self.scale.device, torch.float32)
        self.zero_point = zp.to(self.zero_point.device, torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled:
            if self.role != "activation":
                # A weight is one tensor, not a stream: in static QAT the scale follows the
                # current (BN-folded) weight, not the envelope of every past step.
                self.observer.reset()
            self.observer(x.detach())
            if self.fake_quant_enabled:
                self.update_qparams()
        if not self.fake_quant_enabled:
            return x
        s = self.spec
        zero_point = 0 if s.symmetric else self.zero_point
        return ste_fake_quantize(x, self.scale, zero_point, s.qmin, s.qmax, self.ch_axis, s.round_method)


class LSQFakeQuantize(_Learnable):
    """LSQ (Esser et al., arXiv 1902.08153): the step size is a learned parameter.

    Initialised from PTQ calibration when there was one (the observer's scale),
    otherwise from the first batch it sees with ``2 * mean|x| / sqrt(Qp)``; the
    gradient of the step is scaled by ``1 / sqrt(N * Qp)``.

    The step stays positive. The paper leaves the step unconstrained, but an
    optimizer with momentum can carry it through zero in one update (SGD,
    lr 1e-3, momentum 0.9 did so in three steps on a MobileNetV3 block). Two
    guards:

    * the forward quantizes with ``max(|scale|, eps)`` and passes the
      gradient straight through the floor (:func:`lsq_fake_quantize`), so no
      value of the parameter divides by zero, and a step pushed to the floor
      still gets the gradient that grows it back;
    * every training forward first projects the parameter onto that same
      value, ``scale <- max(|scale|, eps)`` (what torch.ao's
      ``_LearnableFakeQuantize.forward`` does with ``scale.data``): the stored
      step, the state dict, the optimizer and :meth:`qparams` all see the
      positive step the forward uses, and the projection never changes an output.

    NaN and inf are left as they are, for
    :class:`~quantbench.engine.finite.QuantizerGuard` to report with this
    quantizer's name.
    """

    param_name = "scale"

    def __init__(self, spec: QuantizationSpec, role: str = "activation", name: str = "") -> None:
        super().__init__(spec, role, name)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def _set_scale(self, value: torch.Tensor) -> None:
        self._set_param(value)

    @torch.no_grad()
    def update_qparams(self) -> None:
        if self.observer.has_data:
            self._set_scale(self.observer.calculate_qparams()[0])

    def init_from(self, x: torch.Tensor) -> None:
        """The paper's initial step from a tensor (a first batch, or the weight itself)."""
        self._set_scale(lsq_init_scale(x.detach(), self.spec.qmax, self.ch_axis))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.current_scale()
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def current_scale(self) -> torch.Tensor:
        return self.scale.detach().abs().clamp_min(lsq_min_step())

    def _keep_positive(self) -> None:
        """``scale <- max(|scale|, eps)`` in place: two tiny kernels, no host sync.

        Through ``.data``, which autograd does not version: a quantizer shared by several call
        sites (concat inputs, max-pool) runs this again after an earlier call of the same forward
        saved the step for its backward, and by then the projection changes nothing.
        """
        self.scale.data.abs_().clamp_min_(lsq_min_step())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled:
            self.observer(x.detach())
        if not self.fake_quant_enabled:
            return x
        if not self._is_initialized():
            self.init_from(x)
        if self.training:
            self._keep_positive()
        per_scale = x.numel() // max(1, self.scale.numel() if self.role != "activation" else x.shape[0])
        g = lsq_grad_scale(per_scale, self.spec.qmax)
        return lsq_fake_quantize(x, self.scale, self.spec.qmin, self.spec.qmax, g, self.ch_axis)


class TQTFakeQuantize(_Learnable):
    """TQT (Jain et al., arXiv 1903.08066): a learned log2 threshold, pow2 scale.

    Initialised from PTQ calibration when there was one (log2 of the observed
    max, i.e. the non-overflow threshold), otherwise from the first batch:
    3-sigma for weights, the max for activations. The scale is positive by
    construction; a ``log2_t`` that goes NaN or inf (or so large that the scale
    overflows) is reported by :class:`~quantbench.engine.finite.QuantizerGuard`.
    """

    param_name = "log2_t"

    def __init__(self, spec: QuantizationSpec, role: str = "activation", name: str = "") -> None:
        super().__init__(spec, role, name)
        self.log2_t = nn.Parameter(torch.tensor(0.0))

    @property
    def scale(self) -> torch.Tensor:
        return tqt_scale(self.log2_t.detach(), self.spec.qmin, self.spec.qmax)

    def _set_log2_t(self, value: torch.Tensor) -> None:
        self._set_param(value)

    @torch.no_grad()
    def update_qparams(self) -> None:
        if self.observer.has_data:
            # The observer's pow2 scale s covers amax; threshold t = s * 2^(b-1).
            s = self.observer.calculate_qparams()[0]
            self._set_log2_t(torch.log2(s * float(-self.spec.qmin)))

    def init_from(self, x: torch.Tensor) -> None:
        """The paper's initial threshold from a tensor: 3-sigma for weights, the max for activations."""
        init = (tqt_init_log2t_weight(x.detach(), self.ch_axis) if self.role != "activation"
                else tqt_init_log2t_max(x.detach()))
        self._set_log2_t(init)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def current_scale(self) -> torch.Tensor:
        return self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled:
            self.observer(x.detach())
        if not self.fake_quant_enabled:
            return x
        if not self._is_initialized():
            self.init_from(x)
        return tqt_fake_quantize(x, self.log2_t, self.spec.qmin, self.spec.qmax, self.ch_axis)


class DerivedBiasFakeQuantize(FakeQuantizeBase):
    """Int32 bias with scale = input scale x weight scale and zero point 0.

    That is the scale an integer kernel accumulates in (onnxruntime
    QLinearConv, NPUs), so the bias adds straight into the int32 accumulator.
    The two source quantizers are held as plain references, not submodules,
    so they are not duplicated in the state dict; deepcopy keeps them tied.
    """

    def __init__(self, spec: QuantizationSpec, act: FakeQuantizeBase, weight: FakeQuantizeBase,
                 name: str = "") -> None:
        super().__init__(spec, "bias", name)
        self.__dict__["_act"] = act
        self.__dict__["_weight"] = weight

    @property
    def sources(self) -> tuple[FakeQuantizeBase, FakeQuantizeBase]:
        return self.__dict__["_act"], self.__dict__["_weight"]

    @property
    def fake_quant_enabled(self) -> bool:  # follows its sources: bias is exact only once both are
        act, weight = self.sources
        return act.fake_quant_enabled and weight.fake_quant_enabled

    @fake_quant_enabled.setter
    def fake_quant_enabled(self, value: bool) -> None:
        pass

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        act, weight = self.sources
        scale = act.qparams()[0] * weight.qparams()[0]
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return b
        act, weight = self.sources
        scale = act.current_scale() * weight.current_scale()
        axis = 0 if scale.dim() == 1 else None
        return ste_fake_quantize(b, scale, 0, self.spec.qmin, self.spec.qmax, axis, "half_even")


_BY_LEARNABLE: dict[str, type[_Observed]] = {"none": FakeQuantize, "lsq": LSQFakeQuantize, "tqt": TQTFakeQuantize}


def build_fake_quantize(spec: QuantizationSpec, role: str = "activation", name: str = "") -> FakeQuantizeBase:
    """The fake-quant module for a spec (registry keyed by ``spec.learnable``)."""
    return _BY_LEARNABLE[spec.learnable](spec, role, name)
