"""The edge: SQL, Redis, Asterisk, FreeSWITCH and in-memory fakes."""
