"""The replica actor and its continuous-batching loop."""
