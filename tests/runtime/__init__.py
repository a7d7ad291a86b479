"""The runtime: the election's thread, its driver and service, callbacks, events, watchdog,
and the whole election on a real Redis (forgeries, hostile input, key rotation, fencing)."""
