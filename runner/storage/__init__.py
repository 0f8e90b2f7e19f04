"""Every byte through fsspec URLs: locations, retries, conditional writes."""
