"""The ``bt-transfer`` command-line interface (installed as ``sklearn_bayes_transfer.cli``)."""
