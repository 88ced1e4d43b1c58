"""The three inference stages: encode (1), route and prefill (2), decode (3)."""
