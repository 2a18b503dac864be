"""Handing queued mail from one pod to another (scale-down, spool rescue).

``wire`` is the signed request format, ``receiver`` the endpoint a pod
takes handoffs on, ``sender`` the client that moves a spool's mail away,
and ``service`` decides at shutdown whether this pod must drain.
"""
