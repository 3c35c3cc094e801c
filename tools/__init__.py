"""Operator tools that drive roomcast's own code (the simulator; the CLI moves here later)."""
