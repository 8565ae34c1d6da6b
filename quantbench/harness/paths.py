"""Where things are, and whether a location can work: no MLflow, Hydra or torch imported here.

The command line checks a config with these before it imports anything
heavy, so a typo costs well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

from quantbench.errors import ConfigError

__all__ = ["CONF_DIR", "TRACKING_SCHEMES", "check_tracking_uri", "known_options", "project_root"]

#: URI schemes MLflow can track to (database stores name their dialect, optionally ``+driver``).
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def project_root() -> Path:
    """The checkout that holds ``conf/`` and ``mlruns/`` (the parent of the package)."""
    return Path(__file__).resolve().parents[2]


CONF_DIR = project_root() / "conf"


def known_options(group: str) -> list[str]:
    """The options a user may pick for config group ``group``: its YAML files (never an internal
    ``base_*`` schema of the ConfigStore)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_tracking_uri(uri: str | None, key: str = "tracking.uri") -> None:
    """Refuse a tracking URI that no MLflow store can be made of, naming ``key`` and what works.

    ``None`` (the project's sqlite store) and a plain directory path are fine.
    Whether a server answers is checked later, when the store is opened.
    """
    if not uri or "://" not in uri:
        return
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"{key}={uri!r}: MLflow cannot track to a {scheme!r} URI; use sqlite:///PATH/mlflow.db, "
                          "http://HOST:PORT (a tracking server: make server), postgresql://... or a directory")
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise ConfigError(f"{key}={uri!r}: MLflow keeps its file store read-only now; use "
                          "sqlite:///PATH/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true to use the file store)")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise ConfigError(f"{key}={uri!r}: a sqlite URI has three slashes and a file path: sqlite:///PATH/mlflow.db "
                          "(four for an absolute path: sqlite:////abs/mlflow.db)")
    if scheme in ("http", "https") and not uri.split("://", 1)[1].strip("/"):
        raise ConfigError(f"{key}={uri!r}: names no host; use http://HOST:PORT")
