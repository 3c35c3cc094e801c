"""`roomcast simulate`: weeks of chat traffic against the real persister, sweeper, chunk mover and
history reader, on a Redis of its own and a MySQL database of its own, with an injected clock.

workload.py (what users do, pure) -> broker.py (the records Kafka would hand the persister) ->
run.py (one policy's run: the real services, ticked by the simulated clock) with measure.py (what
Redis and MySQL say) -> report.py (tables, scale-up, recommendation) and plots.py (PNGs).
"""
