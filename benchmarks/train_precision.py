"""CPU training step time in float32 against bfloat16 mixed precision (`ctcohort train --bf16`), side by side.

The network is the bundled demo model's (its plans' 3d_small configuration: whole-image patches, features
16..64); a step is forward, nnU-Net's deep-supervised Dice + cross-entropy loss, backward and an AdamW
update, on a random CT-like batch. The two precisions alternate so that both see the same machine load.

    python benchmarks/train_precision.py [--steps 3] [--threads 2]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ctcohort.nnunet_adapter import bfloat16_autocast_on_cpu
from ctcohort.segment import bundled_model_dir
from ctcohort.train import SMALL_CONFIGURATION


def build(model_dir, configuration):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(json.loads((model_dir / "plans.json").read_text()))
    config = plans.get_configuration(configuration)
    classes = len(json.loads((model_dir / "dataset.json").read_text())["labels"])
    network = nnUNetTrainer.build_network_architecture(plans, config, 1, classes, enable_deep_supervision=True)
    stages = len(config.pool_op_kernel_sizes)
    weights = np.array([1 / 2**i for i in range(stages)])
    weights[-1] = 0
    loss = DeepSupervisionWrapper(
        DC_and_CE_loss(
            {"batch_dice": config.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {},
            dice_class=MemoryEfficientSoftDiceLoss,
        ),
        weights / weights.sum(),
    )
    return network, loss, config, classes


def step_seconds(network, loss, optimizer, image, targets, bf16: bool) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    # what ctcohort's training does: nnU-Net's CPU step enters its module's dummy_context(), which
    # bfloat16_autocast_on_cpu swaps for torch's bfloat16 autocast
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    with bfloat16_autocast_on_cpu(bf16), trainer_module.dummy_context():
        value = loss(network(image), targets)
    value.backward()
    optimizer.step()
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per precision (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="model folder whose plans to use (default: the bundled one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = Path(args.model) if args.model else bundled_model_dir()
    network, loss, config, classes = build(model_dir, SMALL_CONFIGURATION)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, amsgrad=True)
    patch = config.patch_size
    image = torch.randn(config.batch_size, 1, *patch)
    target = torch.randint(0, classes, (config.batch_size, 1, *patch)).float()
    targets = [target]
    for scale in config.pool_op_kernel_sizes[1:]:
        target = target[:, :, :: scale[0], :: scale[1], :: scale[2]]
        targets.append(target)
    times = {"float32": [], "bfloat16": []}
    for i in range(args.steps + 1):
        for name in times:
            seconds = step_seconds(network, loss, optimizer, image, targets, bf16=name == "bfloat16")
            if i > 0:
                times[name].append(seconds)
    print(
        f"3d_small of {model_dir}: patch {patch}, batch {config.batch_size}, {classes} classes, "
        f"{args.threads} threads, {args.steps} steps each"
    )
    for name, values in times.items():
        print(f"{name:9s} {np.median(values):6.2f} s per step (median; {', '.join(f'{v:.2f}' for v in values)})")
    print(f"bfloat16 speed-up: {np.median(times['float32']) / np.median(times['bfloat16']):.2f}x")


if __name__ == "__main__":
    main()
