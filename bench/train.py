"""PC2M / ViT-PCM / RCM+MAM training throughput (images/s) with a breakdown of one step, random weights.

Images/s: the steps run free, as the training stage runs them; the breakdown comes from as many
steps that wait for the device after each part (see Timer).
PC2M per step: data (waiting for the DataLoader: decode, resize, two views, jitter; with the views
on the device only decode and resize), views (rendering and jitter on the device, train.views_on),
forward (both views), Sinkhorn (the two transport plans, inside the loss), loss + backward + Adam step.
ViT-PCM (``--method vitpcm``) per step: data (main view and ET tile), forward (the stop-gradient
inference pass, the main branch and the mosaics, with the ET target and the loss), backward +
Adam step. Runs the fine-tune phase (last 5 blocks + norm + head train), as every epoch after
the first.
RCM+MAM (``--method rcm_mam``, ``--models resnet38`` or a timm ResNet) per step: data (192 px crops),
forward (F and G at scales 0.5 / 1 / 2 with RCM and MAM, as every epoch from the 7th), backward +
SGD step + the EMA update of G.
CSRM (``--method csrm``, ``--models resnest101e`` or a timm ResNet; ``--global-size`` = its square
image) per step: data (resized squares), forward (the teacher, the in-loop dense CRF of its CAMs on
the CPU, ClassMix, the student on both batches, every loss of eq. 14 after the warm-up), backward +
SGD step + the EMA update of the teacher. The CRF runs in ``--threads`` worker processes as the stage.

    python bench/train.py                                   # ViT-S/16 and ViT-B/16 at 384, CPU
    python bench/train.py --method vitpcm --batch-size 16   # ViT-PCM: 4 mosaics per step
    python bench/train.py --device cuda --batch-size 32 --iterations 20
    python bench/train.py --method rcm_mam --models resnet38 --batch-size 2
    python bench/train.py --method csrm --models resnest101e --global-size 512 --batch-size 2

On CUDA each model runs twice in the same process: with the training stage's GPU settings
(pinned DataLoader memory, fused Adam, PC2M's and ViT-PCM's views rendered on the GPU) and as the
reference, the bench before them (pageable copies, for-each Adam, views in the workers); the ratio
column compares the two. On the CPU both are the same code, unless ``--views-on device`` asks for
the views rendered in the main process: then both rows again (the workers' share of the work is
what a GPU run takes off the CPUs).

PC2M / ViT-PCM stage settings: ``--compile`` (train.compile: the backbone's blocks compiled with
torch.compile; auto = on CUDA; off by default, as the stage) and ``--lstm-precision`` (ViT-PCM's
train.vitpcm.lstm_precision); several values give one stage row each, in one process. The
reference row is never compiled and keeps float32 LSTMs. Either asked on the CPU gives both rows
too. The untimed warm-up (2 steps when compiling, so every view size and the backward are
compiled before the clock starts; 1 otherwise) is the "warm-up s" column: with compile, what
compiling costs. A compile inside the timed steps is reported under the table.

    python bench/train.py --device cuda --batch-size 32 --iterations 24 --models B/16 --compile off on
    python bench/train.py --method vitpcm --device cuda --batch-size 32 --lstm-precision float32 bfloat16
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profiling import profiled

import pipeline.methods.pc2m.losses as losses
from pipeline.backbone import build_backbone, normalisation, patch_size
from pipeline.crf import resolve_params as resolve_crf
from pipeline.crf import worker_pool as crf_pool
from pipeline.devices import mixed_precision, resolve_device
from pipeline.methods.csrm.contrast import NegativeBank
from pipeline.methods.csrm.data import SquareViewDataset, SquareViews
from pipeline.methods.csrm.model import REPRESENTATION_DIM, CSRMNet
from pipeline.methods.csrm.model import build_features as csrm_features
from pipeline.methods.csrm.step import CSRMLossSettings
from pipeline.methods.csrm.step import training_step as csrm_step
from pipeline.methods.pc2m.model import LSTM_PRECISIONS, Architecture, build_network, set_trainable
from pipeline.methods.pc2m.ot import batch_class_marginal, multi_hot_frequencies, sinkhorn
from pipeline.methods.pc2m.views import TwoViewDataset, ViewSettings, render_view_batch
from pipeline.methods.rcm_mam.data import CropViewDataset, CropViews, imagenet_normalisation
from pipeline.methods.rcm_mam.losses import PrototypeMemory
from pipeline.methods.rcm_mam.method import build_trunk
from pipeline.methods.rcm_mam.model import CAMNet
from pipeline.methods.rcm_mam.step import RCMMAMSettings, training_step
from pipeline.methods.vitpcm.settings import ViTPCMSettings
from pipeline.methods.vitpcm.step import vitpcm_step
from pipeline.methods.vitpcm.views import MosaicViewDataset, MosaicViews, render_mosaic_batch
from pipeline.training.augment import local_to_global
from pipeline.training.compile import COMPILE_SETTINGS, compile_blocks, compile_wanted
from pipeline.training.data import VIEWS_ON, LabelledImage, views_on_device
from pipeline.training.distributed import LOCAL
from pipeline.training.ema import ema_update, teacher_copy
from pipeline.training.optim import CSRM_GROUPS, param_groups

MODELS = {"S/16": "vit_small_patch16_224.dino", "B/16": "vit_base_patch16_224.dino"}
NUM_CLASSES = 21  # VOC


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"any of {list(MODELS)} or timm names")
    parser.add_argument("--method", choices=["pc2m", "vitpcm", "rcm_mam", "csrm"], default="pc2m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--global-size", type=int, default=384)
    parser.add_argument("--local-size", type=int, default=192, help="PC2M's local view; RCM+MAM's crop")
    parser.add_argument("--iterations", type=int, default=3,
                        help="timed steps (after one warm-up step, two when compiling)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--views-on", choices=VIEWS_ON, default="auto",
                        help="PC2M / ViT-PCM: where the stage settings render the views (train.views_on)")
    parser.add_argument("--compile", choices=COMPILE_SETTINGS, nargs="+", default=["off"],
                        help="PC2M / ViT-PCM: compile the stage settings' backbone blocks (train.compile); "
                        "several: one stage row each")
    parser.add_argument("--lstm-precision", choices=LSTM_PRECISIONS, nargs="+", default=["float32"],
                        help="ViT-PCM: the stage settings' HV-BiLSTM precision (train.vitpcm.lstm_precision); "
                        "several: one stage row each")
    parser.add_argument("--profile", type=Path, help="append torch.profiler's tables of as many extra free-running "
                        "steps of the stage settings to this file (bench/profiling.py)")
    return parser.parse_args(argv)


def synthetic_images(folder: Path, count: int) -> list[LabelledImage]:
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        path = folder / f"{index}.jpg"
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
        images.append(LabelledImage(str(index), str(path), (1 + index % 20,)))
    return images


class Timer:
    """The breakdown's clock: waits for the device between the parts of a step. Those waits keep
    the host from queueing the next part while the device runs this one, so the free-running
    steps (``breakdown = False``: no waits, no parts) give the rate the training stage sees."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.totals, self.breakdown = device, {}, True

    def sync(self) -> None:
        if self.breakdown and self.device.type == "cuda":
            torch.cuda.synchronize()

    def add(self, key: str, seconds: float) -> None:
        if self.breakdown:
            self.totals[key] = self.totals.get(key, 0.0) + seconds


