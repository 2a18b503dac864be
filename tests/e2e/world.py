"""The small internet the end-to-end tests run in, and what each host says.

Hosts (each a network namespace, see tests.e2e.netns):

- ``cluster``: two kubemta "pods", ``mta-0`` and ``mta-1``, each a real
  ``mta serve`` with its own spool and config; pod addresses 198.51.100.10
  and .11 (submission on 587, /readyz on 8080, handoff on 8025), egress
  addresses 203.0.113.10 and .11 chosen through ``identity.pods``;
- ``dns``: Knot DNS, authoritative for ``test.`` and the reverse zone of
  203.0.113.0/24 (MX, A, PTR, SPF, DKIM, DMARC, null MX, a blocklist zone);
- ``mx-postfix``: a real Postfix with STARTTLS for dest.test, pref.test,
  amx.test and the sending domain shop.test (so bounces land there too);
- ``mx-flaky`` and ``mx-reject``: smtp-sink, restarted with ``-r``/``-f``
  flags to answer 4xx or 5xx;
- ``mx-other``: chasquid, unpacked from its Debian package (see
  tests.e2e.chasquid), for other.test, started only by the test that uses it;
- ``app``: the submitting application, swaks over STARTTLS with AUTH.

Owns every process it starts (by PID) and every namespace (through the
Lab).  ``close()`` stops them all and then deletes the namespaces; it is
safe on a half-built world.  ``mark()`` and ``report()`` give, per host, the
log lines written since a test began, which the suite's conftest prints when
a test fails.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import dns.reversename
import trustme
import yaml

from tests.e2e.authdns import KnotServer
from tests.e2e.netns import Lab
from tests.fakes.kube_api import FakeKubeApi
from tests.peers.net import stop_process, wait_port
from tests.peers.postfix import PostfixServer
from tests.peers.sink import SmtpSink

HOSTS: dict[str, list[str]] = {
    "cluster": ["203.0.113.10", "203.0.113.11", "198.51.100.10", "198.51.100.11"],
    "dns": ["192.0.2.53"],
    "mx-postfix": ["192.0.2.25"],
    "mx-other": ["192.0.2.26"],
    "mx-flaky": ["192.0.2.27"],
    "mx-reject": ["192.0.2.28"],
    "app": ["198.51.100.50"],
}
DOWN = "192.0.2.99"  # no host has it: an MX that is down
DNS_IP = HOSTS["dns"][0]
POSTFIX_IP = HOSTS["mx-postfix"][0]
PODS = {
    "mta-0": {"pod_ip": "198.51.100.10", "egress": "203.0.113.10", "helo": "mta-0.out.kubemta.test"},
    "mta-1": {"pod_ip": "198.51.100.11", "egress": "203.0.113.11", "helo": "mta-1.out.kubemta.test"},
}
SENDER_DOMAIN = "shop.test"
SENDER = f"billing@{SENDER_DOMAIN}"
SELECTOR = "e2e"
ZONES = ["test", "113.0.203.in-addr.arpa"]
POSTFIX_DOMAINS = ["dest.test", "pref.test", "amx.test", SENDER_DOMAIN]
BLOCKLIST = "bl.test"
PASSWORD = "a long app passphrase"
PEER_BASE = Path("/var/tmp/kubemta-tests")
KUBE_NAMESPACE = "mail"
STATEFULSET = "mta"


def ptr_name(ip: str) -> str:
    return dns.reversename.from_address(ip).to_text()


def base_records(dkim_record: str) -> list[str]:
    """The zone data when every identity check should pass."""
    records = [
        f"ns.test. IN A {DNS_IP}",
        # the sending domain: its MX takes the bounces
        f"{SENDER_DOMAIN}. IN MX 10 mx.{SENDER_DOMAIN}.",
        f"mx.{SENDER_DOMAIN}. IN A {POSTFIX_IP}",
        f'{SENDER_DOMAIN}. IN TXT "v=spf1 ip4:203.0.113.10 ip4:203.0.113.11 -all"',
        f'_dmarc.{SENDER_DOMAIN}. IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc@{SENDER_DOMAIN}"',
        dkim_record,
        "dest.test. IN MX 10 mx.dest.test.",
        f"mx.dest.test. IN A {POSTFIX_IP}",
        # preference order: mx1 (down), then mx2 (Postfix); mx3 would reject
        "pref.test. IN MX 30 mx3.pref.test.",
        "pref.test. IN MX 10 mx1.pref.test.",
        "pref.test. IN MX 20 mx2.pref.test.",
        f"mx1.pref.test. IN A {DOWN}",
        f"mx2.pref.test. IN A {POSTFIX_IP}",
        f"mx3.pref.test. IN A {HOSTS['mx-reject'][0]}",
        # no MX at all: the domain's own address
        f"amx.test. IN A {POSTFIX_IP}",
        "nullmx.test. IN MX 0 .",
        "flaky.test. IN MX 10 mx.flaky.test.",
        f"mx.flaky.test. IN A {HOSTS['mx-flaky'][0]}",
        "reject.test. IN MX 10 mx.reject.test.",
        f"mx.reject.test. IN A {HOSTS['mx-reject'][0]}",
        "other.test. IN MX 10 mx.other.test.",
        f"mx.other.test. IN A {HOSTS['mx-other'][0]}",
        f"{BLOCKLIST}. IN TXT \"test blocklist\"",
    ]
    for pod in PODS.values():
        records += [f"{pod['helo']}. IN A {pod['egress']}", f"{ptr_name(pod['egress'])} IN PTR {pod['helo']}."]
    return records


class Pod:
    """One ``mta serve`` in the cluster host, with its own spool and config."""

    def __init__(self, world: World, name: str, config: dict[str, Any]) -> None:
        self.world = world
        self.name = name
        self.pod_ip = PODS[name]["pod_ip"]
        self.egress = PODS[name]["egress"]
        self.helo = PODS[name]["helo"]
        self.workdir = world.root / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "mta.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.workdir / "mta.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"---- start {time.strftime('%H:%M:%S')} ----\n".encode())
            log.flush()
            with self.world.lab.inside("cluster"):
                self.proc = subprocess.Popen(
                    [sys.executable, "-P", "-m", "mta.cli", "serve", "-c", str(self.config_path)],
                    cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONUNBUFFERED": "1",
                         "HOME": str(self.workdir)})
        if wait:
            self.wait_ready()
        else:
            with self.world.lab.inside("cluster"):
                wait_port(self.pod_ip, 587, timeout=30)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def readyz(self) -> tuple[int, dict[str, Any]]:
        with self.world.lab.inside("cluster"):
            try:
                with urllib.request.urlopen(f"http://{self.pod_ip}:8080/readyz", timeout=5) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = self.readyz()
                # Ready, and the queue from before this start loaded (mta serve loads it in the background).
                log = self.log_path.read_text(errors="replace").rpartition("---- start ")[2]
                if status == 200 and '"event":"spool_loaded"' in log:
                    return
                last = body
            except (OSError, ValueError) as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout}s (last /readyz: {last}):\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        stop_process(self.proc, timeout=timeout)
        return self.proc.returncode

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``mta ARGS -c CONFIG`` on the cluster host (the pod's shell)."""
        with self.world.lab.inside("cluster"):
            return subprocess.run([sys.executable, "-P", "-m", "mta.cli", *args, "-c", str(self.config_path)],
                                  cwd=self.workdir, capture_output=True, text=True, timeout=timeout)

    def queue_list(self) -> list[dict[str, Any]]:
        done = self.cli("queue", "list", "--json")
        assert done.returncode == 0, f"{self.name}: mta queue list: {done.stdout}{done.stderr}"
        items: list[dict[str, Any]] = json.loads(done.stdout)
        return items

    def wait_queue(self, predicate: Any, timeout: float = 30.0, what: str = "queue condition") -> list[Any]:
        deadline = time.monotonic() + timeout
        items: list[Any] = []
        while time.monotonic() < deadline:
            items = self.queue_list()
            if predicate(items):
                return items
            time.sleep(0.3)
        raise TimeoutError(f"{self.name}: {what} not reached in {timeout}s; queue: {json.dumps(items)[:3000]}")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log_lines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict) and "event" in item and (name is None or item["event"] == name):
                    found.append(item)
        return found

    def wait_event(self, name: str, timeout: float = 30.0, **match: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for item in self.events(name):
                if all(str(item.get(k)) == v for k, v in match.items()):
                    return item
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: no {name} event with {match} in {timeout}s")

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_lines()[-n:])


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lab = Lab()
        self.dns: KnotServer | None = None
        self.postfix: PostfixServer | None = None
        self.sinks: dict[str, SmtpSink] = {}
        self.pods: dict[str, Pod] = {}
        self.others: list[Any] = []
        self.kube: FakeKubeApi | None = None
        self.dkim_record = ""
        self.ca = trustme.CA()
        self.ca_path = root / "ca.pem"
        self._marks: dict[str, int] = {}

    # -- building ---------------------------------------------------------

    def build(self) -> None:
        self.lab.build(HOSTS)
        self.dkim_record = self._keygen()
        with self.lab.inside("dns"):
            self.dns = KnotServer(DNS_IP, self.root / "dns", ZONES)
            self.dns.start(base_records(self.dkim_record))
        with self.lab.inside("mx-postfix"):
            self.postfix = PostfixServer(POSTFIX_IP, 25, POSTFIX_DOMAINS, self.root / "postfix")
            self.postfix.start()
        self.sink("mx-flaky")
        self.sink("mx-reject", ["-f", "RCPT"])
        # The Kubernetes API is the one peer nothing real can stand in for
        # here; the pods reach it on the cluster host's loopback.
        with self.lab.inside("cluster"):
            self.kube = FakeKubeApi("127.0.0.1")
            self.kube.start()
        self.kube.add_statefulset(KUBE_NAMESPACE, STATEFULSET, len(PODS))
        self._pods()

    def _keygen(self) -> str:
        key = self.root / "dkim.pem"
        done = subprocess.run([sys.executable, "-P", "-m", "mta.cli", "dkim", "keygen", "--domain", SENDER_DOMAIN,
                               "--selector", SELECTOR, "--type", "rsa", "--out", str(key)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def sink(self, host: str, extra_args: list[str] | None = None) -> SmtpSink:
        workdir = self.root / host
        workdir.mkdir(exist_ok=True)
        sink = SmtpSink(HOSTS[host][0], 25, workdir, list(extra_args or []))
        self.sinks[host] = sink
        with self.lab.inside(host):
            sink.start()
        return sink

    def restart_sink(self, host: str, extra_args: list[str]) -> SmtpSink:
        sink = self.sinks[host]
        with self.lab.inside(host):
            sink.restart(extra_args)
        return sink

    def pod_config(self, name: str) -> dict[str, Any]:
        pod_ip = PODS[name]["pod_ip"]
        tls = {"cert_file": str(self.root / "tls.crt"), "key_file": str(self.root / "tls.key")}
        return {
            "spool": {"path": str(self.root / name / "spool")},
            "listeners": [{"name": "submission", "address": f"{pod_ip}:587", "mode": "submission", "tls": tls,
                           "auth": {"credentials_file": str(self.root / "credentials")}}],
            "dns": {"nameservers": [DNS_IP], "timeout": "2s"},
            # The mini internet uses documentation ranges, which are not global addresses.
            "delivery": {"connect_timeout": "5s", "command_timeout": "30s", "allowed_networks": ["192.0.2.0/24"]},
            "queue": {"retry_initial": "2s", "retry_max": "4s", "retry_jitter": 0},
            "dkim": {"keys": [{"domain": SENDER_DOMAIN, "selector": SELECTOR,
                               "key_file": str(self.root / "dkim.pem")}]},
            "identity": {
                "pod_name": name,
                "pods": {n: {"source_address": p["egress"], "hostname": p["helo"]} for n, p in PODS.items()},
                "enforce": True,
                "check_interval": "1s",
                "dnsbl_zones": [BLOCKLIST],
                "probe": f"{HOSTS['mx-reject'][0]}:25",
            },
            "http": {"address": f"{pod_ip}:8080"},
            "kubernetes": {"enabled": True, "api_url": self.kube.url if self.kube else None,
                           "namespace": KUBE_NAMESPACE, "pod_name": name, "pod_uid": f"uid-{name}"},
            # Every pod that stays is mta-0 in this two-pod world.
            "drain": {"listen": f"{pod_ip}:8025", "secret_file": str(self.root / "drain-secret"),
                      "peer_address": f"{PODS['mta-0']['pod_ip']}:8025", "timeout": "30s"},
            "limits": {"auth_failure_delay": "0.1s"},
            "shutdown": {"timeout": "5s"},
            "log": {"level": "info", "format": "json"},
        }

    def _pods(self) -> None:
        cert = self.ca.issue_cert("mail.kubemta.test", *(p["pod_ip"] for p in PODS.values()))
        cert.private_key_pem.write_to_path(str(self.root / "tls.key"))
        with (self.root / "tls.crt").open("wb") as out:
            for blob in cert.cert_chain_pems:
                out.write(blob.bytes())
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        (self.root / "credentials").write_text("")
        (self.root / "drain-secret").write_text(secrets.token_hex(32))
        for name in PODS:
            self.pods[name] = Pod(self, name, self.pod_config(name))
        done = subprocess.run([sys.executable, "-P", "-m", "mta.cli", "user", "add", "app", "-c",
                               str(self.pods["mta-0"].config_path), "--listener", "submission"],
                              input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        for pod in self.pods.values():
            pod.start()

    # -- using ------------------------------------------------------------

    def publish(self, records: list[str]) -> None:
        assert self.dns is not None
        with self.lab.inside("dns"):
            self.dns.publish(records)

    def restore_dns(self) -> None:
        self.publish(base_records(self.dkim_record))

    def submit(self, to: list[str], *, pod: str = "mta-0", subject: str = "e2e", body: str = "Hello from e2e.",
               sender: str = SENDER, headers: list[str] | None = None) -> str:
        """swaks on the app host: STARTTLS, AUTH PLAIN, one message; returns kubemta's queue id."""
        argv = ["swaks", "--server", f"{PODS[pod]['pod_ip']}:587", "--helo", "app.test", "--tls",
                "--tls-verify", "--tls-ca-path", str(self.ca_path), "--auth", "PLAIN", "--auth-user", "app",
                "--auth-password", PASSWORD, "--from", sender, "--header", f"Subject: {subject}",
                "--header", f"From: Billing <{sender}>", "--body", body, "--timeout", "30",
                "--to", ",".join(to)]
        for header in headers or []:
            argv += ["--header", header]
        with self.lab.inside("app"):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        match = re.search(r"<~  250 .*queued as (\S+)", done.stdout)
        if done.returncode != 0 or not match:
            raise AssertionError(f"swaks on app to {pod} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return match.group(1)

    def resolve(self, name: str, rdtype: str) -> list[str]:
        """Ask the test DNS directly (from the app host)."""
        query = dns.message.make_query(name, dns.rdatatype.from_text(rdtype))
        with self.lab.inside("app"):
            answer = dns.query.udp(query, DNS_IP, port=53, timeout=3)
        return [rdata.to_text() for rrset in answer.answer for rdata in rrset]

    def ensure_pods(self) -> None:
        """Bring back a pod a test stopped, and wait until both are ready."""
        for pod in self.pods.values():
            if not pod.running():
                pod.start(wait=False)
        for pod in self.pods.values():
            pod.wait_ready()

    # -- what each host said ---------------------------------------------

    def _logs(self) -> dict[str, Path]:
        logs: dict[str, Path] = {f"cluster/{name}": pod.log_path for name, pod in self.pods.items()}
        if self.dns is not None:
            logs["dns/knotd"] = self.dns.log_path
        if self.postfix is not None:
            logs["mx-postfix/postfix"] = self.postfix.log_path
        for host, sink in self.sinks.items():
            logs[f"{host}/smtp-sink"] = sink.workdir / "sink.err"
        for other in self.others:
            if hasattr(other, "logs"):
                logs.update(other.logs())
        return logs

    def mark(self) -> None:
        self._marks = {}
        for name, path in self._logs().items():
            with contextlib.suppress(OSError):
                self._marks[name] = path.stat().st_size

    def report(self, limit: int = 60) -> str:
        parts = []
        for name, path in self._logs().items():
            try:
                with path.open("rb") as f:
                    f.seek(self._marks.get(name, 0))
                    lines = f.read().decode(errors="replace").splitlines()
            except OSError:
                continue
            if name.startswith("cluster/"):
                # Passing self-checks run every second; only the failing ones tell anything.
                lines = [line for line in lines if '"event":"self_check"' not in line or '"status":"pass"' not in line]
            if lines:
                shown = lines[-limit:]
                more = f" (last {limit} of {len(lines)})" if len(lines) > limit else ""
                parts.append(f"==== {name} said{more}:\n" + "\n".join(shown))
        for host, sink in self.sinks.items():
            with contextlib.suppress(OSError):
                got = [f"  from {m.client_addr} helo={m.helo} <{m.sender}> -> {m.recipients}"
                       for m in sink.messages()]
                if got:
                    parts.append(f"==== {host} received (all dumps):\n" + "\n".join(got[-20:]))
        return "\n".join(parts)

    def close(self) -> list[str]:
        errors: list[str] = []
        for pod in self.pods.values():
            try:
                pod.stop()
            except Exception as exc:  # noqa: BLE001 -- keep tearing down
                errors.append(f"{pod.name}: {exc}")
        stoppers = [*(s.stop for s in self.sinks.values()), *(o.stop for o in self.others)]
        if self.postfix is not None:
            stoppers.append(self.postfix.stop)
        if self.dns is not None:
            stoppers.append(self.dns.stop)
        if self.kube is not None:
            stoppers.append(self.kube.stop)
        for stop in stoppers:
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 -- keep tearing down
                errors.append(f"{stop}: {exc}")
        errors += self.lab.destroy()
        return errors
