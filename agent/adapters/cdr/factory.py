"""Build the CDR pipeline from the configuration (the daemon and ``cdrs replay`` use it)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from agent.adapters.cdr.spool import Spool
from agent.adapters.sql.cdr_writer import SqlCdrStore
from agent.config import Config
from agent.services.cdr_pipeline import CdrPipeline, PipelineSettings
from agent.services.metrics import Metrics


def spool_path(config: Config, override: str | None = None) -> Path:
    """``cdr.spool_dir``; a relative folder is taken from the current folder of the process."""
    return Path(override or config.cdr.spool_dir).expanduser().absolute()


def make_cdr_pipeline(config: Config, engine: Engine, *, metrics: Metrics | None = None,
                      spool_dir: str | None = None) -> CdrPipeline:
    """A pipeline over the node's spool and the shared database; call ``start()`` to run it.
    Raises SpoolLocked when another process owns the spool."""
    cdr = config.cdr
    spool = Spool(spool_path(config, spool_dir), max_bytes=cdr.spool_max_mb << 20)
    settings = PipelineSettings(node=config.node.id, batch_size=cdr.batch_size,
                                flush_interval_ms=cdr.flush_interval_ms)
    return CdrPipeline(spool, SqlCdrStore(engine), settings, metrics=metrics)
