"""The ``rosa`` command (train / eval / merge / mask) and what only it needs: run configs, task data, evaluation,
checkpoints and the built-in default model. It uses the library (``rosa.*``); the library never imports it."""
