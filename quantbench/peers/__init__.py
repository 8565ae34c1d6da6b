"""Peer toolkits as engines: onnxruntime's quantizer, torchao PT2E, NNCF and AMD Quark, each through its
public API, on the same float model, calibration batches and metric code as quantbench's own engine.

* :mod:`~quantbench.peers.protocol`: the file protocol (job in, record out);
* :mod:`~quantbench.peers.mapping`: how each quantbench scheme maps to each engine's options
  (supported, approximate with the difference named, or unsupported with the reason);
* :mod:`~quantbench.peers.base`: the engine module contract and the registry of engines;
* :mod:`~quantbench.peers.runner`: runs a job in this process or in an engine's own virtualenv;
* ``<name>_engine.py``: one module per toolkit.

Importing this package imports neither torch nor any toolkit.
"""
