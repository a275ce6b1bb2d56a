"""Train a video DiT: `python train.py [experiment=NAME] [overrides]` (configs/train.yaml)."""

import logging

import hydra
from omegaconf import DictConfig

import vsa.scaling  # noqa: F401  (registers the sweep configs' resolvers, e.g. ${steps_for_budget:...})


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from vsa.scaling.rows import finished_row

    if finished_row(cfg) is not None:  # a sweep point whose result.json is written: nothing to do
        logging.getLogger(__name__).info(f"{cfg.paths.output_dir}: finished (result.json present), "
                                         "skipped; delete its result.json to run it again")
        return
    from vsa.training import train

    train(cfg)


if __name__ == "__main__":
    main()
