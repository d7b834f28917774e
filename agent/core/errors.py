"""Domain errors shared by every layer. Messages are written for the operator who reads them."""

from __future__ import annotations


class BillingError(Exception):
    """Base class of the errors an operator can act on (printed without a traceback)."""


class NotFound(BillingError):
    """An account, plan, call or reservation that does not exist."""


class Conflict(BillingError):
    """The request contradicts what is already stored (for example a reused reference)."""


class InvalidInput(BillingError):
    """A value that is not acceptable; the message names the value and the reason."""
