"""Sample videos from a checkpoint: `python sample.py ckpt_path=PATH [overrides]` (configs/sample.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    from vsa.sampling import sample

    sample(cfg)


if __name__ == "__main__":
    main()
