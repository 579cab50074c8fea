"""Sizes in messages: the unit that fits, never "0.00 GiB" for a megabyte."""

from __future__ import annotations

import pytest

from edge_ms.sizes import human_size


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1000, "1000 B"),
        (1024, "1.00 KiB"),
        (1_000_000, "977 KiB"),
        (2**20, "1.00 MiB"),
        (40 * 2**20, "40.0 MiB"),
        (129 * 2**20, "129 MiB"),
        (1.5 * 2**30, "1.50 GiB"),
        (19.9 * 2**30, "19.9 GiB"),
        (3 * 2**40, "3.00 TiB"),
    ],
)
def test_human_size(n, text):
    assert human_size(n) == text
