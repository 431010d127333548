"""`Reptile`: θ0 moved towards the adapted parameters (Nichol et al., 2018)."""

from warpkeras.meta.leap import InitObjective


class Reptile(InitObjective):
    """Reptile: after K inner steps, θ0 ← θ0 − β (θ0 − θ_K), averaged over the meta-batch.

    The per-task meta-gradient is `warpkeras.objectives.reptile_direction` (θ0 − θ_K);
    the optimiser makes the step β.

    Args:
        weight: λ (default 1).
        optimizer: Keras optimizer for θ0 (default: a copy of the trainer's
            ``meta_optimizer``).
    """

    def close(self, engine, group):
        return {"grads": tuple(a - b for a, b in zip(group.theta_start, group.carry["theta"]))}
