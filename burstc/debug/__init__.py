"""Seeing into burst: run traces (trace.py), compile-time dumps (dump.py), plan rendering
(render.py) and `python -m burstc explain` (explain.py)."""
