"""What one training epoch runs: a typed specification built from the resolved config.

:meth:`EpochSpec.from_config` builds it inside the train job; it travels to the torchrun
processes as JSON (:meth:`EpochSpec.to_json`). It is never a Snakemake param: the rule's params
are the config's plain values (``tunemake.config.epoch_identity``), which Snakemake compares.
Convert builds the parts it needs with :meth:`Method.for_export` and :class:`BaseModel`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tunemake.errors import TunemakeError
from tunemake.hub import model_dir
from tunemake.templates import HF, Template, template_from_dict, template_to_dict

METHOD_TYPES = ("full", "lora", "qlora")


class TrainError(TunemakeError):
    """Training cannot start or go on (bad configuration, non-finite loss, missing state)."""


@dataclass(frozen=True)
class Method:
    """A fine-tuning method as the config's ``methods:`` entry gives it (defaults: the schema's)."""

    type: str
    r: int = 64
    alpha: float = 16
    dropout: float = 0.1
    bias: str = "none"
    target_modules: str | tuple[str, ...] = "all-linear"
    modules_to_save: tuple[str, ...] = ()
    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    gradient_checkpointing: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> Method:
        """From a config entry or what a checkpoint recorded (:meth:`to_dict`)."""
        values = dict(data)
        if isinstance(values.get("target_modules"), list):
            values["target_modules"] = tuple(values["target_modules"])
        values["modules_to_save"] = tuple(values.get("modules_to_save") or ())
        values["gradient_checkpointing"] = bool(values.get("gradient_checkpointing"))
        return cls(**values)

    def to_dict(self) -> dict:
        """Plain JSON values, as the config writes them (what checkpoints record)."""
        values = asdict(self)
        for key in ("target_modules", "modules_to_save"):
            if isinstance(values[key], tuple):
                values[key] = list(values[key])
        return values

    @property
    def adapter(self) -> bool:
        return self.type in ("lora", "qlora")

    def for_export(self) -> Method:
        """The structure an exported adapter or model is written from: no quantization (a QLoRA
        adapter is saved for, and merges into, the unquantized base), no checkpointing."""
        return replace(self, type="lora" if self.type == "qlora" else self.type, gradient_checkpointing=False)

    def check(self) -> None:
        if self.type not in METHOD_TYPES:
            raise TrainError(f"method: unknown type {self.type!r}")
        if self.adapter and self.r <= 0:
            raise TrainError(f"method: LoRA rank r must be >= 1, got {self.r}")


@dataclass(frozen=True)
class Settings:
    """An experiment's optimisation settings (``tunemake.config.TRAIN_KEYS`` and the schedule)."""

    seed: int
    batch_size: int
    grad_accumulation: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    max_grad_norm: float | None
    precision: str
    deepspeed: str | None
    gpus: int | None
    nodes: int
    nproc: int
    epochs: int
    schedule: dict
    save_steps: int
    log_steps: int = 10
    evaluation_inputs: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        return cls(**{**data, "betas": tuple(data["betas"]),
                      "evaluation_inputs": tuple(data.get("evaluation_inputs") or ())})


@dataclass(frozen=True)
class BaseModel:
    """A model as configured (``path``: a directory or hub id, at ``revision``) and ``dir``, the
    local directory it is read from (a hub id's cached snapshot; None until resolved)."""

    path: str
    revision: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    dir: str | None = None

    def resolved(self) -> BaseModel:
        """With ``dir`` set; never downloads.

        Raises:
            HubError: a hub id that is not in the cache.
        """
        return self if self.dir else replace(self, dir=str(model_dir(self.path, self.revision)))

    @property
    def config(self) -> dict:
        """The resolved model's ``config.json``."""
        return json.loads((Path(self.resolved().dir) / "config.json").read_text())


@dataclass(frozen=True)
class Outputs:
    """Where epoch n writes: its checkpoint, its resume state, its mid-epoch resume point."""

    pth: str
    state: str
    resume: str


@dataclass(frozen=True)
class Previous:
    """Epoch n-1's checkpoint and resume state."""

    pth: str
    state: str


