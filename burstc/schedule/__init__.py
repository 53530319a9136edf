"""The ring plan as data: layouts, topology, per-pair work, cost model."""
