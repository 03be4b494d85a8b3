"""Layer placement: which contiguous layer range lives on which device (see docs/placement.md)."""
from placement.flow import evaluate_placement
from placement.problem import (DeviceSpec, InfeasiblePlacementError, LinkSpec, ModelSpec, Pipeline, Placement,
                               PlacementProblem, PlacementResult, Stage)
from placement.solver import solve_placement

__all__ = ["DeviceSpec", "InfeasiblePlacementError", "LinkSpec", "ModelSpec", "Pipeline", "Placement",
           "PlacementProblem", "PlacementResult", "Stage", "evaluate_placement", "solve_placement"]
