"""Ray: starting it, placing replicas, supervising workers, remote submission."""
