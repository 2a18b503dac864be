"""Wiring of workload identity: the token check, the pod directory and the policy lookup, built once.

``build`` returns the process's ``WorkloadIdentity`` (``mta.policy.workloads``)
and the ``PodDirectory`` it reads (``mta.k8s.pods``, started here and
stopped by the caller), or None where neither ``service_accounts.enabled``
nor a listener's ``identify_pods`` asks for them.

Failure: none of its own; the config has already refused combinations that
cannot work (token reviews or a pod watch without ``kubernetes.enabled``).
"""

from __future__ import annotations

from mta.auth import workload
from mta.config import Config
from mta.k8s.api import KubeApi
from mta.k8s.pods import PodDirectory
from mta.policy.workloads import WorkloadIdentity


def build(config: Config, api: KubeApi | None) -> tuple[WorkloadIdentity | None, PodDirectory | None]:
    pods_wanted = any(item.identify_pods for item in config.listeners)
    if not config.service_accounts.enabled and not pods_wanted:
        return None, None
    tokens = workload.build(config.service_accounts, api)
    pods = None
    if pods_wanted:
        assert api is not None  # the config requires kubernetes.enabled for identify_pods
        pods = PodDirectory(api, config.service_accounts.pod_namespaces)
        pods.start()
    labels = api.namespace_labels if api is not None else None
    return WorkloadIdentity(config.accounts, tokens, pods, labels), pods
