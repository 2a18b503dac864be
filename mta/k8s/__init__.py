"""The Kubernetes side of the MTA: who this pod is, what its StatefulSet wants, Events.

``identity`` works out the pod's name, ordinal and StatefulSet from the
configuration (the downward API) or the host name; ``api`` talks to the API
server with the official ``kubernetes`` client.  Nothing here is needed
outside a cluster: with ``kubernetes.enabled: false`` none of it runs.
"""
