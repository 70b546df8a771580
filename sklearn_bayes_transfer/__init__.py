"""sklearn-bayes-transfer: Bayesian transfer learning with informative priors."""

__version__ = "0.1.0"
