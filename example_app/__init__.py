"""fastapi-leader's example app and its local-cluster demo.

- :mod:`example_app.main`: the app, ``uvicorn example_app.main:app`` (configured by ``LEADER_*``
  and ``EXAMPLE_*`` environment variables).
- ``python -m example_app``: a local cluster of the app on consecutive ports, printing each
  leadership change as it happens (its words: :mod:`example_app.narration`).
- :mod:`example_app.dashboard`: the app's live page, ``GET /dashboard``.

Importing this package starts nothing and reads no settings.
"""
