"""``rvla-demos`` / ``python -m rvla_peft.demos``: record successful scripted-expert episodes as a demonstrations
dataset (:mod:`rvla_peft.demos`)."""

from __future__ import annotations

import argparse
import sys

from rvla_peft.demos import generate_demos


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Record successful scripted-expert episodes as a demo dataset.")
    parser.add_argument("--task", action="append", required=True, help="task id; repeat for a multi-task dataset")
    parser.add_argument("--episodes", type=int, required=True, help="successful episodes to keep per task")
    parser.add_argument("--seed", type=int, default=0, help="episode e is tried from reset seed seed + e")
    parser.add_argument("--out", required=True, help="output folder (index.json + safetensors shards)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--vectorization", choices=["sync", "async"], default="sync")
    parser.add_argument("--max-episode-steps", type=int, default=50)
    parser.add_argument("--shard-episodes", type=int, default=200, help="episodes per safetensors file")
    parser.add_argument("--max-attempts", type=int, default=None, help="seeds tried per task (2 * episodes + 10)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--action-noise",
        type=float,
        default=0.0,
        help="DART: severity in [0, 1] of Gaussian noise (std 0.3 x severity) on the executed action; the recorded "
        "action stays the expert's",
    )
    args = parser.parse_args(argv)
    index = generate_demos(
        args.task,
        args.out,
        args.episodes,
        seed=args.seed,
        image_size=args.image_size,
        num_envs=args.num_envs,
        max_episode_steps=args.max_episode_steps,
        vectorization=args.vectorization,
        shard_episodes=args.shard_episodes,
        max_attempts=args.max_attempts,
        overwrite=args.overwrite,
        action_noise=args.action_noise,
    )
    for task, entry in index["tasks"].items():
        print(
            f"{task}: kept {entry['episodes']} of {entry['attempted']} episodes (dropped {entry['dropped']}: "
            f"seeds {entry['failed_seeds']}), {entry['steps']} steps, mean length {entry['mean_length']:.1f}, "
            f"{entry['env_steps_per_s']} env-steps/s"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
