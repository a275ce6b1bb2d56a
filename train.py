"""Train a video DiT: `python train.py [experiment=NAME] [overrides]` (configs/train.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from vsa.training import train

    train(cfg)


if __name__ == "__main__":
    main()
