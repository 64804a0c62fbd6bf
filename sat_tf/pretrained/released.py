"""The checkpoints released with the SAT paper, and their download.

Facts from the official repository (cihangxie/SmoothAdversarialTraining): the names and Google
Drive file ids of `ResNet/download_resnet.py` and `EfficientNet/download_efficientnet.py`, the
evaluation flags and numbers of its README. The README's column header says "error rate", but the
numbers are accuracies (its text: "69.7% accuracy and 42.3% robustness"); they are recorded here
as accuracies in percent, measured by the official code with its own image loader (OpenCV,
bicubic resize of the shorter side to size + 32, central crop), epsilon 4, step 1, untargeted PGD.
"""

import dataclasses
import os
from pathlib import Path

from sat_tf.atomic import atomic_path

# The official ResNet evaluation (README): --attack-epsilon=4.0 --attack-step-size=1.0, K=10/20/50.
OFFICIAL_EPSILON = 4.0
OFFICIAL_STEP_SIZE = 1.0
OFFICIAL_NUM_STEPS = (10, 20, 50)
SOURCE = "github.com/cihangxie/SmoothAdversarialTraining README (measured by the official code)"
_DRIVE = "https://drive.google.com/uc?id="


@dataclasses.dataclass(frozen=True)
class Released:
    """One released checkpoint.

    Attributes:
        name: The name of the official download scripts (also its folder and file prefix).
        family: "resnet" (Tensorpack, NCHW) or "efficientnet" (tensorflow/tpu).
        arch: The zoo model (`sat_tf.models.build` name).
        activation: The activation (`sat_tf.activations` name).
        image_size: The evaluation resolution.
        reported: Official README accuracies in percent: clean, pgd-10, pgd-20, pgd-50 (None where
            the README gives none).
        drive_ids: Google Drive ids of the .meta, .data-00000-of-00001 and .index files.
        moving_average: Whether the official evaluation restores the ExponentialMovingAverage
            shadows (EfficientNet's `--moving_average_decay` > 0).
        official_flags: The README's evaluation flags for this row.
    """

    name: str
    family: str
    arch: str
    activation: str
    image_size: int
    reported: tuple
    drive_ids: tuple
    moving_average: bool = False
    official_flags: str = ""

    @property
    def reported_accuracy(self):
        """{"clean": .., "pgd-10": .., ...} in percent, without the rows the README leaves out."""
        keys = ("clean", "pgd-10", "pgd-20", "pgd-50")
        return {k: v for k, v in zip(keys, self.reported, strict=True) if v is not None}


def _resnet(name, arch, activation, size, reported, ids, flags):
    return Released(name, "resnet", arch, activation, size, reported, ids, False, flags)


def _efficientnet(name, arch, clean, ids, ema=False):
    decay = "0.9999" if ema else "0"
    model = "efficientnet-bL1" if arch == "efficientnet_l1" else arch.replace("_", "-")
    flags = f"--model_name={model} --moving_average_decay={decay}"
    return Released(
        name, "efficientnet", arch, "silu", 0, (clean, None, None, None), ids, ema, flags
    )


