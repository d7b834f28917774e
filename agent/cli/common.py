"""What every command shares: the lazily built context, amount parsing, output and errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from agent.adapters.sql.migrate import check_schema
from agent.config import Config, ConfigError, load_config
from agent.core.errors import BillingError
from agent.core.money import MoneyError, parse_amount

F = TypeVar("F", bound=Callable[..., Any])


def missing_sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names when it does not exist (None for other databases and memory)."""
    from agent.adapters.sql.engine import sqlite_file

    name = sqlite_file(url)
    if name is None:
        return None
    path = Path(name)
    return None if path.exists() else path.absolute()


@dataclass
class AppContext:
    config_path: str | None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    _config: Config | None = None
    _engine: Engine | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path, overrides=self.overrides)
        return self._config

    def engine(self, *, require_schema: bool = True) -> Engine:
        if self._engine is None:
            from agent.adapters.sql.engine import make_engine

            db = self.config.database
            if require_schema:
                missing = missing_sqlite_file(db.url)
                if missing is not None:  # connecting would create an empty database file here
                    raise BillingError(f"no database at {missing} (database.url {db.url}): run "
                                       "`billing-agent db upgrade` first, or point --config/--database-url at yours")
            self._engine = make_engine(db.url, pool_size=db.pool_size,
                                       connect_timeout_seconds=db.connect_timeout_seconds, echo=db.echo)
        if require_schema:
            check_schema(self._engine)
        return self._engine

    def sessions(self) -> sessionmaker[Session]:
        from agent.adapters.sql.engine import session_factory

        return session_factory(self.engine())

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        from agent.adapters.sql.engine import transaction

        with transaction(self.sessions()) as session:
            yield session

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def app(ctx: click.Context) -> AppContext:
    obj = ctx.find_object(AppContext)
    assert obj is not None, "the root command creates the AppContext"
    return obj


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """Print operator-facing errors on stderr with a non-zero exit, without a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (BillingError, ConfigError, MoneyError) as exc:
            fail(str(exc))
        except OperationalError as exc:
            fail(f"database error: {exc.orig if exc.orig is not None else exc}")
        except SQLAlchemyError as exc:
            fail(f"database error: {exc}")

    return wrapper  # type: ignore[return-value]


class AmountType(click.ParamType):  # type: ignore[type-arg]
    """A decimal amount of money, parsed into micro-units by the one parser (DESIGN §3)."""

    name = "amount"

    def __init__(self, *, allow_negative: bool = False) -> None:
        self.allow_negative = allow_negative

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return parse_amount(str(value), allow_negative=self.allow_negative,
                                what=param.human_readable_name if param else "amount")
        except MoneyError as exc:
            self.fail(str(exc), param, ctx)


AMOUNT = AmountType()
SIGNED_AMOUNT = AmountType(allow_negative=True)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=str))