@dataclass(frozen=True)
class EpochSpec:
    """Everything :func:`tunemake.train.train_epoch` needs for epoch ``epoch`` of ``experiment``."""

    experiment: str
    epoch: int
    method: Method
    train: Settings
    base_model: BaseModel
    tokenizer: BaseModel  # the experiment's root model: a chained experiment's base is a merge
    template: Template | str
    data_dir: str
    previous: Previous | None
    out: Outputs
    log_dir: str
    threads: int = 1

    @classmethod
    def from_config(cls, exp: dict, epoch: int, config: dict, threads: int = 1,
                    data_dir: str | None = None) -> EpochSpec:
        """From one experiment of the resolved config (``tunemake.config.load_config``).

        ``data_dir``: the templated dataset the job's input names (default: the experiment's path).
        """
        from tunemake import paths
        from tunemake.config import TRAIN_KEYS, base_model_of, read_revision
        from tunemake.templates import get_template

        root = config["models"][exp["root_model"]]
        previous = None
        if epoch > 1:
            previous = Previous(paths.checkpoint(exp["name"], epoch - 1), paths.train_state(exp["name"], epoch - 1))
        fmt = dict(experiment=exp["name"], epoch=epoch)
        return cls(
            experiment=exp["name"], epoch=epoch,
            method=Method.from_dict(exp["method_config"]),
            train=Settings.from_dict({**{key: exp[key] for key in TRAIN_KEYS}, "epochs": exp["epochs"],
                                      "schedule": exp["schedule"], "save_steps": exp["save_steps"],
                                      "log_steps": exp["log_steps"],
                                      "evaluation_inputs": exp["evaluation_inputs"]}),
            base_model=BaseModel(**base_model_of(exp, config)),
            tokenizer=BaseModel(root["path"], read_revision(root), trust_remote_code=root["trust_remote_code"]),
            template=get_template(exp["template"], config.get("templates")),
            data_dir=data_dir or paths.templated_dataset(exp["data_key"]),
            previous=previous,
            out=Outputs(paths.CHECKPOINT.format(**fmt), paths.TRAIN_STATE.format(**fmt),
                        paths.RESUME_POINT.format(**fmt)),
            log_dir=paths.TRAIN_LOG_DIR.format(experiment=exp["name"]), threads=threads)

    def to_json(self) -> dict:
        """Plain JSON values (what the torchrun processes read back with :meth:`from_json`)."""
        values = asdict(self)
        values["method"] = self.method.to_dict()
        values["template"] = template_to_dict(self.template)
        return values

    @classmethod
    def from_json(cls, data: dict) -> EpochSpec:
        return cls(**{**data, "method": Method.from_dict(data["method"]), "train": Settings.from_dict(data["train"]),
                      "base_model": BaseModel(**data["base_model"]), "tokenizer": BaseModel(**data["tokenizer"]),
                      "template": template_from_dict(data["template"]),
                      "previous": Previous(**data["previous"]) if data["previous"] else None,
                      "out": Outputs(**data["out"])})

    def identity(self) -> dict:
        """The settings an epoch's fingerprint names (see ``tunemake.train.checkpoint.fingerprint``);
        not ``log_steps``, which changes nothing trained, so a resume point outlives a change of it."""
        train = asdict(self.train)
        del train["log_steps"]
        return {"experiment": self.experiment, "epoch": self.epoch, "method": self.method.to_dict(), "train": train}

    def resolved(self) -> EpochSpec:
        """With the base model's and tokenizer's local directories (see :meth:`BaseModel.resolved`)."""
        return replace(self, base_model=self.base_model.resolved(), tokenizer=self.tokenizer.resolved())

    def check(self) -> None:
        """Refuse what cannot work before any compute: clear errors, nothing written."""
        from tunemake.train.engine import deepspeed_config

        self.method.check()
        if self.train.epochs < 1 or not 1 <= self.epoch <= self.train.epochs:
            raise TrainError(f"epoch {self.epoch} is outside 1..{self.train.epochs}")
        deepspeed_config(self.train, world=1)  # a missing or malformed JSON file fails here
        base = self.resolved().base_model
        if not (Path(base.dir) / "config.json").exists():
            raise TrainError(f"{base.path}: not a model directory (no config.json)")
        arch = base.config.get("architectures") or []
        if arch and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in arch):
            raise TrainError(f"{base.path}: not a causal language model (architectures: {', '.join(arch)})")
        self._check_template_tokens()

    def _check_template_tokens(self) -> None:
        """A stop word the tokenizer splits would leave the merged model unable to stop: say so now."""
        from tunemake.templates import check_encodable

        if self.template == HF or not self.template.stop_words:
            return
        check_encodable(self.template, self.load_tokenizer(), self.tokenizer.path, TrainError)

    def load_tokenizer(self):
        """The experiment's tokenizer (its root model's)."""
        from transformers import AutoTokenizer

        from tunemake.hub import load_pretrained

        tokenizer = self.tokenizer.resolved()
        return load_pretrained(AutoTokenizer, tokenizer.dir, tokenizer.path,
                               trust_remote_code=tokenizer.trust_remote_code)

    def pad_id(self) -> int:
        """The base model's pad token id (0 when it has none)."""
        pad = self.base_model.config.get("pad_token_id")
        return pad if isinstance(pad, int) else 0

