"""Test support shared by every service: real servers on free ports (pytest plugin in fixtures)."""
