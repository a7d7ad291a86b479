"""The pure core: the state machine, the messages and their codec, the seeded simulation."""
