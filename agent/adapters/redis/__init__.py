"""The Redis balance store (many nodes share one Redis; the SQL ledger stays the truth)."""
