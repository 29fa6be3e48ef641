"""Untrusted text made safe to print and log.

Image names, reasons and account names come from buyers, agents and providers. A
newline in one would forge a line in a text log, an escape sequence would drive
the operator's terminal; both become visible escapes instead.
"""

from __future__ import annotations

import unicodedata


def escape_controls(text: str) -> str:
    """``text`` with every control or format character written as ``\\n``, ``\\x1b``..."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    return "".join(out)
