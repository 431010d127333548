"""Grid-maze navigation (Miconi et al., 2018/2019), as used for the WarpGrad RL experiment.

The maze is fixed: an ``size x size`` grid with walls all around and a wall at every
interior cell whose row and column are both even, except the centre cell. A task is
the goal cell, drawn at random among the free cells at the start of each episode.
The agent cannot see the goal: it observes the 3x3 block of walls around itself,
its previous action (one-hot), the previous reward and the fraction of the episode
elapsed. Reaching the goal gives ``goal_reward`` and teleports the agent to a random
free cell other than the goal; bumping into a wall gives ``-wall_penalty`` and the
agent stays. Episodes last ``episode_length`` steps (then ``truncated`` is True;
episodes never terminate early).

Observation layout (``float32``, length ``9 + 4 + 2 = 15``)::

    [0:9]   walls in the 3x3 neighbourhood, row-major, agent in the middle (1 = wall)
    [9:13]  one-hot previous action (all zeros right after reset)
    [13]    previous reward
    [14]    steps taken / episode_length

Actions: 0 = up (row - 1), 1 = down (row + 1), 2 = left (column - 1), 3 = right (column + 1).

:class:`MazeVectorEnv` steps many mazes at once with numpy arrays; seeded alike, it
gives exactly the results of ``gymnasium.vector.SyncVectorEnv`` over :class:`MazeEnv`.
"""

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import VectorEnv
from gymnasium.vector.utils import batch_space

# gymnasium >= 1.1 declares how vector environments autoreset; earlier versions have no enum.
AutoresetMode = getattr(gym.vector, "AutoresetMode", None)

NUM_ACTIONS = 4
_MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.int64)
_NEIGHBOURHOOD = np.array([[dr, dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)], dtype=np.int64)
_START_MODES = ("center", "random")


