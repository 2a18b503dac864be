"""This pod's identity: name, namespace, StatefulSet and ordinal.

A StatefulSet pod is named ``<statefulset>-<ordinal>`` and its host name is
the pod name, so both come from ``kubernetes.pod_name`` (set from the
downward API) or, failing that, the host name.  Failure: ``IdentityError``
when the name has no ``-<ordinal>`` suffix and no StatefulSet is configured.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from mta.config import KubernetesConfig

_ORDINAL = re.compile(r"^(?P<set>.+)-(?P<ordinal>\d+)$")


class IdentityError(Exception):
    pass


@dataclass(frozen=True)
class PodIdentity:
    name: str
    namespace: str
    statefulset: str
    ordinal: int
    uid: str | None = None


def pod_identity(config: KubernetesConfig, hostname: str | None = None) -> PodIdentity:
    """The identity of this pod from ``config``, else from the host name."""
    name = config.pod_name or hostname or socket.gethostname()
    name = name.split(".", 1)[0]
    match = _ORDINAL.match(name)
    if match is None:
        raise IdentityError(f"pod name {name!r} does not end in -<ordinal>; is this a StatefulSet pod?")
    statefulset = config.statefulset or match.group("set")
    if config.statefulset and not name.startswith(config.statefulset + "-"):
        raise IdentityError(f"pod {name!r} is not a pod of StatefulSet {config.statefulset!r}")
    return PodIdentity(name=name, namespace=config.namespace, statefulset=statefulset,
                       ordinal=int(match.group("ordinal")), uid=config.pod_uid)
