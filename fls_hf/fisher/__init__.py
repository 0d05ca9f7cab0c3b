"""Fisher statistics of a model on batches, no providers: calibration streams, output likelihoods,
Fisher-vector products (GGN / HVP), per-example gradients and Kronecker (K-FAC) statistics."""

from .calibration import CalibrationStream, SeededBatches, as_stream
from .gradients import FISHER_LABELS, hooked_layers, is_causal_lm, per_example_gradients
from .kronecker import kronecker_statistics
from .likelihoods import LIKELIHOODS, Bernoulli, Categorical, Gaussian, Likelihood, likelihood_for
from .products import FISHER_PRODUCTS, ggn_product, hvp_product, sampled_gradient

__all__ = [
    "FISHER_LABELS",
    "FISHER_PRODUCTS",
    "LIKELIHOODS",
    "Bernoulli",
    "CalibrationStream",
    "Categorical",
    "Gaussian",
    "Likelihood",
    "SeededBatches",
    "as_stream",
    "ggn_product",
    "hooked_layers",
    "hvp_product",
    "is_causal_lm",
    "kronecker_statistics",
    "likelihood_for",
    "per_example_gradients",
    "sampled_gradient",
]
