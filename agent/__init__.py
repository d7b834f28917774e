"""Real-time billing agent for Asterisk and FreeSWITCH."""

__version__ = "0.1.0"
