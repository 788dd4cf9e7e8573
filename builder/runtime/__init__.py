"""The runtime tier: code that ships inside the runtime images.

It imports nothing from the image, model or demo tiers (tests/test_tiers.py enforces it), so each
image copies only builder/__init__.py, this package's __init__ and smoke.py, and what it runs.
"""
