"""Asterisk adapter: FastAGI authorization and AMI supervision (gevent-native, pure parsers)."""
