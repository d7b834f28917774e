"""gevent orchestration: authorizer, nibble charger, CDR writer, call registry."""
