"""A scheme config (plain dict) -> the engine's :class:`~quantbench.engine.Config`.

A scheme is data: an engine preset name plus overrides. The preset gives the
whole policy; the overrides replace single :class:`QuantizationSpec` fields in
every spec of one role (weight, bias, input_tensors, output_tensors), which is
how a low-bit variant such as ``qat_w4a8_lsq`` is the ``qat_lsq`` preset with
``weight.dtype: int4``. ``algorithms`` lists the advanced PTQ steps (CLE, mixed
precision, bias correction, AdaRound, block reconstruction) with their options.
The engine validates the result, so an impossible combination fails here naming
the field.
"""

from __future__ import annotations

from typing import Any, Mapping

from quantbench.engine.spec import ALGORITHMS, Algorithm, Config, QuantizationConfig
from quantbench.errors import ConfigError
from quantbench.registry import close_matches

__all__ = ["ROLES", "SchemeError", "engine_config"]

ROLES = ("weight", "bias", "input_tensors", "output_tensors")
_CONFIG_FIELDS = ("fold_bn", "exclude")


class SchemeError(ConfigError):
    """A scheme whose overrides do not fit its preset."""


def _changes(scheme: Mapping[str, Any], role: str) -> dict[str, Any]:
    return {k: v for k, v in (scheme.get(role) or {}).items() if v is not None}


def _override_qconfig(qc: QuantizationConfig, scheme: Mapping[str, Any]) -> QuantizationConfig:
    specs = {}
    for role in ROLES:
        spec = getattr(qc, role)
        changes = _changes(scheme, role)
        if spec is not None and changes:
            specs[role] = spec.replace(**changes)
    return qc.replace(**specs) if specs else qc


def _all_qconfigs(config: Config) -> list[QuantizationConfig]:
    return [config.global_quant_config, *config.op_type_quant_config.values(),
            *config.node_name_quant_config.values()]


def _with_options(algorithm: Algorithm, extra: Mapping[str, Any]) -> Algorithm:
    """``algorithm`` with ``scheme.algorithm_options[<its name>]`` laid over its options."""
    more = extra.get(algorithm.name) or {}
    return Algorithm(algorithm.name, {**algorithm.options, **dict(more)}) if more else algorithm


def engine_config(scheme: Mapping[str, Any]) -> Config:
    """The engine Config for ``scheme`` (a resolved ``conf/scheme/*.yaml`` as a dict).

    Raises:
        SchemeError: the scheme has no preset (a float scheme), or overrides a
            role that the preset leaves in float everywhere.
        UnknownNameError: the preset is unknown (a ConfigError; the engine lists close matches).
    """
    from quantbench.engine import presets

    name = scheme.get("preset")
    if not name:
        raise SchemeError(f"scheme {scheme.get('name')!r} has no preset: it is the float reference")
    config = presets.get(name)
    for role in ROLES:
        if _changes(scheme, role) and all(getattr(qc, role) is None for qc in _all_qconfigs(config)):
            raise SchemeError(
                f"scheme {scheme.get('name')!r} overrides {role} but preset {name!r} leaves {role} "
                f"in float; remove scheme.{role} or pick a preset that quantizes it"
            )
    changes: dict[str, Any] = {
        "global_quant_config": _override_qconfig(config.global_quant_config, scheme),
        "op_type_quant_config": {k: _override_qconfig(v, scheme) for k, v in config.op_type_quant_config.items()},
        "node_name_quant_config": {k: _override_qconfig(v, scheme)
                                   for k, v in config.node_name_quant_config.items()},
    }
    changes.update({f: scheme[f] for f in _CONFIG_FIELDS if scheme.get(f) is not None})
    if "exclude" in changes:
        changes["exclude"] = tuple(changes["exclude"])
    extra = scheme.get("algorithm_options") or {}
    if not isinstance(extra, Mapping) or not all(isinstance(v, Mapping) for v in extra.values()):
        raise SchemeError(f"scheme.algorithm_options={extra!r}: must map algorithm names to options, e.g. "
                          "{adaround:{iters:2000}}")
    if scheme.get("algorithms"):
        changes["algorithms"] = tuple(_with_options(Algorithm.parse(dict(a) if isinstance(a, Mapping) else a),
                                                    extra)
                                      for a in scheme["algorithms"])
    for name in extra:
        if name not in ALGORITHMS:
            close = close_matches(str(name), list(ALGORITHMS))
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise SchemeError(f"scheme.algorithm_options.{name}: no such algorithm{hint}; one of {list(ALGORITHMS)}")
    return config.replace(**changes)
