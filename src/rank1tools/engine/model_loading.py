"""A `transformers` causal LM whose weights come from any checkpoint rank1 reads, one at a time.

The model is built once from the BASE's `config.json` (and its tokenizer from the base's tokenizer
files), then every checkpoint's weights are copied into it in place, one tensor at a time, from the
same sources the other commands read (local folders, run layouts, `hf://`; io/sources.py). So a
pass over T checkpoints holds one model plus one tensor, never T models, and never re-parses a
config or re-creates a tokenizer (docs/concepts.md#running-checkpoints-as-models).

- `--device auto` is CUDA when torch sees a GPU; `--dtype auto` is float32 on the CPU and the
  config's dtype (bfloat16 for most policies) on a GPU. A checkpoint's tensors are upcast or
  downcast to that dtype as they are copied.
- Tied heads: a model whose config ties `lm_head` to the embedding is untied when a checkpoint
  stores its own `lm_head.weight` (training untied it); a checkpoint that ties its head gives the
  head its embedding's values (io/checkpoint.py resolves that).
- A checkpoint whose tensor names or shapes differ from the model's is refused naming the tensor.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

from ..errors import InputError, UsageError
from ..io.checkpoint import LM_HEAD_NAME, Checkpoint
from ..options import DTYPE_CHOICES
from .model_scoring import import_transformers

MODEL_DTYPES = DTYPE_CHOICES  # the --dtype choices, shared with the commands writing checkpoints


@dataclass(frozen=True)
class ModelOptions:
    """How a command runs a model: `device` (auto, cpu, cuda, cuda:N), `dtype` (MODEL_DTYPES),
    `batch_size` (sequences per forward pass)."""

    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8

    def check(self) -> None:
        """One-line UsageErrors for values no model could use (torch-free)."""
        if self.dtype not in MODEL_DTYPES:
            raise UsageError(f"--dtype {self.dtype!r}: expected one of {', '.join(MODEL_DTYPES)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: expected a whole number >= 1")


def _torch_dtype(option: str, config, device):
    import torch  # noqa: PLC0415

    if option != "auto":
        return getattr(torch, option)
    if device.type == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow and round more
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _skip_init(transformers):
    """transformers' context that skips random initialisation (weights are copied in after);
    where this version has none, initialisation just runs."""
    for where in ("initialization", "modeling_utils"):
        module = getattr(transformers, where, None)
        ctx = getattr(module, "no_init_weights", None) if module is not None else None
        if ctx is not None:
            return ctx()
    return nullcontext()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _model_root(base: Checkpoint):
    if base.root is None or base.config is None:
        raise InputError(f"{base.label}: no config.json beside the weights; running a model needs the base's config")
    return base.root


def load_tokenizer(source: Checkpoint, *, where: str | None = None):
    """The tokenizer stored beside `source`'s config (AutoTokenizer), or a one-line InputError."""
    transformers = import_transformers()
    root = _model_root(source)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(root))
    except Exception as exc:  # noqa: BLE001 (transformers raises many kinds; the user needs one line)
        raise InputError(f"{where or source.label}: cannot load its tokenizer: {_first_line(exc)}") from None


class CausalLM:
    """One `AutoModelForCausalLM` built from a base checkpoint, into which checkpoints are loaded.

    Attributes: `model` (eval mode, on `device`, in `dtype`), `tokenizer`, `base` (the Checkpoint
    the config came from), `loaded` (label of the checkpoint whose weights the model holds).
    `load_base=False` leaves the weights unread (and `loaded` None) until the first `load`, for a
    caller whose first checkpoint is not the base: the base's weights are then never read.
    """

    def __init__(
        self, base: Checkpoint, options: ModelOptions | None = None, *, tokenizer=None, load_base: bool = True
    ):
        import torch  # noqa: PLC0415

        from ..device import resolve_device  # noqa: PLC0415

        options = options or ModelOptions()
        options.check()
        transformers = import_transformers()
        root = _model_root(base)
        self.base = base
        self.device = resolve_device(options.device)
        try:
            config = transformers.AutoConfig.from_pretrained(str(root))
        except Exception as exc:  # noqa: BLE001
            raise InputError(
                f"{base.label}: config.json does not describe a transformers model: {_first_line(exc)}"
            ) from None
        self.dtype = _torch_dtype(options.dtype, config, self.device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base)
        try:
            with _skip_init(transformers), torch.device(self.device):
                model = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise InputError(f"{base.label}: not a causal language model transformers can build: {exc}") from None
        self.model = model.to(dtype=self.dtype).eval()
        self.loaded: str | None = None
        if load_base:
            self.load(base)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def _untie_head(self) -> None:
        """Give the head a parameter of its own (a checkpoint stores an lm_head distinct from its
        embedding while the config ties them)."""
        import torch  # noqa: PLC0415

        head = self.model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        self.model.config.tie_word_embeddings = False

    def _targets(self) -> dict:
        """Tensor name -> the model's tensor to fill (parameters and persistent buffers)."""
        state = self.model.state_dict(keep_vars=True)
        return {name: t for name, t in state.items()}

    def load(self, checkpoint: Checkpoint) -> None:
        """Copy `checkpoint`'s weights into the model in place, one tensor at a time. Refuses a
        checkpoint whose names or shapes differ from the model's, naming the first such tensor."""
        import torch  # noqa: PLC0415

        head = self.model.get_output_embeddings()
        tied = head is not None and head.weight is self.model.get_input_embeddings().weight
        if tied and LM_HEAD_NAME in checkpoint.entries:
            self._untie_head()
        targets = self._targets()
        missing = [n for n in targets if n not in checkpoint]
        if missing:
            raise InputError(
                f"{checkpoint.label}: has no tensor {missing[0]!r} the model needs"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        extra = [n for n in checkpoint.entries if n not in targets]
        if extra:
            raise InputError(
                f"{checkpoint.label}: tensor {extra[0]!r} is not a tensor of the model built from "
                f"{self.base.label}'s config" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
        with torch.no_grad():
            for name, target in targets.items():
                shape = tuple(checkpoint.entry(name).shape)
                if shape != tuple(target.shape):
                    raise InputError(
                        f"{checkpoint.label}: tensor {name!r} has shape {list(shape)}, the model's is {list(target.shape)}"
                    )
                target.copy_(checkpoint.read(name, device=self.device, dtype=target.dtype))
        self.loaded = checkpoint.label
