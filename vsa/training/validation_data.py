"""The validation data of a training run, rebuilt from its checkpoint and its data config and
encoded as training encodes it: for the pattern comparison (`vsa.sampling.compare`) and the recall
diagnostic (`vsa.scaling.recall`)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vsa.checkpoint import CHECKPOINT_KEY
from vsa.models import DiTConfig, VideoDiT
from vsa.training.module import VideoDiffusionModule


def validation_batches(checkpoint: dict, data_config: str | Path, device: torch.device,
                       max_batches: int | None = None) -> tuple[list, dict]:
    """The validation split of the data in `data_config` (a train config with a `data` section, as
    Hydra saves it, or a data section), encoded as in training: ([(x0, cond)], info)."""
    path = Path(data_config).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data config {path} does not exist")
    root = OmegaConf.load(path)
    node = root.data if "data" in root else root
    if "datamodule" not in node:
        raise ValueError(f"{path} has no data.datamodule section; pass the run's .hydra/config.yaml "
                         "or a file with the training data config")
    try:
        datamodule = instantiate(node.datamodule, _convert_="all")
    except Exception as err:  # omegaconf / hydra errors: name the file
        raise ValueError(f"could not build the validation data of {path}: {err}") from err
    hparams = checkpoint.get("hyper_parameters", {})
    spec = checkpoint[CHECKPOINT_KEY]
    data_key = str(node.get("key", hparams.get("data_key", "video")))
    validation = {"n_t": 8, "seed": 0, **hparams.get("validation", {})}
    with torch.device("meta"):  # only its config is read (conditions); no weights needed
        meta_model = VideoDiT(DiTConfig(**spec["dit_config"]))
    module = VideoDiffusionModule(meta_model, codec=spec["codec"], data_key=data_key,
                                  validation=validation)
    loader = datamodule.val_dataloader()
    if not loader:
        raise ValueError(f"the data of {path} has no validation split (val_size=0); use a config "
                         "with val_size > 0, or skip the validation loss")
    batches = []
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        module.check_labels(batch)  # on the CPU, before the move
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad():
            x0 = module.encode(batch)
        if list(x0.shape[1:]) != list(spec["latent_shape"]):
            raise ValueError(f"the validation data of {path} gives inputs {list(x0.shape[1:])}, the "
                             f"checkpoint was trained on {spec['latent_shape']}; pass the data config "
                             "of its training run")
        batches.append((x0, module.condition(batch)))
    info = {"source": str(path), "samples": sum(x0.shape[0] for x0, _ in batches),
            "batches": len(batches), "n_t": int(validation["n_t"]), "seed": int(validation["seed"])}
    return batches, info
