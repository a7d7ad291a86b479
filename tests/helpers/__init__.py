"""What the tests share: in-process clusters of nodes, certificates, Redis topologies."""
