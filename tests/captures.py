"""Where the raw Asterisk and FreeSWITCH transcripts are (they live beside the checkout).

``TEST_CAPTURES_DIR`` wins; else ``../shared/captures`` next to the repository; else the shared
folder of the development machines. Tests that replay them skip with the reason when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

_CANDIDATES = [
    Path(os.environ["TEST_CAPTURES_DIR"]) if os.environ.get("TEST_CAPTURES_DIR") else None,
    Path(__file__).resolve().parents[2] / "shared" / "captures",
    Path("/work/shared/captures"),
]


def captures_dir(kind: str) -> Path:
    """The folder of ``kind`` ("asterisk" or "freeswitch") transcripts (may not exist)."""
    for base in _CANDIDATES:
        if base is not None and (base / kind).is_dir():
            return base / kind
    return Path("/work/shared/captures") / kind
