"""Hearing back: signed return paths, and the reports (DSNs, complaints) that arrive on them."""
