"""uta-jax: Uncertainty Targeted Attacks adversarial training in JAX/Flax.

Modules: ``uncertainty`` (predictive entropy of M samples), ``attacks``
(FGSM, R-FGSM, PGD, UTA as one projected sign-ascent loop), ``models`` (the
paper's Flax classifiers).
"""

__version__ = '0.1.0'
