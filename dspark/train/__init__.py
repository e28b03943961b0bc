"""On-policy DSpark draft training: data, objective, loop."""
