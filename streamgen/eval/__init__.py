"""Evaluation against the world: ``evaluators`` (inverse dynamics, video encoder, theme
classifier), ``metrics``, ``suite`` (run_suite, GroundTruthGenerator), ``train_evaluators``
and ``cli`` (``streamgen eval``)."""
