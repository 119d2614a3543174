"""The causal-LM task: models (``model``), data (``data``), the LightningModule (``module``) and a whole
run, from recipe to evaluated checkpoint (``run``: ``train_run``, ``load_run``, ``evaluate_run``)."""
