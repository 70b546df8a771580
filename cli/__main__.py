"""``python -m sklearn_bayes_transfer.cli``: the ``bt-transfer`` command (e.g. under ``torchrun -m``)."""

from ._entry import main

if __name__ == "__main__":
    main()
