"""Every overlay, scenario and component combination: rendered, schema-valid, and holding to policy.

Renders with the real ``kubectl kustomize``; validates every object against
the Kubernetes OpenAPI schemas offline (``kubernetes-validate``, strict) for
the oldest and newest minor docs/kubernetes.md supports; then checks the
rules the manifests exist for: the restricted Pod Security profile, probes,
resources, the spool's retention policy, the grace period against the drain
deadline, the Role, the NetworkPolicy allow-list, and that the embedded
``mta.yaml`` (with the pod's environment) passes ``mta check-config``.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import trustme
import yaml

ROOT = Path(__file__).resolve().parents[2]
OLDEST, NEWEST = "1.27.0", "1.37.0"  # keep in step with docs/kubernetes.md
OVERLAYS = sorted(p.name for p in (ROOT / "kustomize/overlays").iterdir() if p.is_dir())
SCENARIOS = sorted(p.name for p in (ROOT / "kustomize/tests").iterdir() if p.is_dir())
COMPONENTS = sorted(p.name for p in (ROOT / "kustomize/components").iterdir() if p.is_dir())
EXCLUSIVE = {"direct-delivery", "smarthost-relay"}  # two ways out: never both
# Components that add objects of their own and only an env entry and a volume to the StatefulSet:
# rendered with every combination of the others, all of them at once or none (each alone below),
# instead of doubling the combinations each.
ADDITIVE = ("pod-identity", "probe", "shared-limits", "workload-identity")
CRDS = {("cilium.io/v2", "CiliumEgressGatewayPolicy"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"), ("cert-manager.io/v1", "Certificate"),
        ("cert-manager.io/v1", "Issuer")}
LABELS = {"app.kubernetes.io/name": "kubemta", "app.kubernetes.io/component": "mta"}
# What an egress rule to "anywhere" must leave out: every private, shared,
# link-local (cloud metadata) and loopback range, per family.
PRIVATE_SPACE = {
    "0.0.0.0/0": {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
                  "127.0.0.0/8"},
    "::/0": {"fc00::/7", "fe80::/10", "::ffff:0:0/96", "::1/128"},
}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render the manifests", pytrace=False)
    return path


@functools.cache
def render_dir(path: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run([kubectl(), "kustomize", "--load-restrictor", "LoadRestrictionsNone", path],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {path}:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def combination_dir(tmp_root: Path, components: tuple[str, ...]) -> str:
    target = tmp_root / ("base" if not components else "+".join(components))
    target.mkdir(parents=True, exist_ok=True)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": [os.path.relpath(ROOT / "manifests", target)],
                     "components": [os.path.relpath(ROOT / "kustomize/components" / c, target) for c in components]}
    (target / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return str(target)


def all_combinations() -> list[tuple[str, ...]]:
    core = [name for name in COMPONENTS if name not in ADDITIVE]
    combos: list[tuple[str, ...]] = []
    for size in range(len(core) + 1):
        for combo in itertools.combinations(core, size):
            if not set(combo) >= EXCLUSIVE:
                combos += [combo, (*combo, *ADDITIVE)]
    return combos + [(name,) for name in ADDITIVE]


def targets() -> list[tuple[str, str]]:
    return ([("manifests", str(ROOT / "manifests"))]
            + [(f"overlays/{o}", str(ROOT / "kustomize/overlays" / o)) for o in OVERLAYS]
            + [(f"tests/{s}", str(ROOT / "kustomize/tests" / s)) for s in SCENARIOS])


TARGETS = targets()


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def validate(docs: tuple[dict[str, Any], ...], where: str, seen: set[str] | None = None) -> None:
    """Each object against both schemas; ``seen``: objects already validated (rendered alike elsewhere)."""
    for doc in docs:
        if seen is not None:
            key = json.dumps(doc, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
        for version in (OLDEST, NEWEST):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert (doc["apiVersion"], doc["kind"]) in CRDS, f"{where}: no schema for {doc['kind']}"
                assert doc["metadata"]["name"] and isinstance(doc.get("spec"), dict)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {exc}")


# -- rendering and schemas ------------------------------------------------------


@pytest.mark.parametrize(("name", "path"), TARGETS, ids=[t[0] for t in TARGETS])
def test_renders_and_validates_strictly(name: str, path: str) -> None:
    docs = render_dir(path)
    assert find(docs, "StatefulSet", "kubemta"), name
    validate(docs, name)


def test_every_component_combination_renders_and_validates(tmp_path: Path) -> None:
    combos = all_combinations()
    core = len(COMPONENTS) - len(ADDITIVE)
    assert set(ADDITIVE) <= set(COMPONENTS)
    assert len(combos) == 2 * (2 ** core - 2 ** (core - 2)) + len(ADDITIVE)
    # kubectl renders in parallel; an object rendered alike in many combinations is validated once.
    with ThreadPoolExecutor(4) as pool:
        rendered = list(pool.map(lambda combo: render_dir(combination_dir(tmp_path, combo)), combos))
    seen: set[str] = set()
    for combo, docs in zip(combos, rendered, strict=True):
        validate(docs, "+".join(combo) or "base", seen)
        check_pod_policy(docs, "+".join(combo))
        check_network_policy(docs)
    assert len(seen) < sum(len(docs) for docs in rendered)  # the combinations do share objects


def test_the_validator_is_strict() -> None:
    docs = render_dir(str(ROOT / "manifests"))
    [sts] = find(docs, "StatefulSet")
    broken = json.loads(json.dumps(sts))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST, strict=True)


def test_every_component_has_a_readme_and_is_a_component() -> None:
    for name in COMPONENTS:
        folder = ROOT / "kustomize/components" / name
        assert (folder / "README.md").read_text().strip(), name
        assert yaml.safe_load((folder / "kustomization.yaml").read_text())["kind"] == "Component", name


# -- policy ------------------------------------------------------------------------


def pod_specs(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for doc in docs:
        if doc["kind"] in ("StatefulSet", "Deployment", "Job", "DaemonSet"):
            out.append((f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
        if doc["kind"] == "CronJob":
            out.append((f"CronJob/{doc['metadata']['name']}", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def check_pod_policy(docs: tuple[dict[str, Any], ...], where: str) -> None:
    """The restricted Pod Security profile and resources, for every pod template."""
    for name, spec in pod_specs(docs):
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, f"{where} {name}: runAsNonRoot"
        assert pod_sc.get("runAsUser", 1) != 0
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where} {name}: seccomp"
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), f"{where} {name}: {flag}"
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, f"{where} {name}: volume type {kinds}"
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container.get("securityContext", {})
            label = f"{where} {name}/{container['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation"
            assert sc.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}: capabilities"
            assert not sc.get("capabilities", {}).get("add"), f"{label}: added capabilities"
            assert not sc.get("privileged"), label
            assert sc.get("runAsUser", 1) != 0, label
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{label}: resources.{part}"


def effective_config(docs: tuple[dict[str, Any], ...], tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The StatefulSet's mta.yaml and environment, secret paths moved under ``tmp_path``."""
    [sts] = find(docs, "StatefulSet", "kubemta")
    [container] = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "mta"]
    env_list = container.get("env", [])
    config_path = next(e["value"] for e in env_list if e["name"] == "MTA_CONFIG")
    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    [configmap] = find(docs, "ConfigMap", volume["configMap"]["name"])
    text = configmap["data"][config_path.rsplit("/", 1)[1]]
    env = {}
    for item in env_list:
        if item["name"] == "MTA_CONFIG":
            continue
        if "value" in item:
            env[item["name"]] = item["value"]
        else:  # the downward API: values a real pod would have
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = {"metadata.name": "kubemta-0", "metadata.namespace": "mail",
                                 "metadata.uid": "00000000-0000-0000-0000-000000000000"}[field]
    stand_in = tmp_path / "etc-kubemta"
    # mta check-config loads what mta serve would: each stand-in has the form of the Secret it replaces.
    authority = trustme.CA()
    served = authority.issue_cert("mta.example.com")
    contents = {"tls.crt": served.cert_chain_pems[0].bytes(), "tls.key": served.private_key_pem.bytes(),
                "credentials": b"relay-user:relay-password\n"}

    def move(value: str) -> str:
        for path in re.findall(r"/etc/kubemta/[\w./-]+", value):
            target = stand_in / path.removeprefix("/etc/kubemta/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(contents.get(target.name, b"x" * 64))
            target.chmod(0o600)
        return value.replace("/etc/kubemta/", f"{stand_in}/")

    out = tmp_path / "mta.yaml"
    out.write_text(move(text))
    return out, {k: move(v) for k, v in env.items()}


def check_config(docs: tuple[dict[str, Any], ...], tmp_path: Path) -> dict[str, Any]:
    path, env = effective_config(docs, tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MTA")}
    done = subprocess.run([sys.executable, "-P", "-m", "mta.cli", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, env={**base, **env}, cwd=tmp_path)
    assert done.returncode == 0, f"mta check-config:\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.mark.parametrize(("name", "path"), TARGETS, ids=[t[0] for t in TARGETS])
def test_policy(name: str, path: str, tmp_path: Path) -> None:
    docs = render_dir(path)
    check_pod_policy(docs, name)
    check_network_policy(docs, name)
    check_egress_identity(docs, name)
    [sts] = find(docs, "StatefulSet", "kubemta")
    spec = sts["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    [claim] = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "kubemta"
    assert pod["affinity"]["podAntiAffinity"]
    [mta] = [c for c in pod["containers"] if c["name"] == "mta"]
    assert {m["mountPath"] for m in mta["volumeMounts"]} >= {"/var/spool/kubemta", "/tmp"}
    ports = {p["name"]: p["containerPort"] for p in mta["ports"]}
    assert all(port > 1024 for port in ports.values()), "unprivileged container ports only"
    assert mta["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert mta["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert mta["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert ports[mta[probe]["httpGet"]["port"]] == 8080

    config = check_config(docs, tmp_path)
    assert config["http"]["address"].endswith(":8080")
    assert config["spool"]["path"] == "/var/spool/kubemta"
    listener_ports = {int(item["address"].rsplit(":", 1)[1]) for item in config["listeners"]}
    assert listener_ports <= set(ports.values()), "every listener has a container port"
    assert config["kubernetes"]["enabled"] and config["drain"]["listen"].endswith(":8025")
    # Listeners keep accepting until the endpoints have moved on: a preStop delay before SIGTERM.
    pre_stop = mta["lifecycle"]["preStop"]["exec"]["command"]
    delay = float(re.fullmatch(r"import time; time.sleep\((\d+(?:\.\d+)?)\)", pre_stop[-1]).group(1))
    assert pre_stop[:2] == ["python3", "-c"] and 5 <= delay <= 30
    # The kubelet's SIGKILL must not cut a drain short.
    budget = delay + config["shutdown"]["timeout"] + config["drain"]["timeout"] + \
        2 * config["kubernetes"]["timeout"]
    assert pod["terminationGracePeriodSeconds"] > budget
    # Spread over zones (a preference, never unschedulable) besides hosts.
    [spread] = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"] == {"matchLabels": LABELS}
    [budget_object] = find(docs, "PodDisruptionBudget", "kubemta")
    assert budget_object["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert budget_object["spec"]["selector"] == {"matchLabels": LABELS}
    # The recommended labels on the objects and the pods, never in selectors.
    expected_instance = f"kubemta-{name.removeprefix('overlays/')}" if name.startswith("overlays/") else "kubemta"
    for item in (sts["metadata"], spec["template"]["metadata"], budget_object["metadata"]):
        labels = item["labels"]
        assert labels["app.kubernetes.io/instance"] == expected_instance, (name, labels)
        assert labels["app.kubernetes.io/part-of"] == "kubemta" and labels["app.kubernetes.io/managed-by"] == \
            "kustomize" and labels["app.kubernetes.io/version"], labels
    assert spec["selector"] == {"matchLabels": LABELS}

    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    assert services["kubemta-headless"]["spec"]["clusterIP"] == "None"
    front = {p["port"]: p["targetPort"] for p in services["kubemta"]["spec"]["ports"]}
    assert front[25] == "relay" and front[587] == "submission"
    if 465 in front:
        assert front[465] == "submissions" and "submissions" in ports
        assert any(item["mode"] == "submissions" for item in config["listeners"])
    for name in ("kubemta", "kubemta-headless"):
        assert services[name]["spec"]["selector"] == LABELS

    [role] = find(docs, "Role", "kubemta")
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["statefulsets"], "resourceNames": ["kubemta"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    ]
    [binding] = find(docs, "RoleBinding", "kubemta")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    [pdb] = find(docs, "PodDisruptionBudget", "kubemta")
    assert pdb["spec"]["selector"]["matchLabels"] == LABELS

    images = {c["image"] for _, s in pod_specs(docs) for c in s["containers"] if "kubemta" in c["image"]}
    assert len(images) == 1 and ":" in next(iter(images)), f"one pinned kubemta image: {images}"
    for hpa in find(docs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "kubemta"}
        assert all(p["type"] == "Pods" and p["value"] == 1 for p in hpa["spec"]["behavior"]["scaleDown"]["policies"])


def test_overlays_have_the_replicas_and_routes_they_promise(tmp_path: Path) -> None:
    want = {"dev": (1, "mail-capture:1025"), "staging": (2, "smtp.esp.example:587"), "production": (3, None)}
    assert set(OVERLAYS) == set(want)
    for overlay, (replicas, relay) in want.items():
        docs = render_dir(str(ROOT / "kustomize/overlays" / overlay))
        [sts] = find(docs, "StatefulSet", "kubemta")
        assert sts["spec"]["replicas"] == replicas, overlay
        config = check_config(docs, tmp_path / overlay)
        assert [r["relay"] for r in config["routes"]] == ([relay] if relay else []), overlay
    production = render_dir(str(ROOT / "kustomize/overlays/production"))
    assert len(find(production, "CiliumEgressGatewayPolicy")) == 3
    assert find(production, "ServiceMonitor") and find(production, "Certificate")
    [ns] = find(production, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_handoff_tls_reaches_every_pod_and_the_rescue_job(tmp_path: Path) -> None:
    docs = render_dir(str(ROOT / "kustomize/tests/smarthost-autoscaling-rescue"))
    config = check_config(docs, tmp_path)
    tls = config["drain"]["tls"]
    assert tls["server_name"] == "kubemta-handoff" and tls["client_ca_file"] == tls["ca_file"]
    [certificate] = find(docs, "Certificate", "kubemta-handoff")
    assert certificate["spec"]["dnsNames"] == [tls["server_name"]]
    assert set(certificate["spec"]["usages"]) == {"server auth", "client auth"}
    assert certificate["spec"]["issuerRef"] == {"kind": "Issuer", "name": "kubemta-handoff-ca"}
    [ca_issuer] = find(docs, "Issuer", "kubemta-handoff-ca")
    [ca] = find(docs, "Certificate", "kubemta-handoff-ca")
    assert ca["spec"]["isCA"] and ca_issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
    for label, spec in pod_specs(docs):
        if label not in ("StatefulSet/kubemta", "Job/kubemta-spool-rescue"):
            continue
        [container] = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert "server_name: kubemta-handoff" in env["MTA__DRAIN__TLS"], label
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert mounts["handoff-tls"] == "/etc/kubemta/handoff-tls", label
        assert volumes["handoff-tls"]["secret"]["secretName"] == certificate["spec"]["secretName"], label


def test_embedded_base_config_passes_check_config(tmp_path: Path) -> None:
    check_config(render_dir(str(ROOT / "manifests")), tmp_path)


# -- network policy ------------------------------------------------------------------


def _ports(rule: dict[str, Any]) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])}


def internet_egress(docs: tuple[dict[str, Any], ...]) -> list[str]:
    """Names of the NetworkPolicies that let something out to any address."""
    return [p["metadata"]["name"] for p in find(docs, "NetworkPolicy")
            for rule in p["spec"].get("egress", []) for peer in rule.get("to", [])
            if peer.get("ipBlock", {}).get("cidr") in PRIVATE_SPACE]


def check_network_policy(docs: tuple[dict[str, Any], ...], target: str = "") -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}
    deny = policies["kubemta-default-deny"]
    assert deny["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kubemta"}}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny.get("ingress") and not deny.get("egress")
    ingress: set[tuple[str, int]] = set()
    for name, spec in policies.items():
        selected = spec["podSelector"].get("matchLabels", {})
        if selected.get("app.kubernetes.io/name") == "kubemta-redis":
            check_limits_store_policy(name, spec)
            continue
        if selected.get("app.kubernetes.io/name") == "kubemta-probe":
            check_probe_policy(name, spec)
            continue
        assert selected.get("app.kubernetes.io/name") in ("kubemta", None) or name.startswith("mail-")
        for rule in spec.get("ingress", []):
            ports = _ports(rule)
            if not name.startswith("mail-"):  # the MTA's own ports; Mailpit's policy is checked in its test
                ingress |= ports
            assert rule.get("from"), f"{name}: an ingress rule without 'from' admits everyone"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, f"{name}: ingress by address"
                if ports & {("TCP", 2525), ("TCP", 2587), ("TCP", 2465), ("TCP", 8443)}:
                    labels = {**peer.get("namespaceSelector", {}).get("matchLabels", {}),
                              **peer.get("podSelector", {}).get("matchLabels", {})}
                    assert labels == {"kubemta.io/mail-client": "true"}, f"{name}: SMTP or the API from {peer}"
                if ("TCP", 8080) in ports:
                    assert peer == {"namespaceSelector": {"matchLabels": {
                        "kubernetes.io/metadata.name": "monitoring"}}}, f"{name}: metrics from {peer}"
                if ("TCP", 8025) in ports:
                    assert peer == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubemta"}}}
        for rule in spec.get("egress", []):
            ports = _ports(rule)
            assert rule.get("to") and ports, f"{name}: an egress rule must name peers and ports"
            for peer in rule["to"]:
                block = peer.get("ipBlock")
                if block and block["cidr"] in PRIVATE_SPACE:
                    excluded = set(block.get("except", []))
                    missing = PRIVATE_SPACE[block["cidr"]] - excluded
                    assert not missing, f"{name}: {block['cidr']} must exclude {sorted(missing)}"
                    assert ports <= {("TCP", 25), ("TCP", 443), ("TCP", 587)}, f"{name}: {ports}"
                    # Every way to the Internet exists for both families, or IPv6 mail is refused silently.
                    other = {"0.0.0.0/0": "::/0", "::/0": "0.0.0.0/0"}[block["cidr"]]
                    assert any(p.get("ipBlock", {}).get("cidr") == other for p in rule["to"]), \
                        f"{name}: {block['cidr']} without {other}"
                elif block:
                    assert ports <= {("TCP", 443), ("TCP", 6443), ("TCP", 587)}, f"{name}: {ports}"
                elif ("UDP", 53) in ports:
                    assert ports == {("UDP", 53), ("TCP", 53)}
                    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
                elif peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == \
                        "kubemta-redis":
                    assert ports == {("TCP", 6379)}, f"{name}: {ports} to the limits store"
                else:
                    assert ports <= {("TCP", 8025), ("TCP", 1025)}, f"{name}: {ports} to {peer}"
    base = {("TCP", 2525), ("TCP", 2587), ("TCP", 2465), ("TCP", 8080), ("TCP", 8025)}
    assert base <= ingress <= base | {("TCP", 8443)}  # 8443: the HTTP API (workload-identity)
    egress = {port for spec in policies.values() for rule in spec.get("egress", []) for port in _ports(rule)}
    assert ("UDP", 53) in egress and ("TCP", 53) in egress and ("TCP", 8025) in egress
    if target == "overlays/dev":  # nothing leaves the cluster: Mailpit is the only way out
        assert internet_egress(docs) == [], "dev must have no Internet egress"
        assert ("TCP", 1025) in egress and ("TCP", 25) not in egress and ("TCP", 587) not in egress
    else:
        assert ("TCP", 25) in egress or ("TCP", 587) in egress


def check_limits_store_policy(name: str, spec: dict[str, Any]) -> None:
    """The example Redis: only the MTA pods reach it, on its port; it reaches nothing."""
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and not spec.get("egress"), name
    [rule] = spec["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": LABELS}}] and _ports(rule) == {("TCP", 6379)}, name


def check_probe_policy(name: str, spec: dict[str, Any]) -> None:
    """The probe pod: nothing reaches it; it reaches the MTA's SMTP, DNS, IMAPS and the Pushgateway."""
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and not spec.get("ingress"), name
    for rule in spec["egress"]:
        ports = _ports(rule)
        [peer] = rule["to"]
        if "podSelector" in peer and "namespaceSelector" not in peer:
            assert peer["podSelector"] == {"matchLabels": LABELS} and ports == {("TCP", 2587), ("TCP", 2525)}
        elif "ipBlock" in peer:
            assert ports == {("TCP", 993)} and peer["ipBlock"]["cidr"] not in PRIVATE_SPACE, (name, peer)
        else:
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            assert (namespace, ports) in (("kube-system", {("UDP", 53), ("TCP", 53)}),
                                          ("monitoring", {("TCP", 9091)})), (name, peer, ports)


def test_the_probe_cronjob_runs_mta_probe_with_a_file_that_validates(tmp_path: Path) -> None:
    from mta.config import load_probe

    docs = render_dir(combination_dir(tmp_path, ("probe",)))
    [cron] = find(docs, "CronJob", "kubemta-probe")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    assert pod["metadata"]["labels"]["kubemta.io/mail-client"] == "true"  # the MTA's ingress policy admits it
    [container] = pod["spec"]["containers"]
    assert container["args"][:2] == ["probe", "-c"]
    [configmap] = find(docs, "ConfigMap", "kubemta-probe")
    text = configmap["data"]["probe.yaml"]
    for path in re.findall(r"/etc/kubemta/[\w./-]+", text):  # stand-ins for the Secret's files
        stand_in = tmp_path / "secrets" / Path(path).name
        stand_in.parent.mkdir(exist_ok=True)
        stand_in.write_text("user:password\n")
        text = text.replace(path, str(stand_in))
    (tmp_path / "probe.yaml").write_text(text)
    config = load_probe(tmp_path / "probe.yaml", environ={})
    assert config.submit == "kubemta:587" and config.pushgateway
    deadline = cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert config.timeout < deadline < 300, "a run ends before the next starts"


def test_shared_limits_point_every_pod_at_the_store(tmp_path: Path) -> None:
    docs = render_dir(str(ROOT / "kustomize/tests/shared-limits-redis"))
    config = check_config(docs, tmp_path)
    store = config["limits"]["store"]
    assert store["url"] == "redis://kubemta-redis:6379/0" and store["password_file"].endswith("/password")
    [redis] = find(docs, "StatefulSet", "kubemta-redis")
    [container] = redis["spec"]["template"]["spec"]["containers"]
    [secret] = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    [sts] = find(docs, "StatefulSet", "kubemta")
    [volume] = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "limits-store"]
    assert secret["name"] == volume["secret"]["secretName"] == "kubemta-limits-store"
    assert "--appendonly" in container["args"] and "$(REDIS_PASSWORD)" in container["args"]
    [service] = find(docs, "Service", "kubemta-redis")
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    assert find(docs, "NetworkPolicy", "kubemta-redis") and find(docs, "NetworkPolicy", "kubemta-egress-limits-store")


