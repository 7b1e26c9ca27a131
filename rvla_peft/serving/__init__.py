"""Serving one policy over HTTP: ``rvla-serve --base MODEL --adapter ADAPTER`` (:mod:`rvla_peft.cli.serve`).

- :mod:`rvla_peft.serving.json_numpy`: numpy arrays in JSON, in the ``json_numpy`` package's format;
- :mod:`rvla_peft.serving.batching`: concurrent requests gathered into one forward;
- :mod:`rvla_peft.serving.app`: the ASGI app (OpenVLA's ``POST /act``, ``GET /health``, ``GET /metadata``);
- :mod:`rvla_peft.serving.client`: :class:`~rvla_peft.serving.client.PolicyClient`, standard library only.

This ``__init__`` imports nothing, so that the client loads without torch or the server's packages.
"""
