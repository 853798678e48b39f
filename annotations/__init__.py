"""Where each benchmark's (image file, box, expression) entries come from: TransVG's split files (transvg_splits.py)."""