def make_maze(size=11):
    """Build the fixed grid maze.

    Args:
        size: side length (odd, >= 5); 11 in WarpGrad, 9 in Miconi et al.

    Returns:
        bool array ``(size, size)``, True where there is a wall.

    Example:
        >>> walls = make_maze(11)
        >>> int(walls.sum()), bool(walls[5, 5])
        (56, False)
    """
    size = int(size)
    if size < 5 or size % 2 == 0:
        raise ValueError(f"maze size must be odd and >= 5, got {size}")
    walls = np.zeros((size, size), dtype=bool)
    walls[0, :] = walls[-1, :] = walls[:, 0] = walls[:, -1] = True
    idx = np.arange(size)
    even = (idx % 2 == 0) & (idx > 0) & (idx < size - 1)
    walls[np.ix_(even, even)] = True
    walls[size // 2, size // 2] = False
    return walls


def _free_cells(walls):
    return np.argwhere(~walls).astype(np.int64)


def _sample_cell(rng, free_cells, exclude=None):
    """A uniformly random free cell, optionally other than ``exclude``; one draw from ``rng``."""
    if exclude is None:
        return free_cells[rng.integers(len(free_cells))].copy()
    excluded = np.flatnonzero((free_cells == np.asarray(exclude)).all(axis=1))
    choice = int(rng.integers(len(free_cells) - len(excluded)))
    if len(excluded) and choice >= excluded[0]:
        choice += 1
    return free_cells[choice].copy()


def _check_cell(walls, cell, what):
    cell = np.asarray(cell, dtype=np.int64).reshape(2)
    size = walls.shape[0]
    if not (0 <= cell[0] < size and 0 <= cell[1] < size) or walls[cell[0], cell[1]]:
        raise ValueError(f"{what} {tuple(cell.tolist())} is not a free cell of the maze")
    return cell


def _observation_bounds(goal_reward, wall_penalty):
    low = np.zeros(9 + NUM_ACTIONS + 2, dtype=np.float32)
    high = np.ones(9 + NUM_ACTIONS + 2, dtype=np.float32)
    low[9 + NUM_ACTIONS] = min(0.0, -wall_penalty, goal_reward)
    high[9 + NUM_ACTIONS] = max(0.0, -wall_penalty, goal_reward)
    return low, high


class MazeEnv(gym.Env):
    """Single maze-navigation episode stream (registered as ``warpkeras/Maze-v0``).

    Args:
        size: maze side length (11).
        episode_length: steps per episode (200).
        goal_reward: reward for reaching the goal (+10).
        wall_penalty: reward ``-wall_penalty`` for bumping into a wall (0.1).
        start: ``"center"`` (the agent starts each episode in the centre cell and the
            goal is never placed there) or ``"random"`` (random free cell other than the goal).
        render_mode: ``None``, ``"ansi"`` or ``"rgb_array"``.

    ``reset(options=...)`` accepts ``{"goal": (row, col), "position": (row, col)}`` to
    fix the goal and/or start cell. ``info`` holds ``goal``, ``position`` and
    ``reached_goal`` (whether the goal was reached on this step).

    Example:
        >>> import gymnasium as gym, warpkeras.envs
        >>> env = gym.make("warpkeras/Maze-v0")
        >>> obs, info = env.reset(seed=0)
        >>> obs.shape
        (15,)
        >>> obs, reward, terminated, truncated, info = env.step(3)
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 8}

    def __init__(
        self,
        size=11,
        episode_length=200,
        goal_reward=10.0,
        wall_penalty=0.1,
        start="center",
        render_mode=None,
    ):
        if start not in _START_MODES:
            raise ValueError(f"start must be one of {_START_MODES}, got {start!r}")
        if int(episode_length) < 1:
            raise ValueError(f"episode_length must be >= 1, got {episode_length}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None")
        self.walls = make_maze(size)
        self.size = self.walls.shape[0]
        self.free_cells = _free_cells(self.walls)
        self.center = np.array([self.size // 2, self.size // 2], dtype=np.int64)
        self.episode_length = int(episode_length)
        self.goal_reward = float(goal_reward)
        self.wall_penalty = float(wall_penalty)
        self.start = start
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(NUM_ACTIONS)
        low, high = _observation_bounds(self.goal_reward, self.wall_penalty)
        self.observation_space = spaces.Box(low=low, high=high, dtype=np.float32)
        self.position = None
        self.goal = None
        self.t = 0
        self._prev_action = -1
        self._prev_reward = 0.0

    def _observation(self):
        obs = np.zeros(self.observation_space.shape, dtype=np.float32)
        cells = self.position[None, :] + _NEIGHBOURHOOD
        obs[:9] = self.walls[cells[:, 0], cells[:, 1]]
        if self._prev_action >= 0:
            obs[9 + self._prev_action] = 1.0
        obs[9 + NUM_ACTIONS] = self._prev_reward
        obs[10 + NUM_ACTIONS] = self.t / self.episode_length
        return obs

    def _info(self, reached):
        return {"goal": self.goal.copy(), "position": self.position.copy(), "reached_goal": reached}

    def reset(self, *, seed=None, options=None):
        """Start a new episode with a new goal.

        Args:
            seed: seeds the environment's generator (``None`` keeps the current one).
            options: optional ``{"goal": (row, col), "position": (row, col)}``.

        Returns:
            ``(observation, info)``.

        Example:
            >>> obs, info = MazeEnv().reset(seed=0, options={"goal": (1, 2)})
        """
        super().reset(seed=seed)
        options = options or {}
        goal = options.get("goal")
        position = options.get("position")
        if self.start == "center":
            start = (
                self.center if position is None else _check_cell(self.walls, position, "position")
            )
            if goal is None:
                goal = _sample_cell(self.np_random, self.free_cells, exclude=start)
            else:
                goal = _check_cell(self.walls, goal, "goal")
        else:
            if goal is None:
                goal = _sample_cell(self.np_random, self.free_cells)
            else:
                goal = _check_cell(self.walls, goal, "goal")
            if position is None:
                start = _sample_cell(self.np_random, self.free_cells, exclude=goal)
            else:
                start = _check_cell(self.walls, position, "position")
        if np.array_equal(start, goal):
            raise ValueError("the start position must differ from the goal")
        self.goal = np.array(goal, dtype=np.int64)
        self.position = np.array(start, dtype=np.int64)
        self.t = 0
        self._prev_action = -1
        self._prev_reward = 0.0
        return self._observation(), self._info(False)

    def step(self, action):
        """Move one cell (or bump into a wall).

        Args:
            action: 0 up, 1 down, 2 left, 3 right.

        Returns:
            ``(observation, reward, terminated, truncated, info)``; ``terminated`` is
            always False and ``truncated`` is True on the last step of the episode.

        Example:
            >>> env = MazeEnv(); _ = env.reset(seed=0)
            >>> obs, reward, terminated, truncated, info = env.step(3)
        """
        if self.position is None:
            raise RuntimeError("call reset() before step()")
        if self.t >= self.episode_length:
            raise RuntimeError("the episode is over (truncated); call reset()")
        action = int(action)
        if not 0 <= action < NUM_ACTIONS:
            raise ValueError(f"action must be in [0, {NUM_ACTIONS}), got {action}")
        target = self.position + _MOVES[action]
        reward = 0.0
        reached = False
        if self.walls[target[0], target[1]]:
            reward -= self.wall_penalty
        else:
            self.position = target
            if np.array_equal(self.position, self.goal):
                reward += self.goal_reward
                reached = True
                self.position = _sample_cell(self.np_random, self.free_cells, exclude=self.goal)
        self.t += 1
        self._prev_action = action
        self._prev_reward = reward
        truncated = self.t >= self.episode_length
        return self._observation(), reward, False, truncated, self._info(reached)

    def render(self):
        """Render the current state, in the ``render_mode`` given at construction.

        Returns:
            ``"ansi"``: a text picture (``#`` wall, ``A`` agent, ``G`` goal, ``.`` free);
            ``"rgb_array"``: a uint8 image ``(16*size, 16*size, 3)``.

        Example:
            >>> env = MazeEnv(render_mode="ansi"); _ = env.reset(seed=0)
            >>> print(env.render())  # doctest: +SKIP
        """
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode")
            return None
        if self.position is None:
            raise RuntimeError("call reset() before render()")
        if self.render_mode == "ansi":
            rows = []
            for r in range(self.size):
                line = []
                for c in range(self.size):
                    if (r, c) == tuple(self.position):
                        line.append("A")
                    elif (r, c) == tuple(self.goal):
                        line.append("G")
                    else:
                        line.append("#" if self.walls[r, c] else ".")
                rows.append("".join(line))
            return "\n".join(rows) + "\n"
        cell = 16
        image = np.where(self.walls[..., None], 40, 235).astype(np.uint8).repeat(3, axis=-1)
        image[self.goal[0], self.goal[1]] = (40, 180, 60)
        image[self.position[0], self.position[1]] = (200, 40, 40)
        return image.repeat(cell, axis=0).repeat(cell, axis=1)


class MazeVectorEnv(VectorEnv):
    """``num_envs`` mazes stepped together with numpy arrays (the paper uses 30).

    Sub-environment ``i`` draws its randomness from its own generator, seeded as
    gymnasium seeds vectorised environments (``reset(seed=s)`` gives env ``i`` seed
    ``s + i``), so results equal ``gymnasium.vector.SyncVectorEnv`` over :class:`MazeEnv`
    with the same seeds, including next-step autoreset: the step after an episode ends
    resets that maze (its action is ignored, reward 0). All mazes share the fixed layout.

    Args:
        num_envs: number of parallel mazes.
        size: as in :class:`MazeEnv`.
        episode_length: as in :class:`MazeEnv`.
        goal_reward: as in :class:`MazeEnv`.
        wall_penalty: as in :class:`MazeEnv`.
        start: as in :class:`MazeEnv`.
        autoreset: ``True`` for next-step autoreset; ``False`` to require an explicit
            ``reset()`` once episodes end (stepping a finished maze then raises).

    ``reset(options=...)`` accepts ``"goal"`` / ``"position"`` as ``(row, col)`` (for all)
    or ``(num_envs, 2)`` arrays. ``infos`` holds ``goal``, ``position`` (``(num_envs, 2)``)
    and ``reached_goal`` (``(num_envs,)``).

    Example:
        >>> import numpy as np
        >>> envs = MazeVectorEnv(num_envs=30)
        >>> obs, infos = envs.reset(seed=0)
        >>> obs.shape
        (30, 15)
        >>> obs, rewards, terminated, truncated, infos = envs.step(np.zeros(30, dtype=int))
    """

    metadata = {"render_modes": [], "autoreset_mode": None}

    def __init__(
        self,
        num_envs=30,
        size=11,
        episode_length=200,
        goal_reward=10.0,
        wall_penalty=0.1,
        start="center",
        autoreset=True,
    ):
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self._single = MazeEnv(size, episode_length, goal_reward, wall_penalty, start)
        self.num_envs = int(num_envs)
        self.walls = self._single.walls
        self.size = self._single.size
        self.free_cells = self._single.free_cells
        self.center = self._single.center
        self.episode_length = self._single.episode_length
        self.goal_reward = self._single.goal_reward
        self.wall_penalty = self._single.wall_penalty
        self.start = start
        self.autoreset = bool(autoreset)
        mode = None
        if AutoresetMode is not None:
            mode = AutoresetMode.NEXT_STEP if self.autoreset else AutoresetMode.DISABLED
        self.metadata = {"render_modes": [], "autoreset_mode": mode}
        self.render_mode = None
        self.single_observation_space = self._single.observation_space
        self.single_action_space = self._single.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        n = self.num_envs
        self._rngs = [None] * n
        self.position = np.zeros((n, 2), dtype=np.int64)
        self.goal = np.zeros((n, 2), dtype=np.int64)
        self.t = np.zeros(n, dtype=np.int64)
        self._prev_action = np.full(n, -1, dtype=np.int64)
        self._prev_reward = np.zeros(n, dtype=np.float64)
        self._done = np.zeros(n, dtype=bool)
        self._started = False

    def _cells(self, value, what):
        if value is None:
            return [None] * self.num_envs
        arr = np.asarray(value, dtype=np.int64)
        if arr.shape == (2,):
            arr = np.broadcast_to(arr, (self.num_envs, 2))
        if arr.shape != (self.num_envs, 2):
            raise ValueError(
                f"{what} must have shape (2,) or ({self.num_envs}, 2), got {arr.shape}"
            )
        return [_check_cell(self.walls, cell, what) for cell in arr]

    def _reset_one(self, i, goal=None, position=None):
        rng = self._rngs[i]
        if self.start == "center":
            start = self.center if position is None else position
            if goal is None:
                goal = _sample_cell(rng, self.free_cells, exclude=start)
        else:
            if goal is None:
                goal = _sample_cell(rng, self.free_cells)
            if position is None:
                position = _sample_cell(rng, self.free_cells, exclude=goal)
            start = position
        if np.array_equal(start, goal):
            raise ValueError("the start position must differ from the goal")
        self.goal[i] = goal
        self.position[i] = start
        self.t[i] = 0
        self._prev_action[i] = -1
        self._prev_reward[i] = 0.0
        self._done[i] = False

    def _observations(self):
        n = self.num_envs
        obs = np.zeros((n,) + self.single_observation_space.shape, dtype=np.float32)
        cells = self.position[:, None, :] + _NEIGHBOURHOOD[None]
        obs[:, :9] = self.walls[cells[..., 0], cells[..., 1]]
        has_action = self._prev_action >= 0
        obs[np.flatnonzero(has_action), 9 + self._prev_action[has_action]] = 1.0
        obs[:, 9 + NUM_ACTIONS] = self._prev_reward
        obs[:, 10 + NUM_ACTIONS] = self.t / self.episode_length
        return obs

    def _infos(self, reached):
        return {"goal": self.goal.copy(), "position": self.position.copy(), "reached_goal": reached}

    def reset(self, *, seed=None, options=None):
        """Reset all mazes (new goals).

        Args:
            seed: ``None`` (keep each maze's generator), an int (maze ``i`` gets
                ``seed + i``) or a list of ``num_envs`` seeds/None.
            options: optional ``{"goal": ..., "position": ...}``, each ``(row, col)`` or a
                ``(num_envs, 2)`` array.

        Returns:
            ``(observations (num_envs, 15), infos)``.

        Example:
            >>> obs, infos = MazeVectorEnv(num_envs=4).reset(seed=0)
        """
        if seed is None:
            seeds = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"expected {self.num_envs} seeds, got {len(seeds)}")
        for i, s in enumerate(seeds):
            if s is not None or self._rngs[i] is None:
                self._rngs[i], _ = seeding.np_random(s)
        options = options or {}
        goals = self._cells(options.get("goal"), "goal")
        positions = self._cells(options.get("position"), "position")
        for i in range(self.num_envs):
            self._reset_one(i, goals[i], positions[i])
        self._started = True
        return self._observations(), self._infos(np.zeros(self.num_envs, dtype=bool))

    def step(self, actions):
        """Step every maze; a maze whose episode ended on the previous step is reset instead.

        Args:
            actions: int array ``(num_envs,)`` of actions in ``0..3``.

        Returns:
            ``(observations, rewards, terminations, truncations, infos)`` as arrays over mazes.

        Example:
            >>> envs = MazeVectorEnv(num_envs=4); _ = envs.reset(seed=0)
            >>> obs, rewards, terminations, truncations, infos = envs.step([0, 1, 2, 3])
        """
        if not self._started:
            raise RuntimeError("call reset() before step()")
        actions = np.asarray(actions, dtype=np.int64).reshape(-1)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"expected {self.num_envs} actions, got shape {actions.shape}")
        if ((actions < 0) | (actions >= NUM_ACTIONS)).any():
            raise ValueError(f"actions must be in [0, {NUM_ACTIONS}), got {actions}")
        restart = self._done.copy()
        if restart.any() and not self.autoreset:
            raise RuntimeError("some episodes are over; call reset() (autoreset is off)")
        active = ~restart
        rewards = np.zeros(self.num_envs, dtype=np.float64)

        target = self.position + _MOVES[actions]
        blocked = self.walls[target[:, 0], target[:, 1]] & active
        moving = active & ~blocked
        self.position[moving] = target[moving]
        rewards[blocked] -= self.wall_penalty
        reached = moving & (self.position == self.goal).all(axis=1)
        rewards[reached] += self.goal_reward
        for i in np.flatnonzero(reached):
            self.position[i] = _sample_cell(self._rngs[i], self.free_cells, exclude=self.goal[i])
        self.t[active] += 1
        self._prev_action[active] = actions[active]
        self._prev_reward[active] = rewards[active]

        for i in np.flatnonzero(restart):
            self._reset_one(i)
        truncated = active & (self.t >= self.episode_length)
        self._done = truncated.copy()
        terminated = np.zeros(self.num_envs, dtype=bool)
        return self._observations(), rewards, terminated, truncated, self._infos(reached)

    def close_extras(self, **kwargs):
        """Release resources (there are none to release).

        Args:
            **kwargs: ignored.

        Example:
            >>> MazeVectorEnv(num_envs=2).close()
        """

    def __repr__(self):
        return f"MazeVectorEnv(num_envs={self.num_envs}, size={self.size})"
