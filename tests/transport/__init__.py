"""The transports: one contract for all, and what each (memory, Redis, Cluster, Sentinel, TLS,
ACL, URLs and start-time errors) adds."""
