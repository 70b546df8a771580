"""C sources of the optional compiled FOP kernel and, once installed, its extension modules (see
``sklearn_bayes_transfer/_kernel.py``)."""