_R50 = "--activation-name={} -d=50 --res2-bottleneck=64 --group=1 --input-size={}"
_RESNETS = (
    ("Res50-relu", "resnet50", "relu", 224, (68.7, 35.3, 33.7, 33.1),
     ("132lC0k7EWjT371NZRY7OzULA-AshcDqc", "1f03RpPMF6_OyVnL7F8RnbkPT4uitnucX",
      "1cohW6FAE7dTaC7RARiqP3fVbiE5AVX4f"), _R50.format("relu", 224)),
    ("Res50-silu", "resnet50", "silu", 224, (69.7, 43.0, 42.2, 41.9),
     ("1NEDQyTYKTd4aw8lpWe4LsLC9EVf3Uat3", "1y3yAKrXgyGF7pnXoZg7R6Ge6N3LsXa_B",
      "1VvnMZyrntlLfWnQAdY9wfuCAGJ4fMU3x"), _R50.format("silu", 224)),
    ("Res50-smoothrelu", "resnet50", "smooth_relu", 224, (69.3, 41.3, 40.4, 40.1),
     ("1oibs4xXh6tZCezYaalJ4jyFFF55hzao7", "1mtm-QspciqS-_AXHNGgy-sqwtAAgtiw_",
      "18FizqadONHUAgysO8EoNyxFAzxpjJq_V"), _R50.format("smoothrelu", 224)),
    ("Res50-gelu", "resnet50", "gelu", 224, (69.9, 42.6, 41.8, 41.5),
     ("1DzBg4N40f9Lm8hH9oLEIaocy-tOf5edW", "1bNkq7B_oq6AWoUQb74GlERRPTX8wQuFY",
      "1WXZNTAZwZ_JsgXN6mNwm3CMwyFTfknkb"), _R50.format("gelu", 224)),
    ("Res50-elu", "resnet50", "elu", 224, (69.0, 41.6, 40.9, 40.7),
     ("12ebpFW5eJC0_V5GfwRf_7Xf4Epdqm4QZ", "1eymHm21mkxm5aL24Uca8aFqj6FPLqBcw",
      "11PCXlx7XNs7bkg2LH6RiCysJf5J2sgRq"), _R50.format("elu", 224)),
    ("Res50-softplus", "resnet50", "softplus", 224, (None, None, None, None),
     ("15kJvWfYNlgm3lIfKbQSfgV-bEyPoND8t", "16SLoDVJWK5w_69f8PoOHrxZZNakKaCXW",
      "1HnBSIWV4w8o2cD8fwb-WbHQZ5nxz7YSS"), _R50.format("softplus", 224)),
    ("Res50-mish", "resnet50", "mish", 224, (None, None, None, None),
     ("1I0ObFU__xnC2RLo99JVsHT29_JhwLIpA", "1yhHDRwbVA4okcGtJ4Y9pz0DbfvmH4zEg",
      "1W-4IR9IbJI-qBFlBfFlChp1OekjpQoGK"), _R50.format("mish", 224)),
    ("Res50-silu-299", "resnet50", "silu", 299, (70.7, 44.6, 43.8, 43.6),
     ("1PkArMefesGXqX7PGLI2ibKoMy31AndNK", "1Qlbet7k8_0RmHPzfaZvBpRv-c3R2cjCr",
      "12lpRIpz7hRN7bMHEkZAMqrZr2euirKOA"), _R50.format("silu", 299)),
    ("Res50-silu-380", "resnet50", "silu", 380, (71.6, 44.9, 44.1, 43.8),
     ("1AdjhY9FQa8dLA2Z5RT_3o9L570Nqh5Z_", "1tnHuq7t6PpyeSCeolEQHG7ZWKye4hAY6",
      "16bPLGP6Ltamtcjji2WV63RDxhRU2hoPU"), _R50.format("silu", 380)),
    ("ResX50-silu-32x4d", "resnext50_32x4d", "silu", 224, (71.1, 43.3, 42.5, 42.2),
     ("1oUh6B-0TynxRf7B-4INgDdKbvgzlihY7", "1jIMgBg5VjPp8mToRNvTpKs5jzUFbOceY",
      "1K4KHECxGM8H-QoY7N1XvS6_dxx6Ej87k"),
     "--activation-name=silu -d=50 --res2-bottleneck=4 --group=32 --input-size=224"),
    ("ResX50-silu-32x8d", "resnext50_32x8d", "silu", 224, (73.3, 46.3, 45.2, 44.8),
     ("1c9vGl81tyaN6W-p3E_ogOw6ZJtorv4V4", "1_tbqY26jFp5TPIXDHQu1qyC2Rx_5ZrcW",
      "1-QZmB4eUDPQ2Pyx651gKI5CRamcOmBHk"),
     "--activation-name=silu -d=50 --res2-bottleneck=8 --group=32 --input-size=224"),
    ("Res101-silu", "resnet101", "silu", 224, (72.9, 46.4, 45.5, 45.2),
     ("1mSI36SYH2axrV_9vVeVdTFk0H9BWlLxn", "1r_IM4JXR1hmummpTbzHj1gb2BwrAZbi8",
      "1-95fYvBaCFoHWnM0USEOWeLORDdS48ek"),
     "--activation-name=silu -d=101 --res2-bottleneck=64 --group=1 --input-size=224"),
    ("Res152-silu", "resnet152", "silu", 224, (74.0, 47.3, 46.2, 45.8),
     ("1H1fMjSzgey41FbVmTbWXpbB0d8IVg8OD", "1D44_MDY0aylpHi7iJ3xqRHsQNCb-TFcX",
      "17V5SS8zeYEb-WEHk0_U_8T_20uujR3T9"),
     "--activation-name=silu -d=152 --res2-bottleneck=64 --group=1 --input-size=224"),
    ("ResX152-silu-380-32x8d", "resnext152_32x8d", "silu", 380, (78.0, 53.0, 51.7, 51.0),
     ("1hzFZ1BhBYdTlBuLK1tahww0hIKP-eZ4L", "1tpr3XLzM4s5HlQu7AloGnrMxDOFCDKAx",
      "1kk5QS8n8iVvisdtBu0-SyRR4WVRCYpE0"),
     "--activation-name=silu -d=152 --res2-bottleneck=8 --group=32 --input-size=380"),
)  # fmt: skip
_EFFICIENTNETS = (
    ("efficientnet-b0", "efficientnet_b0", 65.2,
     ("1UgwnDU7kAlPd5l2Hp0AvKoYc-LD5jpAY", "1NVEtGO0l15r2Dc5FBzOKlWr2lqJ11WQD",
      "1ZTFo5RHQYy9zCKghFrQyACFQOsg4srr4")),
    ("efficientnet-b1", "efficientnet_b1", 68.6,
     ("1izecRKPEWbZcaNnfAud7AS3REZldvHDQ", "12EWVkLi0_4Ep6Du933MV1vCwIKAActzT",
      "1Z5oKE9oYLMcl16uK_FOWjY_sbeFhljRp")),
    ("efficientnet-b2", "efficientnet_b2", 70.3,
     ("1wgWGtZqOMq0LPR4FDelT1G64tbQu-pO0", "1QkDEm6OSgeeRwYd9suXtQbu-3yC9ebmu",
      "1-_GlLOlIhwnhu1lnT1rv9aleTR1VmXAs")),
    ("efficientnet-b3", "efficientnet_b3", 73.1,
     ("1rq2Tx4qif5mQdY1e52usvv4LP4hb8gIb", "1zlCLPKaX4i9_ikuJzusY4aV9kTGzXLqF",
      "1BeyzyFYA43CwGvlXyNNG-2EswH4DLQNt")),
    ("efficientnet-b4", "efficientnet_b4", 75.9,
     ("1XXrDvIILllqouDwygEI095arHhytvuY_", "17cMDXEqNjzXpPcvhSWAA7pDfTxGl3I9Q",
      "1O5N_WD-ofuSG5n5OOiNiZRpcBIhh0Ykg")),
    ("efficientnet-b5", "efficientnet_b5", 77.8,
     ("1dOy6lnfrmPp861rLcl-pJ1s9wlgZi9rd", "1EWF0H_26zj6_kvdxQD1mYjjLzW9K7qHz",
      "1QG81MOXKF1MpUYV9nTECfOimmGCQuiH2")),
    ("efficientnet-b6", "efficientnet_b6", 79.2,
     ("1x9wIeges7c9acxEV-ZrL1zIUkrqCQjmm", "1iA-XyCRmXzyvHr-IP21xvHxD2y4lesyK",
      "14y9VCC7mHSE6cX10hkof5-vFA2bkjd31")),
    ("efficientnet-b7", "efficientnet_b7", 79.8,
     ("1l2iSHdISRu19WwBRMtv--wtEV_Ra6Zp8", "1koh9au89VJR6sB1b4ep2azbUmNiDmblj",
      "1SAZt2Ald7MVWsxz_Hpe7F1bTEZW7nQdF")),
    ("efficientnet-bL1", "efficientnet_l1", 80.7,
     ("1xDI4Rg1r56gq9SKLg8DstezwLgKmMWfV", "1jGniWU77jQtjxjRqnd4GRoefCaJ9dnzr",
      "1MZr3Vx1E7qICamwpV_CFs1i2BZ40O6oq")),
)  # fmt: skip
_L1_ENHANCED = (
    "efficientnet-bL1-enhanced",
    "efficientnet_l1",
    82.2,
    (
        "1kepUwuVvENHT16ukAq6Wln_x2rVR2BEi",
        "1ceFsUZYWYh2usgVZV9uDnn9zc6NgWFty",
        "1CJvhOkKaEaPvNqe_ZZelsMzJpuitysAv",
    ),
)

