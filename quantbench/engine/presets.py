"""Named quantization configs (a registry): ``presets.get(name)``, ``presets.list()``.

A preset is a function returning a :class:`Config`; its name is the function's
name. PTQ presets quantize the whole graph: weights, bias (int32 derived),
inputs and outputs. QAT presets use the same grids with static observers
(``qat_pow2``, ``qat_float``) or learnable scales (``qat_lsq``, ``qat_tqt``).
The presets are a :class:`quantbench.registry.Registry` (:data:`PRESETS`); an
unknown name raises :class:`~quantbench.registry.UnknownNameError`, whose
message lists the close matches.
"""

from __future__ import annotations

from typing import Callable

from quantbench.engine.spec import Config, QuantizationConfig, QuantizationSpec
from quantbench.registry import Registry, UnknownNameError

__all__ = ["PRESETS", "PresetError", "get", "list", "register"]

_builtin_list = list

PRESETS: Registry[Callable[[], Config]] = Registry("preset", hint="(quantbench.engine.presets.list() names them)")

PresetError = UnknownNameError
"""An unknown preset name (the registry's :class:`~quantbench.registry.UnknownNameError`, a ``KeyError``)."""


def register(fn: Callable[[], Config]) -> Callable[[], Config]:
    """Register a preset under its function name; a duplicate raises ``DuplicateNameError``."""
    return PRESETS.register(fn)


def get(name: str) -> Config:
    """The Config of a preset, named ``name``.

    Raises:
        UnknownNameError: no preset has that name.
    """
    return PRESETS.get(name)().replace(name=name)


def list(pattern: str = "*") -> _builtin_list[str]:  # noqa: A001 - mirrors timm.list_models
    """Preset names matching a shell-style wildcard pattern, sorted."""
    return PRESETS.list(pattern)


def _int32_bias() -> QuantizationSpec:
    return QuantizationSpec(dtype="int32", symmetric=True)


def _config(weight: QuantizationSpec, act: QuantizationSpec, bias: QuantizationSpec | None = None, *,
            qat: bool = False) -> Config:
    qc = QuantizationConfig(weight=weight, bias=bias or _int32_bias(), input_tensors=act, output_tensors=act)
    return Config(global_quant_config=qc, qat=qat)


_W8 = QuantizationSpec(dtype="int8", symmetric=True)
_A8 = QuantizationSpec(dtype="int8", symmetric=True)


@register
def int8_float() -> Config:
    """INT8 per-tensor symmetric min-max everywhere: the 'PTQ float scale' rows of the Quark table."""
    return _config(_W8, _A8)


@register
def int8_float_perchannel() -> Config:
    """Per-channel symmetric weights, per-tensor symmetric activations."""
    return _config(_W8.replace(qscheme="per_channel", ch_axis=0), _A8)


@register
def int8_pow2() -> Config:
    """Power-of-two ('non-overflow') scales everywhere, per tensor: what pow2 NPUs run."""
    return _config(_W8.replace(scale_type="pow2"), _A8.replace(scale_type="pow2"))


@register
def int8_pow2_mse() -> Config:
    """Power-of-two scales whose exponent minimises the quantization MSE."""
    return _config(_W8.replace(scale_type="pow2", observer="mse"),
                   _A8.replace(scale_type="pow2", observer="mse"))


@register
def int8_percentile() -> Config:
    """Float scales; activations clipped at the 99.99th percentile (histogram)."""
    return _config(_W8.replace(qscheme="per_channel"), _A8.replace(observer="percentile"))


@register
def int8_mse() -> Config:
    """Float scales; activation clipping range chosen by quantization MSE."""
    return _config(_W8.replace(qscheme="per_channel"), _A8.replace(observer="mse"))


@register
def uint8_asym() -> Config:
    """onnxruntime's native format: asymmetric uint8 activations, per-channel int8 weights."""
    return _config(_W8.replace(qscheme="per_channel"), QuantizationSpec(dtype="uint8", symmetric=False))


@register
def w4a8_float() -> Config:
    """4-bit per-channel weights (int4 in int8 containers), int8 activations, float scales."""
    return _config(QuantizationSpec(dtype="int4", qscheme="per_channel"), _A8)


@register
def w4a8_pow2() -> Config:
    """4-bit per-channel weights and int8 activations, power-of-two scales."""
    return _config(QuantizationSpec(dtype="int4", qscheme="per_channel", scale_type="pow2"),
                   _A8.replace(scale_type="pow2"))


@register
def w4a8_mse() -> Config:
    """4-bit per-channel MSE-clipped weights, int8 activations: the strongest low-bit PTQ here."""
    return _config(QuantizationSpec(dtype="int4", qscheme="per_channel", observer="mse"),
                   _A8.replace(observer="mse"))


# -- QAT ----------------------------------------------------------------------------------------
# Static QAT: the weight observer re-reads the (BN-folded) weight every training step and the
# activation observers follow an EMA of the batch ranges (torch's QAT default), until frozen.
_A8_EMA = _A8.replace(observer="moving_average")


@register
def qat_pow2() -> Config:
    """Static non-overflow pow2 QAT, per tensor: the 'QAT, non-overflow pow2 scale' row of the Quark table."""
    return _config(_W8.replace(scale_type="pow2"), _A8_EMA.replace(scale_type="pow2"), qat=True)


@register
def qat_float() -> Config:
    """Static float-scale QAT, per tensor: min-max weights, EMA min-max activations."""
    return _config(_W8, _A8_EMA, qat=True)


@register
def qat_lsq() -> Config:
    """LSQ QAT (Esser et al., arXiv 1902.08153): learned float steps, per-channel weights."""
    return _config(_W8.replace(qscheme="per_channel", learnable="lsq"), _A8.replace(learnable="lsq"), qat=True)


@register
def qat_tqt() -> Config:
    """TQT QAT (Jain et al., arXiv 1903.08066): learned log2 thresholds, pow2 scales, per tensor."""
    return _config(_W8.replace(scale_type="pow2", learnable="tqt"),
                   _A8.replace(scale_type="pow2", learnable="tqt"), qat=True)


@register
def w4a8_lsq() -> Config:
    """Low-bit LSQ QAT: int4 per-channel weights, int8 activations, learned float steps."""
    return _config(QuantizationSpec(dtype="int4", qscheme="per_channel", learnable="lsq"),
                   _A8.replace(learnable="lsq"), qat=True)


@register
def w4a8_tqt() -> Config:
    """Low-bit TQT QAT: int4 per-channel weights, int8 activations, learned pow2 thresholds."""
    return _config(QuantizationSpec(dtype="int4", qscheme="per_channel", scale_type="pow2", learnable="tqt"),
                   _A8.replace(scale_type="pow2", learnable="tqt"), qat=True)