def test_dev_captures_mail_in_mailpit_with_probes_and_its_own_network_policy() -> None:
    docs = render_dir(str(ROOT / "kustomize/overlays/dev"))
    [capture] = find(docs, "Deployment", "mail-capture")
    [mailpit] = capture["spec"]["template"]["spec"]["containers"]
    assert mailpit["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert mailpit["livenessProbe"]["httpGet"]["path"] == "/livez"
    [policy] = find(docs, "NetworkPolicy", "mail-capture")
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "mail-capture"}}
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and not spec.get("egress")  # reaches nothing
    [rule] = spec["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": LABELS}}]
    assert _ports(rule) == {("TCP", 1025)}
    assert internet_egress(docs) == []


def check_egress_identity(docs: tuple[dict[str, Any], ...], where: str) -> None:
    """Direct delivery: every pod that can exist has an identity entry and a Cilium egress
    policy, and those policies (cluster-wide) select this namespace and carry it in their names."""
    policies = find(docs, "CiliumEgressGatewayPolicy")
    if not policies:
        return
    [sts] = find(docs, "StatefulSet", "kubemta")
    namespace = sts["metadata"].get("namespace", "default")
    [container] = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "mta"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    identities = set(yaml.safe_load(env["MTA__IDENTITY__PODS"]))
    most = max([sts["spec"].get("replicas", 1)] + [h["spec"]["maxReplicas"] for h in find(
        docs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == "kubemta"])
    pods = {f"kubemta-{n}" for n in range(most)}
    assert pods <= identities, f"{where}: up to {most} pods, identities only for {sorted(identities)}"
    selected = set()
    for policy in policies:
        [selector] = policy["spec"]["selectors"]
        labels = selector["podSelector"]["matchLabels"]
        assert labels["io.kubernetes.pod.namespace"] == namespace, f"{where}: {policy['metadata']['name']}"
        pod = labels["statefulset.kubernetes.io/pod-name"]
        assert policy["metadata"]["name"] == f"{namespace}-{pod}", f"{where}: {policy['metadata']['name']}"
        selected.add(pod)
    assert pods <= selected, f"{where}: no egress policy for {sorted(pods - selected)}"


def test_cilium_egress_policy_names_are_unique_across_overlays_and_scenarios() -> None:
    seen: dict[str, str] = {}
    for name, path in TARGETS:
        for policy in find(render_dir(path), "CiliumEgressGatewayPolicy"):
            policy_name = policy["metadata"]["name"]
            assert policy_name not in seen, f"{policy_name} in both {seen[policy_name]} and {name}"
            seen[policy_name] = name
    assert len(seen) >= 6  # production and the direct-everything scenario


def test_workload_identity_takes_tokens_and_pods_instead_of_trusted_networks(tmp_path: Path) -> None:
    docs = render_dir(str(ROOT / "kustomize/tests/workload-identity"))
    config = check_config(docs, tmp_path)
    assert config["service_accounts"]["enabled"] and config["service_accounts"]["verify"] == "tokenreview"
    relay, submission = config["listeners"][:2]
    assert relay["identify_pods"] and relay["trusted_networks"] == []
    assert submission["trusted_networks"] == [] and submission["auth"]["credentials_file"] is None
    assert submission["tls"]["cert_file"].endswith("tls.crt") and config["http_api"]["tls"]
    assert config["http_api"]["address"].endswith(":8443") and config["http_api"]["keys_file"] is None
    assert config["accounts"]["workloads"] and config["accounts"]["workload_selectors"]
    # RBAC: exactly the two verbs the features use, bound to the pod's ServiceAccount in its namespace.
    roles = {r["metadata"]["name"]: r["rules"] for r in find(docs, "ClusterRole")}
    assert roles == {
        "kubemta-tokenreview": [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
                                 "verbs": ["create"]}],
        "kubemta-pod-identity": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
                                 {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]}]}
    for binding in find(docs, "ClusterRoleBinding"):
        assert binding["roleRef"]["name"] == binding["metadata"]["name"] in roles
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubemta", "namespace": "mail-test"}]
    [sts] = find(docs, "StatefulSet", "kubemta")
    [mta] = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "mta"]
    ports = {p["name"]: p["containerPort"] for p in mta["ports"]}
    [service] = find(docs, "Service", "kubemta")
    assert {"name": "api", "port": 8443, "targetPort": "api"} in service["spec"]["ports"] and ports["api"] == 8443
    [certificate] = find(docs, "Certificate", "kubemta-submission")
    assert "kubemta.mail-test.svc" in certificate["spec"]["dnsNames"]
    # Without the components, no ClusterRole at all: the base asks for nothing cluster-wide.
    assert not find(render_dir(str(ROOT / "manifests")), "ClusterRole")


