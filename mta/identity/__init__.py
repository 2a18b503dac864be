"""The pod's identity on the internet (egress address, HELO name) and its self-checks."""
