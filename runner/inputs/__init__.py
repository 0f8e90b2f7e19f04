"""Input files: listing, planning units, reading rows, one module per format."""
