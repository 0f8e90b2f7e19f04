"""The queue of units: leases, attempts, progress."""
