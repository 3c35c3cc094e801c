"""Developer and operator tooling around the runtime kernel: the local stack (`roomcast up`), the
`roomcast` commands beyond `migrate`, the operator checks, the simulator, the storage checker of the
fault tests. Nothing in shared/, gateway/, persister/ or sweeper/ imports it; the service image does
not ship it."""
