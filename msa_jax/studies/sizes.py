"""Memory sizes written as 16K, 1M, 100M (K = 1e3, M = 1e6 tokens)."""

from __future__ import annotations

_UNITS = {"": 1, "K": 1_000, "M": 1_000_000, "G": 1_000_000_000}


def parse_size(text: str) -> int:
  t = text.strip().upper()
  unit = t[-1] if t and t[-1] in _UNITS else ""
  number = t[:-1] if unit else t
  try:
    value = float(number)
  except ValueError:
    raise ValueError(f"not a size: {text!r} (expected e.g. 16K, 1M, 100M)") from None
  if value < 0:
    raise ValueError(f"negative size: {text!r}")
  return int(round(value * _UNITS[unit]))


def format_size(n: int) -> str:
  for unit in ("G", "M", "K"):
    if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
      return f"{n // _UNITS[unit]}{unit}"
  return str(n)
