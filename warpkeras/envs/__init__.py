"""Reinforcement-learning environments (gymnasium).

Importing this package registers ``warpkeras/Maze-v0`` with gymnasium, so
``gymnasium.make("warpkeras/Maze-v0")`` and
``gymnasium.make_vec("warpkeras/Maze-v0", num_envs=30, vectorization_mode="vector_entry_point")``
(the numpy-batched :class:`MazeVectorEnv`) work.
"""

try:
    import gymnasium
except ImportError as e:
    raise ImportError('warpkeras.envs needs gymnasium: pip install "warpkeras[rl]"') from e

from warpkeras.envs.maze import NUM_ACTIONS, MazeEnv, MazeVectorEnv, make_maze

MAZE_ENV_ID = "warpkeras/Maze-v0"


def register_envs():
    """Register the package's environments with gymnasium (safe to call repeatedly).

    Returns:
        list of registered environment ids.

    Example:
        >>> import gymnasium as gym
        >>> from warpkeras.envs import register_envs
        >>> ids = register_envs()
        >>> env = gym.make(ids[0])
    """
    if MAZE_ENV_ID not in gymnasium.registry:
        gymnasium.register(
            id=MAZE_ENV_ID,
            entry_point="warpkeras.envs.maze:MazeEnv",
            vector_entry_point="warpkeras.envs.maze:MazeVectorEnv",
        )
    return [MAZE_ENV_ID]


register_envs()

__all__ = ["MAZE_ENV_ID", "NUM_ACTIONS", "MazeEnv", "MazeVectorEnv", "make_maze", "register_envs"]
