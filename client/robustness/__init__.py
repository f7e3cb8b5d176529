"""The robustness toolkit: the 15 common corruptions (:mod:`.corruptions`, their parameter
tables in :mod:`.tables`), whole corrupted sets cached on disk (:mod:`.cache`), the metrics
of the AugMix paper (:mod:`.metrics`) and the evaluation of a model over them
(:mod:`.evaluation`)."""
