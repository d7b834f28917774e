"""The ``billing-agent`` command line (click). One module per command group."""
