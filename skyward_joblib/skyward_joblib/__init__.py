"""Skyward's joblib plugin (filled in by the joblib backend work)."""
