"""The SAMPO MONAI Label app's code beside main.py (MONAI Label's app convention of a code package next to
``main.py``; not named ``lib``: MONAI Label creates ``lib/`` in the app folder at start, .gitignore ignores it,
and MONAI Label unloads the modules of a package ``lib`` before it loads an app). One job a module:

- :mod:`sampo_app.http_checks`: HTTP request checks (ids, tags, uploads, params, model files; the MONAI Label
  internals it still patches are listed there).
- :mod:`sampo_app.trainers`: run management and continued training (``SAMPOTrainTask``).
- :mod:`sampo_app.infers`: the infer task (``SAMPOInferTask``) and recording proposals and human pairs.

``main.py`` sets up ``sys.path`` and holds the app class ``SAMPOApp``. MONAI Label imports main.py with the app
folder on ``sys.path`` only while main.py is imported, so the modules here import one another at module level.
"""
