"""Argument checks shared by the public API: one rule for every timeout."""

from __future__ import annotations

from numbers import Real
from typing import Any, Optional


def check_timeout(timeout: Any) -> Optional[float]:
    """A timeout in seconds: None (no limit) or a real number >= 0, returned
    as a float; TypeError for anything else (a bool included), ValueError
    for a negative number or NaN."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, Real):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    t = float(timeout)
    if not t >= 0:  # (false for NaN too)
        raise ValueError("timeout must be >= 0")
    return t


def check_int(name: str, value: Any, lo: int, hi: Optional[int]) -> None:
    """``value`` is an int (not a bool) from ``lo`` to ``hi`` (None: no upper bound)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be between {lo} and {hi}" if hi else f"{name} must be >= {lo}")


# The longest spin a hub may be configured with (seconds): spinning longer
# than a wake-up costs never pays.
SPIN_MAX = 0.001


def check_spin(spin: Any) -> float:
    """A spin cap in seconds: a real number from 0 (off) to SPIN_MAX."""
    if isinstance(spin, bool) or not isinstance(spin, Real):
        raise TypeError(f"spin must be a number of seconds, not {type(spin).__name__}")
    s = float(spin)
    if not 0 <= s <= SPIN_MAX:  # (false for NaN too)
        raise ValueError(f"spin must be between 0 (off) and {SPIN_MAX} s")
    return s


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False")


def check_uid(uid: Any) -> int:
    """A user id: an int >= 0."""
    if not isinstance(uid, int) or isinstance(uid, bool):
        raise TypeError(f"a uid must be an int, not {type(uid).__name__}")
    if uid < 0:
        raise ValueError("a uid must be >= 0")
    return uid


def check_callback(callback: Any) -> None:
    if not callable(callback):
        raise TypeError("callback must be callable as callback(error, result)")
