"""Leaf utilities: file names and atomic writes. Nothing here imports the rest of the package."""
