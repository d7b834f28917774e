"""Pure domain: no I/O, no clock reads, no gevent. Time and money are arguments."""