def rcm_mam_setup(name: str, args: argparse.Namespace, images: list[LabelledImage], timer: Timer,
                  device: torch.device) -> tuple[torch.nn.Module, torch.utils.data.Dataset, StepLosses,
                                                 torch.optim.Optimizer, Callable[[], None]]:
    """RCM+MAM's networks, crops, step (``rcm_mam.step.training_step`` after the MAM switch) and
    its SGD, as the training stage (``pipeline/methods/rcm_mam/method.py``) builds them."""
    settings = RCMMAMSettings(mam_start_epoch=0)
    model = CAMNet(build_trunk(name, "random", 8), NUM_CLASSES - 1, settings.feature_dim)
    support = teacher_copy(model)
    memory = PrototypeMemory(NUM_CLASSES, settings.feature_dim)
    views = CropViews(args.local_size, (0.5, 1.3), True, True)
    dataset = CropViewDataset(images, NUM_CLASSES, views, *imagenet_normalisation(), seed=0)
    optimizer = torch.optim.SGD(param_groups(model, 0.01), lr=0.01)
    support.to(device)

    def step_losses(batch: dict) -> tuple[torch.Tensor, float]:
        began = time.perf_counter()
        with mixed_precision(device):
            total, _ = training_step(model, support, batch["image"].to(device), batch["target"][:, 1:].to(device),
                                     0, memory, settings)
        timer.sync()
        timer.add("forward", time.perf_counter() - began)
        return total, time.perf_counter()

    return model, dataset, step_losses, optimizer, lambda: ema_update(support, model, settings.ema_momentum)


