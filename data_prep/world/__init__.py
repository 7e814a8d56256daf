"""Procedural synthetic world written in the real nuScenes on-disk format (see data_prep/synthetic_world.py)."""
