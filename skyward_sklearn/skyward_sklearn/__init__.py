"""Skyward's scikit-learn plugin (filled in by the sklearn work)."""
