"""Network builders, one per module, registered with their capabilities in `registry`."""
