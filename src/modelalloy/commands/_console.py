"""What the commands share: the two consoles, the --debug state and byte sizes for people."""

from __future__ import annotations

from rich.console import Console

out = Console()
err = Console(stderr=True)

# Set by the root callback (and `merge --debug`); read by cli.main to decide whether to show
# tracebacks.
state = {"debug": False}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
