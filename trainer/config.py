"""Typed, frozen configuration: model, data, ReLoRA and training.

A run is described by one :class:`TrainConfig`. It is built from, in order of
precedence (later wins): a preset's defaults, a YAML/JSON file, CLI flags, and
``key=value`` overrides with dotted keys (``lr=1e-3``, ``model.d_model=128``,
``relora.rank=8``). Every problem is collected and reported at once as a
:class:`ConfigError` (a ``ValueError``) with a one-line message, before anything
is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError  # defined there; importable from here as before
from trainer.hf_data import hub_name
from trainer.names import ATTN_PROJS, MLP_PROJS
from trainer.run_format import RENAMED_KEYS  # old key → new key, for config files, --set and manifests
from trainer.tokenizer import parse_tokenizer_spec

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the pico-decoder (SPEC §2). Defaults are the study's *tiny* model."""

    vocab_size: int = 50304
    d_model: int = 96
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 4
    d_mlp: int = 384
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def problems(self) -> list[str]:
        p = _positive(
            self, "model.", ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_mlp", "max_seq_len")
        )
        if self.n_heads > 0 and self.d_model % self.n_heads:
            p.append(f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}")
        elif self.n_heads > 0 and (self.d_model // self.n_heads) % 2:
            p.append(f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            p.append(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        if not self.rope_theta > 0:
            p.append(f"model.rope_theta must be > 0, got {self.rope_theta}")
        if not 0 < self.norm_eps < 1:
            p.append(f"model.norm_eps must be in (0, 1), got {self.norm_eps}")
        if not self.init_std > 0:
            p.append(f"model.init_std must be > 0, got {self.init_std}")
        return p

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """``(out, in)`` of each projection a layer has (the ReLoRA targets), as :class:`trainer.model.Decoder` builds them.

        With ``hd = d_model / n_heads``: ``q`` (n_heads·hd, d_model), ``k``/``v``
        (n_kv_heads·hd, d_model), ``o`` (d_model, n_heads·hd), ``gate``/``up``
        (d_mlp, d_model), ``down`` (d_model, d_mlp).
        """
        hd = self.d_model // self.n_heads if self.n_heads > 0 else 0
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        return {
            "q": (q, self.d_model),
            "k": (kv, self.d_model),
            "v": (kv, self.d_model),
            "o": (self.d_model, q),
            "gate": (self.d_mlp, self.d_model),
            "up": (self.d_mlp, self.d_model),
            "down": (self.d_model, self.d_mlp),
        }


#: Model presets. ``tiny``/``small`` are the study's 11M/65M models; ``micro`` runs on a CPU in seconds.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "micro": ModelConfig(vocab_size=512, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=256, max_seq_len=128),
    "tiny": ModelConfig(),
    "small": ModelConfig(d_model=384, d_mlp=1536),
}


#: data sources of raw text, tokenised with ``data.tokenizer`` (the others bring their own token ids)
TEXT_SOURCES = ("text", "hf")


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from.

    ``source``: ``grammar`` (the built-in generated corpus, word-level tokens),
    ``text`` (UTF-8 text files, byte-level tokens, ``path`` a file or directory of
    ``*.txt``), or ``parquet`` (pre-tokenised, an ``input_ids`` column of
    sequences; ``path`` a file or directory of ``*.parquet``). ``val_path`` gives
    a separate validation set; otherwise the last ``val_fraction`` of the tokens
    is held out. ``train_tokens``/``val_tokens`` size the generated corpus.
    ``hf`` reads Hugging Face ``datasets`` (:mod:`trainer.hf_data`): ``path`` is a
    ``save_to_disk`` directory, local data files (``format`` ``auto`` infers
    json/jsonl/parquet/text/csv from the extension) or a hub dataset name;
    ``split`` picks the split, ``val_split`` an optional validation split of the
    same dataset, ``subset`` a hub dataset's configuration (e.g. ``wikitext-103-raw-v1``
    of ``wikitext``), ``text_column`` the column of text (an ``input_ids`` column is
    used as pre-tokenised ids). ``workers`` processes tokenise text in parallel
    (same tokens for any count).
    ``tokenizer`` (text sources): ``bytes`` (ids 0..255, 256 ends a document),
    ``bpe:N`` (a byte-level BPE of at most N ids trained on the training text) or
    the path of a ``tokenizer.json`` (:mod:`trainer.tokenizer`).
    """

    source: str = "grammar"
    path: str | None = None
    val_path: str | None = None
    val_fraction: float = 0.05
    text_column: str = "text"
    split: str = "train"
    val_split: str | None = None
    format: str = "auto"
    subset: str | None = None
    workers: int = 1
    train_tokens: int = 2_000_000
    val_tokens: int = 100_000
    seed: int = 0
    tokenizer: str = "bytes"

    def problems(self) -> list[str]:
        p = []
        if self.source not in ("grammar", "text", "parquet", "hf"):
            p.append(f"data.source must be one of grammar, text, parquet, hf; got {self.source!r}")
        elif self.source != "grammar" and not self.path:
            p.append(f"data.path is required for data.source={self.source!r}")
        for attr in ("path", "val_path"):
            value = getattr(self, attr)
            if value and not Path(value).exists() and not (self.source == "hf" and hub_name(value)):
                p.append(f"data.{attr}: {value!r} does not exist")
        p += self._hf_problems()
        if not 0 < self.val_fraction < 1:
            p.append(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        p += _positive(self, "data.", ("train_tokens", "val_tokens"))
        p += _seed_problems(self.seed, "data.seed")
        p += self._tokenizer_problems()
        return p

    def _hf_problems(self) -> list[str]:
        """The settings of ``data.source=hf`` (and ``data.workers``, which every text source uses)."""
        p = []
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            p.append(f"data.workers must be an integer >= 1, got {self.workers!r}")
        if self.format not in DATA_FORMATS:
            p.append(f"data.format must be one of {', '.join(DATA_FORMATS)}; got {self.format!r}")
        for attr in ("text_column", "split"):
            if not isinstance(getattr(self, attr), str) or not getattr(self, attr):
                p.append(f"data.{attr} must be a non-empty string, got {getattr(self, attr)!r}")
        if self.source != "hf":
            changed = [
                k
                for k in ("text_column", "split", "val_split", "format", "subset")
                if getattr(self, k) != _HF_DEFAULTS[k]
            ]
            if changed:
                p.append(f"data.{changed[0]} applies to data.source=hf only (data.source={self.source!r})")
        elif self.val_split is not None and self.val_path:
            p.append("data.val_split and data.val_path both give a validation set; set one")
        elif self.val_split is not None and self.val_split == self.split:
            p.append(f"data.val_split={self.val_split!r} is the training split too; name another split")
        return p

    def _tokenizer_problems(self) -> list[str]:
        """``data.tokenizer`` must parse (:func:`trainer.tokenizer.parse_tokenizer_spec`) and suit the source."""
        try:
            parse_tokenizer_spec(self.tokenizer)
        except ConfigError as e:
            return [str(e)]
        if self.tokenizer != "bytes" and self.source not in TEXT_SOURCES:
            return [f"data.tokenizer applies to text sources only; data.source={self.source!r} brings its own tokens"]
        return []


#: ``data.format`` values: ``auto`` infers a local data file's builder from its extension (:mod:`trainer.hf_data`).
DATA_FORMATS = ("auto", "json", "parquet", "text", "csv")
_HF_DEFAULTS = {"text_column": "text", "split": "train", "val_split": None, "format": "auto", "subset": None}


#: Projections ReLoRA can wrap: every attention and MLP projection leaf (from :mod:`trainer.names`).
RELORA_TARGETS: tuple[str, ...] = (*ATTN_PROJS, *MLP_PROJS)
OPTIMIZER_RESETS = ("none", "full", "random", "magnitude")


@dataclass(frozen=True)
class ReLoRAConfig:
    """ReLoRA settings (SPEC §3). Used when ``method = "relora"``.

    Three periodic events, each with one name: a **merge** (``W ← W + s·B·A``
    and fresh adapters) every ``merge_every`` updates; an **optimizer reset**
    (pruning the adapters' Adam state) every ``optimizer_reset_every``; an
    **lr restart** (the jagged cosine drops to 0 and warms up again over
    ``lr_restart_warmup`` updates) every ``lr_restart_every``. The last two
    default (``None``) to the merge period. ``optimizer_reset_ratio`` defaults
    to 0.999 for ``random`` and 0.9 for ``magnitude``. The keys
    ``reset_every``/``restart_warmup`` of older configs and manifests load as
    ``merge_every``/``lr_restart_warmup`` (:data:`RENAMED_KEYS`).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = RELORA_TARGETS
    merge_every: int = 2000
    optimizer_reset_every: int | None = None
    lr_restart_every: int | None = None
    lr_restart_warmup: int = 100
    optimizer_reset: str = "random"
    optimizer_reset_ratio: float | None = None
    warm_start_steps: int = 0

    @property
    def scale(self) -> float:
        """The adapter scale ``s = alpha / r``."""
        return self.alpha / self.rank

    def problems(self) -> list[str]:
        p = _positive(self, "relora.", ("rank", "merge_every"))
        if not self.alpha > 0:
            p.append(f"relora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            p.append(f"relora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in RELORA_TARGETS]
        if bad or not self.targets:
            p.append(f"relora.targets must be a non-empty subset of {list(RELORA_TARGETS)}, got {list(self.targets)}")
        for attr in ("optimizer_reset_every", "lr_restart_every"):
            v = getattr(self, attr)
            if v is not None and v <= 0:
                p.append(f"relora.{attr} must be > 0, got {v}")
        if self.lr_restart_warmup < 0 or self.lr_restart_warmup >= self.lr_restart_period:
            p.append(
                f"relora.lr_restart_warmup={self.lr_restart_warmup} must be in "
                f"[0, lr restart period {self.lr_restart_period})"
            )
        if self.optimizer_reset not in OPTIMIZER_RESETS:
            p.append(f"relora.optimizer_reset must be one of {list(OPTIMIZER_RESETS)}, got {self.optimizer_reset!r}")
        r = self.optimizer_reset_ratio
        if r is not None and not 0 <= r <= 1:
            p.append(f"relora.optimizer_reset_ratio must be in [0, 1], got {r}")
        if self.warm_start_steps < 0:
            p.append(f"relora.warm_start_steps must be >= 0, got {self.warm_start_steps}")
        return p

    @property
    def optimizer_reset_period(self) -> int:
        """Updates between two optimizer resets: ``optimizer_reset_every``, else the merge period."""
        return self.optimizer_reset_every or self.merge_every

    @property
    def lr_restart_period(self) -> int:
        """Updates between two lr restarts: ``lr_restart_every``, else the merge period."""
        return self.lr_restart_every or self.merge_every

    @property
    def prune_ratio(self) -> float:
        """Fraction of optimizer-state entries zeroed at an optimizer reset."""
        if self.optimizer_reset_ratio is not None:
            return self.optimizer_reset_ratio
        return {"none": 0.0, "full": 1.0, "random": 0.999, "magnitude": 0.9}[self.optimizer_reset]


#: Study settings (SPEC §3) as a named preset for ``relora``.
RELORA_STUDY = ReLoRAConfig()

CAPTURE_DTYPES = ("float16", "float32")
CAPTURE_COMPRESSIONS = ("gzip", "lzf", "none")


@dataclass(frozen=True)
class CaptureConfig:
    """Dense learning-dynamics capture into ``dynamics/step_XXXXXX.h5`` (SPEC §4; schema in ``data/README.md``).

    ``every``: capture interval in steps, a multiple of ``checkpoint_interval``
    (``None``: at every checkpoint); the last step is always captured. The probe
    set is chosen once from the data, ``seq_len`` and ``capture.seed`` only (not
    the run's seed), so runs on the same data share it: ``probe_sequences``
    validation sequences for activations, of which ``token_sample`` fixed,
    recorded token positions are stored (``None``: every position), and
    ``grad_sequences`` training sequences for gradients. ``act_names`` and
    ``grad_names`` are globs over canonical names selecting the sites.
    """

    enabled: bool = True
    every: int | None = None
    probe_sequences: int = 8
    grad_sequences: int = 8
    token_sample: int | None = 512
    act_names: tuple[str, ...] = ("**",)
    grad_names: tuple[str, ...] = ("layers.**",)
    act_dtype: str = "float16"
    grad_dtype: str = "float32"
    compression: str = "gzip"
    compression_level: int = 1
    seed: int = 0

    def problems(self) -> list[str]:
        p = _positive(self, "capture.", ("probe_sequences", "grad_sequences"))
        for attr in ("every", "token_sample"):
            v = getattr(self, attr)
            if v is not None and v <= 0:
                p.append(f"capture.{attr} must be > 0 or null, got {v}")
        for attr in ("act_dtype", "grad_dtype"):
            if getattr(self, attr) not in CAPTURE_DTYPES:
                p.append(f"capture.{attr} must be one of {list(CAPTURE_DTYPES)}, got {getattr(self, attr)!r}")
        if self.compression not in CAPTURE_COMPRESSIONS:
            p.append(f"capture.compression must be one of {list(CAPTURE_COMPRESSIONS)}, got {self.compression!r}")
        if not 0 <= self.compression_level <= 9:
            p.append(f"capture.compression_level must be in [0, 9], got {self.compression_level}")
        for attr in ("act_names", "grad_names"):
            if not all(isinstance(g, str) and g for g in getattr(self, attr)):
                p.append(
                    f"capture.{attr} must be a list of non-empty globs (e.g. [layers.*.attn.q]), got {list(getattr(self, attr))}"
                )
        p += _seed_problems(self.seed, "capture.seed")
        return p


#: Experiment trackers ``logger=`` accepts (:mod:`trainer.tracking`); each is an extra of the package.
TRACKERS = ("tensorboard", "wandb", "mlflow")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class TrackingConfig:
    """Where the experiment trackers of ``logger=`` write (:mod:`trainer.tracking`); ``None``: under the run directory.

    ``tensorboard_dir`` (default ``<run>/tb``); ``wandb_dir`` the directory W&B
    puts its ``wandb/`` folder in (default the run directory: ``<run>/wandb/``),
    ``wandb_project``, ``wandb_mode`` (``None``: ``$WANDB_MODE``, else
    ``offline``: nothing leaves the machine until ``wandb sync``); ``mlflow_uri``
    (default the local file store ``<run>/mlruns``; any tracking URI MLflow
    takes, e.g. ``http://host:5000``) and ``mlflow_experiment``; ``run_name``
    names the W&B and MLflow runs (default the run directory's name).
    """

    tensorboard_dir: str | None = None
    wandb_dir: str | None = None
    wandb_project: str = "relora-dynamics"
    wandb_mode: str | None = None
    mlflow_uri: str | None = None
    mlflow_experiment: str = "relora-dynamics"
    run_name: str | None = None

    def problems(self) -> list[str]:
        p = []
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            p.append(f"tracking.wandb_mode must be one of {', '.join(WANDB_MODES)} or null, got {self.wandb_mode!r}")
        for attr in ("wandb_project", "mlflow_experiment"):
            if not getattr(self, attr):
                p.append(f"tracking.{attr} must be a non-empty name")
        for attr in ("tensorboard_dir", "wandb_dir", "mlflow_uri", "run_name"):
            if getattr(self, attr) == "":
                p.append(f"tracking.{attr} must be non-empty or null (the default)")
        return p


#: Settings that say where a run is watched, not what it computes: left out of :meth:`TrainConfig.to_dict`, hence
#: of the manifest, capture files, resume comparison and run pairing / seed groups. Give them again on --resume.
NOT_STORED = ("logger", "tracking", "given")
#: Fields of :class:`TrainConfig` that are not settings: no config file or ``key=value`` may set them.
NOT_SETTINGS = ("given",)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. ``batch_size`` counts sequences per optimizer step.

    ``seq_len`` is tokens per sequence (``None``: the model's ``max_seq_len``).
    ``warmup_steps`` ``None`` means 10% of ``steps``. ``init_from``
    (``RUN_DIR@STEP``, or ``RUN_DIR`` for its latest checkpoint) starts from
    another run's dense weights instead of a fresh initialisation.
    ``schedule`` is ``cosine`` (linear warmup then cosine to ``min_lr_ratio·lr``),
    ``linear`` (warmup then linear decay to ``min_lr_ratio·lr``) or ``constant``;
    ReLoRA runs always use the jagged cosine of SPEC §3. ``precision`` ``auto``
    means bf16 autocast on CUDA and float32 on CPU. ``compile`` runs the
    training forward and backward through ``torch.compile`` (same function,
    float32 rounding may differ; the first steps pay the compile time);
    ``None`` means on for CUDA, off on CPU. ``tf32`` lets float32 matrix
    products use TF32 tensor cores on CUDA (no effect on CPU).
    ``loss_chunk_tokens`` is how many tokens' logits the fused LM-head
    cross-entropy holds at once (``None``: about 512 MiB of float32 logits;
    ``0``: the plain loss over the full logits). ``prefetch`` is how many
    micro-batches a background thread prepares ahead (pinned memory on CUDA;
    ``0``: prepare each in the training loop). ``logger``: experiment trackers,
    any of ``tensorboard``, ``wandb``, ``mlflow`` (``logger=tensorboard,wandb``;
    ``None``: none), writing where ``tracking`` says; both only watch the run
    (:data:`NOT_STORED`).
    """

    preset: str = "micro"
    method: str = "full"
    model: ModelConfig = field(default_factory=lambda: MODEL_PRESETS["micro"])
    #: What :func:`build_config` was given explicitly (:func:`given_settings`); ``None`` for a config built any
    #: other way. Not a setting: it lets the Python API treat a config like `dynamics train` does (a text run's
    #: vocabulary follows its tokenizer unless ``model.vocab_size`` was given; ``--resume`` replaces only what
    #: was given). Not stored, not compared.
    given: frozenset[str] | None = field(default=None, compare=False, repr=False)
    data: DataConfig = field(default_factory=DataConfig)
    relora: ReLoRAConfig = field(default_factory=ReLoRAConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    schedule: str = "cosine"
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float | None = None
    eval_interval: int = 50
    eval_batches: int = 4
    checkpoint_interval: int = 50
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool | None = None
    tf32: bool = True
    loss_chunk_tokens: int | None = None
    prefetch: int = 2
    init_from: str | None = None
    logger: tuple[str, ...] | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context

    @property
    def context(self) -> int:
        return self.seq_len if self.seq_len is not None else self.model.max_seq_len

    @property
    def warmup(self) -> int:
        """Warmup steps: ``warmup_steps``, or 10% of ``steps`` when unset."""
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def problems(self) -> list[str]:
        p = self.model.problems() + self.data.problems()
        if self.method not in ("full", "relora"):
            p.append(f"method must be 'full' or 'relora', got {self.method!r}")
        if self.method == "relora":
            p += self.relora.problems()
            if not self.model.problems() and self.relora.rank > 0:
                shapes = self.model.projection_shapes()
                small = [
                    (t, shapes[t]) for t in self.relora.targets if t in shapes and min(shapes[t]) < self.relora.rank
                ]
                if small:
                    t, (rows, cols) = min(small, key=lambda x: min(x[1]))
                    p.append(
                        f"relora.rank={self.relora.rank} exceeds min(out, in) = {min(rows, cols)} of the {rows}×{cols} "
                        f"'{t}' projections ({', '.join(x for x, _ in small)} are too small); "
                        f"set relora.rank<={min(rows, cols)} or drop them from relora.targets"
                    )
        p += self.capture.problems()
        every = self.capture.every
        if every is not None and every > 0 and self.checkpoint_interval > 0 and every % self.checkpoint_interval:
            p.append(f"capture.every={every} must be a multiple of checkpoint_interval={self.checkpoint_interval}")
        p += _positive(
            self, "", ("steps", "batch_size", "grad_accum", "eval_batches", "eval_interval", "checkpoint_interval")
        )
        if self.grad_accum > 0 and self.batch_size % self.grad_accum:
            p.append(f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")
        if self.seq_len is not None and not 0 < self.seq_len <= self.model.max_seq_len:
            p.append(f"seq_len={self.seq_len} must be in [1, model.max_seq_len={self.model.max_seq_len}]")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            p.append(f"lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            p.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < max(self.steps, 1):
            p.append(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if self.schedule not in ("cosine", "linear", "constant"):
            p.append(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        for b in ("beta1", "beta2"):
            if not 0 <= getattr(self, b) < 1:
                p.append(f"{b} must be in [0, 1), got {getattr(self, b)}")
        if self.weight_decay < 0:
            p.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            p.append(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        p += _seed_problems(self.seed, "seed")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            p.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.init_from is not None:
            run, _, step = self.init_from.rpartition("@") if "@" in self.init_from else (self.init_from, "", "")
            if step and not step.isdigit():
                p.append(f"init_from must be RUN_DIR or RUN_DIR@STEP, got {self.init_from!r}")
            elif not (Path(run) / "manifest.json").exists():
                p.append(f"init_from: {run!r} is not a run directory (no manifest.json)")
            elif step:
                steps = _listed_steps(Path(run) / "manifest.json")
                if steps is not None and int(step) not in steps:
                    p.append(f"init_from: {run!r} has no checkpoint at step {int(step)} (it has {steps})")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 0:
            p.append(f"loss_chunk_tokens must be >= 0 (0: the plain loss) or null (auto), got {self.loss_chunk_tokens}")
        if self.prefetch < 0:
            p.append(f"prefetch must be >= 0, got {self.prefetch}")
        if self.precision not in ("auto", "fp32", "bf16"):
            p.append(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.logger is not None:
            bad = [name for name in self.logger if name not in TRACKERS]
            if bad or len(set(self.logger)) != len(self.logger):
                p.append(
                    f"logger must be some of {', '.join(TRACKERS)} (each once, comma-separated), got {','.join(self.logger)!r}"
                )
        p += self.tracking.problems()
        return p

    def validate(self) -> TrainConfig:
        """Return ``self`` if valid, else raise :class:`ConfigError` listing every problem."""
        problems = self.problems()
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable nested dict (tuples become lists), without the :data:`NOT_STORED` settings."""
        out = dataclasses.asdict(self)
        for key in NOT_STORED:
            del out[key]
        return dict(json.loads(json.dumps(out)))


def _listed_steps(manifest: Path) -> list[int] | None:
    """Checkpoint steps a run's manifest lists; ``None`` when it cannot be read (loading it reports why)."""
    try:
        entries = json.loads(manifest.read_text()).get("checkpoints")
        return sorted(int(c["step"]) for c in entries)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


#: Largest seed accepted: torch's generators take 64-bit seeds, and the trainer also seeds with ``seed + 1``.
MAX_SEED = 2**63 - 1


def _seed_problems(seed: int, key: str) -> list[str]:
    """A seed outside ``[0, MAX_SEED]`` (torch's generators would refuse it after the run directory was written)."""
    if not 0 <= seed <= MAX_SEED:
        return [f"{key} must be in [0, 2**63-1], got {seed}"]
    return []


def _positive(obj: Any, prefix: str, names: tuple[str, ...]) -> list[str]:
    return [f"{prefix}{n} must be > 0, got {getattr(obj, n)}" for n in names if not getattr(obj, n) > 0]


# ---------------------------------------------------------------------------
# Building a config from presets, files and overrides


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "relora": ReLoRAConfig,
    "capture": CaptureConfig,
    "tracking": TrackingConfig,
}


def _renamed(data: Mapping[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    """One source's nested settings with every old key of :data:`RENAMED_KEYS` under its current name.

    A source that gives both the old and the new key with different values is a
    problem (reported with ``where``); with equal values the old key is dropped.
    """
    out = dict(data)
    for old, new in RENAMED_KEYS.items():
        section, old_leaf = old.split(".")
        new_leaf = new.split(".")[1]
        settings = out.get(section)
        if not isinstance(settings, Mapping) or old_leaf not in settings:
            continue
        settings = dict(settings)
        value = settings.pop(old_leaf)
        if new_leaf in settings and settings[new_leaf] != value:
            problems.append(
                f"{where} sets both {old}={value!r} (its old name) and {new}={settings[new_leaf]!r}; keep {new} only"
            )
        else:
            settings[new_leaf] = value
        out[section] = settings
    return out


def parse_value(text: str) -> Any:
    """Parse an override's value: ints, floats (``1e-3`` too), bools, ``null``/``none``, lists, else a string."""
    s = text.strip()
    low = s.lower()
    if low in ("null", "none", "~"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    if s.startswith("[") and s.endswith("]"):
        return [parse_value(x) for x in s[1:-1].split(",") if x.strip()]
    return s


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "model.d_model=128"]`` → nested dict. Raises :class:`ConfigError` on a malformed item."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (e.g. lr=1e-3 or model.d_model=128), got {item!r}")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = parse_value(value)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping. Raises :class:`ConfigError` with the file name on any problem."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(
            f"config file {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {str(e).splitlines()[0]}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _coerce(value: Any, hint: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against a dataclass field type hint, converting ints to floats and lists to tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is str and value is None:
        return "none"  # `--set capture.compression=none` means the literal option, not null
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, problems)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key} must be a list, got {value!r}")
            return value
        return tuple(_coerce(v, args[0], key, problems) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    ok = isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
    if not ok:
        problems.append(f"{key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, values: Mapping[str, Any], prefix: str, problems: list[str], base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)} - set(NOT_SETTINGS if cls is TrainConfig else ())
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(sorted(known))})"
            problems.append(f"unknown key {prefix + str(key)!r}{hint}")
            continue
        if key in _SECTIONS and cls is TrainConfig:
            continue
        n_before = len(problems)
        coerced = _coerce(value, hints[key], prefix + key, problems)
        if len(problems) == n_before:  # keep only well-typed values, so value checks can still run
            kwargs[key] = coerced
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def build_config(
    *,
    preset: str | None = None,
    file: str | Path | None = None,
    cli: Mapping[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> TrainConfig:
    """Resolve a :class:`TrainConfig` from preset < file < ``cli`` flags < ``key=value`` overrides.

    ``cli`` holds already-typed top-level settings (``None`` values are ignored).
    Old key names (:data:`RENAMED_KEYS`) are accepted in every source.
    Raises :class:`ConfigError` naming every unknown key, wrong type and impossible value.
    """
    problems: list[str] = []
    layered = _layered(file, cli, overrides, problems)
    given = _given_keys(layered, preset)
    preset = preset or layered.get("preset") or "micro"
    if not isinstance(preset, str) or preset not in MODEL_PRESETS:  # a config file may hold any type here
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    layered["preset"] = preset

    sections = {}
    for name, cls in _SECTIONS.items():
        section = layered.get(name, {})
        if not isinstance(section, Mapping):
            problems.append(f"{name} must be a mapping of settings, got {section!r}")
            continue
        base = MODEL_PRESETS[preset] if name == "model" else cls()
        sections[name] = _build(cls, section, name + ".", problems, base=base)
    top = _build(TrainConfig, layered, "", problems)
    if len(sections) == len(_SECTIONS):
        top = dataclasses.replace(top, **sections)
        problems += top.problems()
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return dataclasses.replace(top, given=given)


def _layered(
    file: str | Path | None, cli: Mapping[str, Any] | None, overrides: list[str] | None, problems: list[str]
) -> dict[str, Any]:
    """The nested settings a file, ``cli`` flags (``None`` values dropped) and ``key=value`` overrides give, merged."""
    layered: dict[str, Any] = {}
    if file is not None:
        layered = _merge(layered, _renamed(read_config_file(file), f"config file {str(file)!r}", problems))
    layered = _merge(layered, _renamed({k: v for k, v in (cli or {}).items() if v is not None}, "the config", problems))
    return _merge(layered, _renamed(parse_overrides(overrides), "--set", problems))


def flatten(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Nested settings (``TrainConfig.to_dict()``, a config file) as ``{dotted key: value}``: ``{"model.d_model": 64, ...}``."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key in _SECTIONS and isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def given_settings(
    *,
    preset: str | None = None,
    file: str | Path | None = None,
    cli: Mapping[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> frozenset[str]:
    """Dotted keys of the settings given explicitly (as :func:`build_config` takes them): not a preset's defaults.

    ``preset`` counts when given (as an argument or in the file). ``dynamics train
    --resume`` uses this to tell "continue the stored run" (nothing given) from
    "change this setting" (given): a stored setting is only ever replaced by one
    the user typed. Call it after :func:`build_config` succeeded (it does not re-report problems).
    """
    return _given_keys(_layered(file, cli, overrides, []), preset)


def _given_keys(layered: Mapping[str, Any], preset: str | None) -> frozenset[str]:
    """Dotted keys of the layered settings (:func:`_layered`), and ``preset`` when given as an argument."""
    keys = set(flatten(layered))
    if preset is not None:
        keys.add("preset")
    return frozenset(keys)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Rebuild a config saved with :meth:`TrainConfig.to_dict` (e.g. from a run's manifest, old key names too)."""
    return build_config(cli=data)
