"""The commands: `python main.py`, `python scripts/<name>.py` and the `catversion-*` console commands run these."""
