"""RCM+MAM (paper 003: Yoon et al., "Exploring Pixel-level Self-supervision for WSSS").

MainNet F (trained) and SupportNet G (EMA of F) are ``model.CAMNet``: a ResNet-38 (or timm
ResNet) trunk, a 1x1 conv to the D = 256 features X and a 1x1 conv to the N foreground CAMs.

Wiring into a trainer::

    from pipeline.methods.rcm_mam import (CAMNet, PrototypeMemory, RCMMAMSettings, ResNet38,
        ema_update, load_resnet38_weights, param_groups, set_learning_rates, teacher_copy,
        training_step)

    settings = RCMMAMSettings()                       # or RCMMAMSettings.from_params(cfg)
    trunk = ResNet38(); load_resnet38_weights(trunk, path)   # or timm_backbone(name, 8 | 16)
    main = CAMNet(trunk, num_classes=N, feature_dim=settings.feature_dim)
    support = teacher_copy(main)                      # G: no gradients, eval mode
    memory = PrototypeMemory(N + 1, settings.feature_dim)
    optimizer = torch.optim.SGD(param_groups(main, lr=0.01, weight_decay=5e-4), lr=0.01)
    for each batch (global step s of max_steps):
        set_learning_rates(optimizer, 0.01, s, max_steps, 0.9)
        main.train()
        total, parts = training_step(main, support, images, labels, epoch, memory, settings,
                                     reducer=None)
        optimizer.zero_grad(); total.backward(); optimizer.step()
        ema_update(support, main, settings.ema_momentum)   # after every optimiser step

``training_step(main, support, images, labels, epoch, memory, settings, reducer=None)``:

- ``images``: float B x 3 x H x W, normalised with ImageNet mean/std (the ResNet-38 weights
  expect RGB in [0, 1] normalised so), the crop I_m (192 x 192 in the paper);
- ``labels``: float B x N multi-hot foreground classes (no background entry);
- ``epoch``: 0-based; L_MAM is on from ``settings.mam_start_epoch`` (6);
- ``memory``: the ``PrototypeMemory`` kept across steps (and in checkpoints: ``state_dict``);
- ``reducer``: anything with ``.sum(tensor)`` summing over data-parallel processes (prototype
  sums and counts), or None;
- returns ``(total, {"cls", "rcm", "mam"})``: the scalar loss with gradient and its detached
  unweighted parts.

Inference: ``infer.msinf_cams(net, images)`` -> B x N x H x W in [0, 1];
``infer.class_scores(cams, labels_or_None, background)`` -> B x (N+1) x H x W;
``infer.masks_from_scores(scores)`` -> B x H x W labels.
"""

from pipeline.methods.rcm_mam.losses import PrototypeMemory
from pipeline.methods.rcm_mam.model import CAMNet
from pipeline.methods.rcm_mam.resnet38 import ResNet38, load_resnet38_weights, timm_backbone
from pipeline.methods.rcm_mam.step import RCMMAMSettings, training_step
from pipeline.training.ema import ema_update, teacher_copy
from pipeline.training.optim import param_groups, poly_lr, set_learning_rates

__all__ = [
    "CAMNet",
    "PrototypeMemory",
    "RCMMAMSettings",
    "ResNet38",
    "ema_update",
    "load_resnet38_weights",
    "param_groups",
    "poly_lr",
    "set_learning_rates",
    "teacher_copy",
    "timm_backbone",
    "training_step",
]