def csrm_setup(name: str, args: argparse.Namespace, images: list[LabelledImage], timer: Timer,
               device: torch.device) -> tuple[torch.nn.Module, torch.utils.data.Dataset, StepLosses,
                                              torch.optim.Optimizer, Callable[[], None]]:
    """CSRM's student, teacher, bank, square views, step (after the warm-up: every loss) and SGD, as
    the training stage (``pipeline/methods/csrm/method.py``) builds them."""
    settings = CSRMLossSettings()
    model = CSRMNet(csrm_features(name, "random", "--models"), NUM_CLASSES)
    teacher = teacher_copy(model).to(device)
    bank = NegativeBank(NUM_CLASSES, settings.contrast.negatives, REPRESENTATION_DIM).to(device)
    dataset = SquareViewDataset(images, NUM_CLASSES, SquareViews(args.global_size, True), model.features.mean,
                                model.features.std, seed=0)
    optimizer = torch.optim.SGD(param_groups(model, 0.007, 1e-4, CSRM_GROUPS), lr=0.007, momentum=0.9, nesterov=True)
    crf = resolve_crf({"preset": "psa"})
    pool = crf_pool(args.threads) if args.threads > 1 else None

    def step_losses(batch: dict) -> tuple[torch.Tensor, float]:
        began = time.perf_counter()
        with mixed_precision(device):
            total, _ = csrm_step(model, teacher, batch["image"].to(device), batch["rgb"], batch["target"].to(device),
                                 settings.warmup_epochs, 0.5, bank, settings, crf, torch.Generator().manual_seed(0),
                                 pool)
        timer.sync()
        timer.add("forward", time.perf_counter() - began)
        return total, time.perf_counter()

    return model, dataset, step_losses, optimizer, lambda: ema_update(teacher, model, 0.99)


SETUPS = {"rcm_mam": rcm_mam_setup, "csrm": csrm_setup}


