"""The FastAPI face: the lifespan, dependencies, ``@leader_only``, probes, Prometheus."""
