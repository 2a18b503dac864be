"""This pod's entry of ``identity.pods``, applied to the configuration.

One configuration serves every pod of a StatefulSet; ``identity.pods`` maps
pod names to what differs between them (egress address, HELO name).  Owns
working out which pod this is (``identity.pod_name``, else
``kubernetes.pod_name``, else ``$POD_NAME``, else the host name) and the
configuration that pod runs with.  ``mta.config.load`` calls it, so every
command sees the same tree; it imports the configuration's types for type
checking only, because the loader imports this module.

Failure: none of its own; a pod without an entry keeps the shared values.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mta.config import Config


def with_pod_identity(config: Config, environ: Mapping[str, str]) -> Config:
    """Apply ``identity.pods.<this pod>``: its egress address and HELO name win."""
    pod_name = (config.identity.pod_name or config.kubernetes.pod_name or environ.get("POD_NAME")
                or socket.gethostname())
    pod = config.identity.pods.get(pod_name)
    egress = config.identity.egress_address or (pod and pod.source_address) or config.delivery.source_address
    identity = config.identity.model_copy(update={"pod_name": pod_name, "egress_address": egress})
    update: dict[str, Any] = {"identity": identity}
    if pod is not None:
        if pod.hostname:
            update["hostname"] = pod.hostname
        if pod.source_address and pod.bind:
            update["delivery"] = config.delivery.model_copy(update={"source_address": pod.source_address})
    return config.model_copy(update=update)
