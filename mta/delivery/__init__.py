"""Outbound delivery: where mail for a domain goes and one attempt to send it.

Delivery reports, the scheduler decides: nothing here sleeps, retries later
or touches the spool.  Every attempt ends in an ``Outcome`` per recipient.
"""