RELEASED = {
    **{row[0]: _resnet(*row) for row in _RESNETS},
    **{row[0]: _efficientnet(*row) for row in _EFFICIENTNETS},
    _L1_ENHANCED[0]: _efficientnet(*_L1_ENHANCED, ema=True),
}
_SUFFIXES = (".meta", ".data-00000-of-00001", ".index")


def from_prefix(prefix):
    """The released entry whose name is the file name of `prefix` (e.g. .../Res50-silu), or None."""
    return RELEASED.get(Path(str(prefix)).name)


def cache_dir():
    """Where `download` puts checkpoints: $SAT_TF_CACHE, else ~/.cache/sat_tf/official."""
    default = Path.home() / ".cache" / "sat_tf" / "official"
    return Path(os.environ.get("SAT_TF_CACHE") or default)


def download(name, directory=None, *, downloader=None):
    """Downloads a released checkpoint (the three files of the official scripts).

    Args:
        name: A key of `RELEASED` (e.g. "Res50-silu", "efficientnet-b0").
        directory: Cache folder; default `cache_dir()`. Files go to `<directory>/<name>/<name>.*`,
            the layout of the official download scripts.
        downloader: `f(url, path)`; default `gdown.download` (`pip install sat_tf[pretrained]`).

    Returns:
        The checkpoint prefix, for `load_official`. Files already there are not fetched again.

    Raises:
        ValueError: for an unknown name; ImportError: without gdown; RuntimeError: a failed fetch.
    """
    if name not in RELEASED:
        raise ValueError(f"Unknown checkpoint {name!r}. Released: {', '.join(RELEASED)}.")
    if downloader is None:
        try:
            import gdown
        except ImportError as error:
            raise ImportError(
                "Downloading needs gdown: pip install 'sat_tf[pretrained]' (or pip install gdown)."
            ) from error

        def downloader(url, path):
            return gdown.download(url, str(path), quiet=False)

    folder = Path(directory or cache_dir()) / name
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, file_id in zip(_SUFFIXES, RELEASED[name].drive_ids, strict=True):
        target = folder / f"{name}{suffix}"
        if target.exists():
            continue
        with atomic_path(target) as partial:  # a failed or killed fetch leaves no file named target
            result = downloader(_DRIVE + file_id, partial)
            if result is None or not partial.exists():
                raise RuntimeError(f"Download of {name}{suffix} ({_DRIVE}{file_id}) failed.")
    return str(folder / name)
