"""Scraping a running server's ``/metrics`` in tests, with the real parser.

Owns nothing but reading: ``scrape`` returns every sample by name and labels.
How it fails: urllib errors and parser errors propagate; ``wait_for_sample``
raises TimeoutError naming the sample and its last value.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import HOST


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.families: set[str] = set()
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.sample_names: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for sample in family.samples:
                self.sample_names.add(sample.name)
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, **labels: str) -> float:
        """One sample's value; 0 when the series does not exist (yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str) -> bool:
        """Declared in the scrape (a labelled family may have no series yet: HELP and TYPE only)."""
        if name in self.families or name in self.sample_names:
            return True
        for suffix in ("_total", "_bucket", "_count", "_sum"):
            if name.endswith(suffix) and name.removesuffix(suffix) in self.families:
                return True
        return False


def scrape(server: Any) -> Scrape:
    with urllib.request.urlopen(f"http://{HOST}:{server.http_port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Scrape(response.read().decode())


def wait_for_sample(server: Any, name: str, value: float, timeout: float = 20.0, **labels: str) -> Scrape:
    """Wait until a sample reaches at least ``value``."""
    deadline = time.monotonic() + timeout
    last = 0.0
    while time.monotonic() < deadline:
        result = scrape(server)
        last = result.get(name, **labels)
        if last >= value:
            return result
        time.sleep(0.2)
    raise TimeoutError(f"{name}{labels} stayed at {last}, wanted {value}")
