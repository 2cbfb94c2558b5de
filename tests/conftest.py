"""Shared fixtures: the real server on port 0, temp stores, data folder location."""
