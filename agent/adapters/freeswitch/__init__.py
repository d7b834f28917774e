"""FreeSWITCH edge: event-socket framing, the supervised greenswitch client, the adapter."""
