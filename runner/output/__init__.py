"""Where rows land: commit, ledger, lock, manifest, report, export."""
