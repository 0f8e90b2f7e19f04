"""Input files: listing, planning units, reading rows; one module per format, registered in formats.py."""
