"""Counters that express a policy, held where every process of the deployment sees them.

``mta.limits.store`` is the interface and the in-process store (one pod, the
default); ``mta.limits.redis_store`` keeps the same counters in Redis (or
Valkey) for a deployment of several pods; ``mta.limits.fallback`` wraps the
shared store so that an unreachable store degrades to local counting
instead of stopping mail.
"""
