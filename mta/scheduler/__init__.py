"""Deciding what is tried when, and what happens after each attempt."""
