"""A real Prometheus Pushgateway (Debian's ``prometheus-pushgateway``) for the probe's results.

Owns: one ``prometheus-pushgateway`` child on 127.0.0.1 and a free port, nothing persisted.
``metrics()`` reads back what was pushed, parsed by prometheus_client's own text parser.

How it fails: ``start`` raises RuntimeError when it exits or its port does not answer in time.
"""

from __future__ import annotations

import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from .net import free_port, stop_process, wait_port


class Pushgateway:
    def __init__(self) -> None:
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Pushgateway:
        self.proc = subprocess.Popen(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{self.port}",
                                      "--persistence.file="],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port, timeout=15, proc=self.proc)
        return self

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Every sample the gateway serves, by metric name."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            text = response.read().decode()
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return out

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
