"""What the GCP and Azure ``spotsafe price`` lookups share: one JSON GET, a price row, the table.

The price APIs are public REST endpoints read with the standard library (no SDK has them):
:func:`get_json` is one bounded GET, its failures a :class:`~spotsafe.errors.LaunchError`
naming the API and the cause.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from spotsafe.errors import LaunchError

#: The most bytes of one price page spotsafe reads (a page is a few hundred KiB at most).
MAX_PAGE = 32 << 20


@dataclass(frozen=True)
class Price:
    """The Spot price of one machine type in one region (USD per hour), and from when."""

    machine_type: str
    region: str
    price: float
    since: str
    detail: str = ""


def get_json(api: str, url: str, headers: Mapping[str, str] | None = None, *, timeout: float = 30.0) -> Any:
    """GET ``url`` and parse its JSON; any failure a LaunchError naming ``api``."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read(MAX_PAGE + 1)[:MAX_PAGE])
    except urllib.error.HTTPError as e:
        detail = e.read(4096).decode(errors="replace").strip()
        raise LaunchError(f"{api} answered {e.code} for {url.split('?')[0]}: {detail}") from e
    except (OSError, ValueError) as e:
        raise LaunchError(f"{api} at {url.split('?')[0]}: {e}") from e


def print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Columns padded to their widest cell, as ``spotsafe price`` prints on every cloud."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def print_prices(prices: Sequence[Price], out: TextIO, *, where: str = "REGION") -> None:
    rows = [[where, "TYPE", "USD/H", "SINCE"] + (["DETAIL"] if any(p.detail for p in prices) else [])]
    for p in prices:
        row = [p.region, p.machine_type, f"{p.price:.4f}", p.since]
        rows.append(row + ([p.detail] if len(rows[0]) == 5 else []))
    print_table(rows, out)


def show_prices(prices: Sequence[Price], asked: Sequence[str], region: str | None, out: TextIO) -> int:
    """``spotsafe price``'s output and exit status (1: no price found)."""
    if not prices:
        print(f"no Spot price for {','.join(asked)} in {region or 'any region'}", file=out)
        return 1
    print_prices(prices, out)
    return 0
