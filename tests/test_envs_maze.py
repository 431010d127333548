"""The grid-maze navigation environment and its numpy-batched version."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import warpkeras.envs  # noqa: F401  (registers warpkeras/Maze-v0)
from warpkeras.envs import MAZE_ENV_ID, MazeEnv, MazeVectorEnv, make_maze

UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3


def test_maze_layout():
    walls = make_maze(11)
    assert walls.shape == (11, 11)
    assert walls[0].all() and walls[-1].all() and walls[:, 0].all() and walls[:, -1].all()
    inner = walls[1:-1, 1:-1]
    for r in range(1, 10):
        for c in range(1, 10):
            assert walls[r, c] == (r % 2 == 0 and c % 2 == 0)
    assert inner.sum() == 16 and not walls[5, 5]
    assert not make_maze(9)[4, 4]  # the centre is freed even where it would be a pillar
    with pytest.raises(ValueError, match="odd"):
        make_maze(10)


def test_passes_gymnasium_env_checker():
    check_env(gym.make(MAZE_ENV_ID).unwrapped)
    check_env(gym.make(MAZE_ENV_ID, start="random", render_mode="ansi").unwrapped)


def test_registered_and_observation_layout():
    env = gym.make(MAZE_ENV_ID)
    obs, info = env.reset(seed=0)
    assert obs.shape == (15,) and obs.dtype == np.float32
    assert env.observation_space.contains(obs)
    # centre cell of the 11x11 maze: pillars on the four diagonals, nothing else
    assert obs[:9].tolist() == [1, 0, 1, 0, 0, 0, 1, 0, 1]
    assert obs[9:].tolist() == [0, 0, 0, 0, 0, 0]
    assert tuple(info["position"]) == (5, 5) and tuple(info["goal"]) != (5, 5)
    obs, *_ = env.step(RIGHT)
    assert obs[9:13].tolist() == [0, 0, 0, 1] and obs[14] == pytest.approx(1 / 200)
    vec = gym.make_vec(MAZE_ENV_ID, num_envs=3, vectorization_mode="vector_entry_point")
    assert isinstance(vec.unwrapped, MazeVectorEnv) and vec.reset(seed=0)[0].shape == (3, 15)


def test_walls_block_and_penalise():
    env = MazeEnv()
    env.reset(seed=0, options={"goal": (9, 9), "position": (1, 1)})
    obs, reward, terminated, truncated, info = env.step(UP)  # outer wall
    assert reward == pytest.approx(-0.1) and tuple(info["position"]) == (1, 1)
    assert obs[13] == pytest.approx(-0.1) and obs[9 + UP] == 1
    assert obs[:9].tolist() == [1, 1, 1, 1, 0, 0, 1, 0, 1]
    obs, reward, *_, info = env.step(RIGHT)  # free: (1, 2)
    assert reward == 0.0 and tuple(info["position"]) == (1, 2)
    obs, reward, *_, info = env.step(DOWN)  # pillar at (2, 2)
    assert reward == pytest.approx(-0.1) and tuple(info["position"]) == (1, 2)
    custom = MazeEnv(wall_penalty=0.5, goal_reward=3.0)
    custom.reset(seed=0, options={"goal": (1, 2), "position": (1, 1)})
    assert custom.step(LEFT)[1] == pytest.approx(-0.5)
    assert custom.step(RIGHT)[1] == pytest.approx(3.0)


def test_reaching_goal_rewards_and_teleports():
    env = MazeEnv()
    walls = make_maze(11)
    for seed in range(20):
        env.reset(seed=seed, options={"goal": (1, 2), "position": (1, 1)})
        obs, reward, terminated, truncated, info = env.step(RIGHT)
        assert reward == pytest.approx(10.0) and info["reached_goal"]
        assert obs[13] == pytest.approx(10.0)
        position = tuple(info["position"])
        assert position != (1, 2) and not walls[position]
        assert tuple(info["goal"]) == (1, 2)  # the goal stays for the whole episode
        assert not terminated and not truncated
    positions = set()
    for seed in range(30):
        env.reset(seed=seed, options={"goal": (1, 2), "position": (1, 1)})
        positions.add(tuple(env.step(RIGHT)[4]["position"]))
    assert len(positions) > 10  # teleports to random cells


def test_episode_length_and_goal_sampling():
    env = MazeEnv(episode_length=7)
    env.reset(seed=1)
    flags = [env.step(LEFT)[3] for _ in range(7)]
    assert flags == [False] * 6 + [True]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(LEFT)
    goals = {tuple(MazeEnv().reset(seed=s)[1]["goal"]) for s in range(300)}
    free = {tuple(c) for c in np.argwhere(~make_maze(11))}
    assert goals <= free - {(5, 5)} and len(goals) > 40
    randomised = MazeEnv(start="random")
    starts = set()
    for s in range(50):
        _, info = randomised.reset(seed=s)
        assert tuple(info["position"]) != tuple(info["goal"])
        starts.add(tuple(info["position"]))
    assert len(starts) > 20


@pytest.mark.parametrize("start", ["center", "random"])
def test_vector_env_matches_single_envs(start):
    n, length = 6, 40
    sync = gym.vector.SyncVectorEnv(
        [lambda: MazeEnv(episode_length=length, start=start) for _ in range(n)]
    )
    fast = MazeVectorEnv(num_envs=n, episode_length=length, start=start)
    obs_a, _ = sync.reset(seed=11)
    obs_b, _ = fast.reset(seed=11)
    np.testing.assert_array_equal(obs_a, obs_b)
    rng = np.random.default_rng(0)
    goals_hit = 0
    for step in range(5 * length):
        actions = rng.integers(4, size=n)
        out_a = sync.step(actions)
        out_b = fast.step(actions)
        for a, b in zip(out_a[:4], out_b[:4]):
            np.testing.assert_array_equal(a, b, err_msg=f"step {step}")
        goals_hit += int(out_b[4]["reached_goal"].sum())
    assert goals_hit > 0  # the comparison covered teleports
    assert out_b[3].any() or fast.t.max() < length
    # a fresh seeded reset reproduces the first observation
    np.testing.assert_array_equal(fast.reset(seed=11)[0], obs_b)


def test_vector_env_checks():
    envs = MazeVectorEnv(num_envs=2, episode_length=2, autoreset=False)
    with pytest.raises(RuntimeError, match="reset"):
        envs.step([0, 0])
    envs.reset(seed=0, options={"goal": (1, 2), "position": [[1, 1], [3, 3]]})
    obs, rewards, _, truncated, infos = envs.step([RIGHT, UP])
    assert rewards.tolist() == [10.0, 0.0] and infos["reached_goal"].tolist() == [True, False]
    envs.step([LEFT, LEFT])
    with pytest.raises(RuntimeError, match="autoreset is off"):
        envs.step([LEFT, LEFT])
    with pytest.raises(ValueError, match="expected 2 actions"):
        envs.step([0, 0, 0])
    with pytest.raises(ValueError, match="not a free cell"):
        envs.reset(seed=0, options={"goal": (2, 2)})
