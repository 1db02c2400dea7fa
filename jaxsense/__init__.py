"""jaxsense — robust low-rank matrix recovery by the sub-gradient method, in JAX.

Implements Ma & Fattahi, "Global convergence of sub-gradient method for robust matrix
recovery" (JMLR 24(96), 2023): ℓ1 loss, SubGM with small initialisation, over-parameterised
factor U, outlier and Gaussian noise, Sign-RIP; plus compressed-sensing tools.
"""
from jaxsense import diagnostics, losses, operators, problems
from jaxsense.driver import RunResult, run
from jaxsense.init import small_random_init, spectral_sign_init
from jaxsense.operators import (DenseGaussian, EntrySampling, RankOne, dense_gaussian,
                                entry_sampling, make_operator, rank_one)
from jaxsense.problems import (GroundTruth, Problem, gaussian_noise, ground_truth, make_problem,
                               outlier_noise, truth_from_matrix)
from jaxsense.solvers import (Solver, SolverState, StepRule, constant, gd, geometric, make_solver,
                              polyak, power_iteration, subgm)

__all__ = [
    "diagnostics", "losses", "operators", "problems", "run", "RunResult",
    "small_random_init", "spectral_sign_init", "DenseGaussian", "EntrySampling", "RankOne",
    "dense_gaussian", "entry_sampling", "make_operator", "rank_one", "GroundTruth", "Problem",
    "gaussian_noise", "ground_truth", "make_problem", "outlier_noise", "truth_from_matrix",
    "Solver", "SolverState", "StepRule", "constant", "gd", "geometric", "make_solver", "polyak",
    "power_iteration", "subgm",
]
from jaxsense import rip
from jaxsense.rip import l2_rip_constant, phi_gaussian, phi_outliers, sign_rip_constant

__all__ += ["l2_rip_constant", "phi_gaussian", "phi_outliers", "rip", "sign_rip_constant"]
from jaxsense import sweep as sweeps
from jaxsense.sweep import SweepResult, sweep

__all__ += ["SweepResult", "sweep", "sweeps"]
from jaxsense import sparse
from jaxsense.sparse import atom_coherence, basis_pursuit, mutual_coherence, omp, rip_constant

__all__ += ["sparse", "atom_coherence", "basis_pursuit", "mutual_coherence", "omp",
            "rip_constant"]
from jaxsense import asymmetric

__all__ += ["asymmetric"]