def test_the_example_app_sends_with_a_projected_token_for_kubemtas_audience(tmp_path: Path) -> None:
    docs = render_dir(str(ROOT / "kustomize/components/workload-identity/example-app"))
    validate(docs, "workload-identity/example-app")
    check_pod_policy(docs, "workload-identity/example-app")
    [namespace] = find(docs, "Namespace")
    assert namespace["metadata"]["labels"]["kubemta.io/mail-client"] == "true"  # kubemta's ingress admits it
    [account] = find(docs, "ServiceAccount")
    [deployment] = find(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"] and pod["automountServiceAccountToken"] is False
    [volume] = pod["volumes"]
    [token] = [s["serviceAccountToken"] for s in volume["projected"]["sources"] if "serviceAccountToken" in s]
    config = check_config(render_dir(str(ROOT / "kustomize/tests/workload-identity")), tmp_path)
    assert token["audience"] == config["service_accounts"]["audience"]
    assert 600 <= token["expirationSeconds"] <= 86400  # the API server's bounds for a projected token
    # The identity it sends as is the one the component's example policy names.
    identity = f"{namespace['metadata']['name']}/{account['metadata']['name']}"
    assert identity in config["accounts"]["workloads"]
    [container] = pod["containers"]
    assert "Authorization: Bearer $(cat /var/run/secrets/kubemta/token)" in container["args"][0]
    [policy] = find(docs, "NetworkPolicy")
    assert {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]} == {8443, 53}