def bench_model(name: str, args: argparse.Namespace, device: torch.device, images: list[LabelledImage],
                stage_settings: bool = True, compile_setting: str = "off", lstm_precision: str = "float32") -> dict:
    torch.manual_seed(0)
    timer = Timer(device)
    fast = stage_settings and device.type == "cuda"  # as the training stage (pipeline/methods/pc2m/method.py)
    after_step: Callable[[], None] = lambda: None  # noqa: E731 - nothing after the step but for the EMA teachers
    if args.method in SETUPS:
        model, dataset, step_losses, optimizer, after_step = SETUPS[args.method](name, args, images, timer, device)
    else:
        backbone = build_backbone(name, "random")
        patch = patch_size(backbone)
    # train.views_on: the stage renders the views on the device (a GPU, or asked); the reference
    # renders them in the workers, as the bench before issue 15's item 3.
    on_device = stage_settings and args.method in ("pc2m", "vitpcm") and views_on_device(args.views_on, device)
    # train.compile: the stage's blocks compiled (a GPU, or asked); the reference stays eager.
    compiled = compiling(args.method, compile_setting, device) and stage_settings and compile_blocks(backbone)
    if args.method == "vitpcm":
        vitpcm = ViTPCMSettings(lstm_precision=lstm_precision if stage_settings else "float32")
        model = build_network(backbone, Architecture("vitpcm", NUM_CLASSES, vitpcm.lstm_hidden), vitpcm.dropout,
                              vitpcm.lstm_precision)
        views = MosaicViews(args.global_size, patch, vitpcm.crop_size, vitpcm.crop_probability, True, True)
        dataset = MosaicViewDataset(images, NUM_CLASSES, views, *normalisation(backbone), seed=0,
                                    render_in_worker=not on_device)
        step_losses = vitpcm_losses(model, vitpcm, (views.tile_size // patch,) * 2, timer, device)
        if on_device:
            step_losses = rendered_first(step_losses, timer, device, lambda batch: dict(zip(
                ("image", "tile"), render_mosaic_batch(batch, views, dataset.mean, dataset.std, device),
                strict=True)))
    elif args.method == "pc2m":
        model = build_network(backbone, Architecture("pc2m", NUM_CLASSES, 0))
        views = ViewSettings(args.global_size, args.local_size, (0.8, 1.0), (0.3, 0.6), 10.0, True, True)
        dataset = TwoViewDataset(images, NUM_CLASSES, views, *normalisation(backbone), seed=0,
                                 render_in_worker=not on_device)
        step_losses = pc2m_losses(model, (args.local_size // patch,) * 2, timer, device)
        if on_device:
            step_losses = rendered_first(step_losses, timer, device, lambda batch: dict(zip(
                ("global", "local"), render_view_batch(batch, views, dataset.mean, dataset.std, device),
                strict=True)))
    item_ms = worker_ms_per_item(dataset, 16)
    model.to(device).train()
    if args.method not in SETUPS:
        optimizer = torch.optim.Adam(set_trainable(model, 5), lr=1e-4, fused=fast or None)
    # Warm-up, the breakdown's steps, as many free-running ones, and with --profile as many again
    # under the profiler (its overhead stays out of the timings).
    batches = [list(range(i * args.batch_size, (i + 1) * args.batch_size)) for i in range(total_steps(args))]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers, pin_memory=fast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    iterator = iter(loader)

    def run_steps(count: int) -> None:
        for _ in range(count):
            began = time.perf_counter()
            batch = next(iterator)
            timer.add("data", time.perf_counter() - began)
            loss, began = step_losses(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            after_step()
            timer.sync()
            timer.add(LAST_PART[args.method], time.perf_counter() - began)

    # The first step (allocations, worker start-up; with compile, the compilation of both views'
    # shapes forward and backward) is not timed; compiling, a second one makes sure of it.
    warmup_began = time.perf_counter()
    run_steps(warmup_steps(compiled))
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - warmup_began
    graphs = compiled_graphs()
    timer.totals.clear()
    run_steps(args.iterations)
    timer.breakdown, free_began = False, time.perf_counter()
    run_steps(args.iterations)
    if device.type == "cuda":
        torch.cuda.synchronize()
    free_s = time.perf_counter() - free_began
    graphs_timed = compiled_graphs() - graphs
    if args.profile and stage_settings:
        with profiled(args.profile, f"{args.method} {name}, batch {args.batch_size}, "
                      f"{args.iterations} free-running steps, {device}"):
            run_steps(args.iterations)
    timer.breakdown = True
    if args.method == "pc2m":
        timer.totals["loss+backward+step"] -= timer.totals.get("sinkhorn", 0.0)
    total = sum(timer.totals.values())
    images_done = args.iterations * args.batch_size
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    label = f"{name} ({'stage settings' if stage_settings else 'reference'})" if two_rows(args, device) else name
    return {"model": label, "images/s": images_done / free_s, "images/s with waits": images_done / total,
            "views": 0.0, "worker ms/item": item_ms, "warm-up s": warmup_s, "compiled blocks": int(compiled),
            "graphs compiled in timed steps": graphs_timed,
            **{k: v / args.iterations for k, v in timer.totals.items()}, "peak MiB": peak}


def compiling(method: str, setting: str, device: torch.device) -> bool:
    """Whether the stage settings compile the backbone's blocks (train.compile = ``setting``)."""
    return method in ("pc2m", "vitpcm") and compile_wanted(setting, device)


def warmup_steps(compiled: int) -> int:
    return 2 if compiled else 1


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (its ``unique_graphs`` counter)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def total_steps(args: argparse.Namespace) -> int:
    return warmup_steps(1) + (3 if args.profile else 2) * args.iterations


def worker_ms_per_item(dataset: torch.utils.data.Dataset, count: int) -> float:
    """A DataLoader worker's CPU time per item (decode, resize, and the views where the workers
    render them), one thread as in a worker: how many workers feed a given rate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset[0]  # not timed: the first item's lazy imports (torchvision's colour functions)
        began = time.process_time()
        for index in range(1, count + 1):
            dataset[index % len(dataset)]
        return (time.process_time() - began) / count * 1000
    finally:
        torch.set_num_threads(threads)


def two_rows(args: argparse.Namespace, device: torch.device) -> bool:
    """Whether the stage settings differ from the reference: on CUDA, or on the CPU views asked on
    the device, compiled blocks or bf16 LSTMs (ViT-PCM)."""
    return (device.type == "cuda" or any(compiling(args.method, setting, device) for setting in args.compile)
            or (args.method in ("pc2m", "vitpcm") and views_on_device(args.views_on, device))
            or (args.method == "vitpcm" and args.lstm_precision != ["float32"]))


def stage_variants(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(train.compile, lstm precision) of each stage-settings row."""
    precisions = args.lstm_precision if args.method == "vitpcm" else ["float32"]
    return [(setting, precision) for setting in args.compile for precision in precisions]


def rendered_first(step_losses: StepLosses, timer: Timer, device: torch.device,
                   render: Callable[[dict], dict]) -> StepLosses:
    """``step_losses`` after the batch's views are rendered on the device ("views")."""

    def step(batch: dict) -> tuple[torch.Tensor, float]:
        began = time.perf_counter()
        views = render(batch)
        timer.sync()
        timer.add("views", time.perf_counter() - began)
        return step_losses({**batch, **views})

    return step


# The part of a step timed from the loss function's returned start to after the Adam step.
LAST_PART = {"pc2m": "loss+backward+step", "vitpcm": "backward+step", "rcm_mam": "backward+step",
             "csrm": "backward+step"}
# A method's step up to its loss: the loss, and the time at which the last part began.
StepLosses = Callable[[dict], tuple[torch.Tensor, float]]


def pc2m_losses(model: torch.nn.Module, local_grid: tuple[int, int], timer: Timer, device: torch.device) -> StepLosses:
    """Both views forward ("forward"); the loss, Sinkhorn timed apart, belongs to the last part."""
    nu_dataset = torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES, device=device)
    alpha_tilde = nu_dataset.clone()

    def timed_sinkhorn(*a, **k):
        timer.sync()
        began = time.perf_counter()
        out = sinkhorn(*a, **k)
        timer.sync()
        timer.add("sinkhorn", time.perf_counter() - began)
        return out

    def step_losses(batch: dict) -> tuple[torch.Tensor, float]:
        began = time.perf_counter()
        with mixed_precision(device):
            global_pred = model(batch["global"].to(device))
            local_pred = model(batch["local"].to(device))
        timer.sync()
        timer.add("forward", time.perf_counter() - began)
        began = time.perf_counter()
        targets = batch["target"].to(device)
        alpha = batch_class_marginal(alpha_tilde, multi_hot_frequencies(targets), nu_dataset)
        alignment = local_to_global(batch["theta_global"].to(device), batch["theta_local"].to(device), local_grid)
        losses.sinkhorn = timed_sinkhorn
        try:
            terms = losses.pc2m_loss(global_pred, local_pred, alignment, targets, alpha, 0.1,
                                     losses.LossSettings(True, True, 3))
        finally:
            losses.sinkhorn = sinkhorn
        return terms.total, began

    return step_losses


def vitpcm_losses(model: torch.nn.Module, settings: ViTPCMSettings, tile_grid: tuple[int, int], timer: Timer,
                  device: torch.device) -> StepLosses:
    """The training step's forward passes, ET target and loss (``vitpcm.vitpcm_step``): "forward"."""

    def step_losses(batch: dict) -> tuple[torch.Tensor, float]:
        began = time.perf_counter()
        terms, _ = vitpcm_step(model, batch, settings, tile_grid, device, LOCAL)
        timer.sync()
        timer.add("forward", time.perf_counter() - began)
        return terms.total, time.perf_counter()

    return step_losses


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        images = synthetic_images(Path(folder), args.batch_size * total_steps(args))
        rows = []
        default = {"rcm_mam": ["resnet38"], "csrm": ["resnest101e"]}.get(args.method, list(MODELS))
        models = default if args.models == list(MODELS) else args.models
        variants = stage_variants(args)
        for model in models:
            stage_rows = []
            for setting, precision in variants:
                stage_rows.append(bench_model(MODELS.get(model, model), args, device, images,
                                              compile_setting=setting, lstm_precision=precision))
                if len(variants) > 1:
                    stage_rows[-1]["model"] += f", compile {setting}" + (
                        f", LSTM {precision}" if args.method == "vitpcm" else "")
            reference = (bench_model(MODELS.get(model, model), args, device, images, stage_settings=False)
                         if two_rows(args, device) else None)
            for row in stage_rows:
                row["vs reference"] = row["images/s"] / reference["images/s"] if reference else 1.0
            rows += stage_rows
            if reference:
                rows.append({**reference, "vs reference": 1.0})
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss of the process (cumulative)"
    if args.method == "rcm_mam":
        what, keys = f"RCM+MAM, crops {args.local_size}, scales 0.5/1/2", ["data", "forward", "backward+step"]
    elif args.method == "csrm":
        what, keys = f"CSRM, {args.global_size} px squares, in-loop CRF", ["data", "forward", "backward+step"]
    elif args.method == "vitpcm":
        what, keys = f"ViT-PCM, main view {args.global_size}", ["data", "views", "forward", "backward+step"]
    else:
        what, keys = f"PC2M, views {args.global_size}/{args.local_size}", ["data", "views", "forward", "sinkhorn",
                                                                         "loss+backward+step"]
    stage = (f"stage settings: train.compile {' / '.join(args.compile)}"
             + (f", train.vitpcm.lstm_precision {' / '.join(args.lstm_precision)}" if args.method == "vitpcm" else ""))
    print(f"# {what} training step, {device} ({platform.processor() or platform.machine()}, {args.threads} threads), "
          f"batch {args.batch_size}, {args.iterations} timed steps; images/s: {args.iterations} more steps run free "
          "(as the stage: no waits for the device); with waits: the breakdown's steps, which wait for the device "
          f"after each part (the parts' columns, seconds per step); peak memory: {memory}; {stage}; warm-up s: "
          "the untimed first step (2 steps with compiled blocks: their compile time)\n")
    keys = ["model", "images/s", "vs reference", "images/s with waits", *keys, "peak MiB", "worker ms/item",
            "warm-up s"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")
    for row in rows:
        if row["compiled blocks"]:
            print(f"\n{row['model']}: {row['compiled blocks']} blocks compiled; "
                  f"{row['graphs compiled in timed steps']} graphs compiled during the timed steps (0 expected)")


if __name__ == "__main__":
    main()
