"""granian's constant-answer floor: an RSGI app answering 200 with no work, the most an RSGI Check can do.

    granian --interface rsgi --workers 1 --runtime-threads 1 benchmarks.load.rsgi_floor:app
"""

from __future__ import annotations

from typing import Any


async def app(scope: Any, proto: Any) -> None:
    """200, empty body: no header read, nothing decided."""
    proto.response_bytes(200, [], b"")
