"""Engines behind one protocol (engines/base.py); each engine module is imported only where a pool uses it."""
