"""Latency of per-layer widths on a target device: profiled tables and analytical rooflines.

Depends on nothing else of hwprune: it sees layer shapes as plain numbers.
"""
