"""A tiny random Llava (CLIP vision tower + Llama) built from a config, for tests and the CPU demo.

It is saved to a folder with its processor and then loaded through the same ``from_pretrained`` path as a Hub
checkpoint. Widths are multiples of 64 (bitsandbytes' 4-bit CPU kernels need that); text is tokenised per
character so that any instruction works offline, and the last 256 of the 512 ids are the action tokens.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import torch

BUILTIN_PREFIX = "builtin:"
TINY_NAME = "tiny-llava"
_VERSION = "v1"  # bump when the architecture below changes, so caches are rebuilt
# Pretrained checkpoints shipped inside the package: builtin:NAME is the folder rvla_peft/assets/NAME (no build,
# no cache), loaded with the real from_pretrained. tiny-vla-maniskill: behaviour-cloned by rvla_peft.pretrain.
PRETRAINED_NAME = "tiny-vla-maniskill"
PACKAGED = (PRETRAINED_NAME,)
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


def cache_dir() -> Path:
    root = (
        os.environ.get("RVLA_PEFT_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rvla_peft"
    )
    return Path(root)


# Printable ASCII and newline: the tiny models' text alphabet, after their special tokens.
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


def fast_tokenizer(backend, bos: str = "<s>", eos: str = "</s>"):
    """A ``tokenizers`` backend over the tiny models' specials, as a transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def char_tokenizer(specials: list[str], bos: str = "<s>", eos: str = "</s>"):
    """One token per character (ids after ``specials``): offline, and any instruction tokenises."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(specials + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return fast_tokenizer(backend, bos, eos)


def build_tiny_llava(
    directory: str | Path,
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
) -> Path:
    """Write a tiny random Llava + processor to ``directory`` (deterministic for a seed).

    The sizes default to the ``builtin:tiny-llava`` test model; ``rvla_peft.pretrain`` builds a wider one."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = char_tokenizer(["<pad>", "<s>", "</s>", "<unk>", "<image>"])
    vocab = tokenizer.get_vocab()
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
    )
    text = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=vocab["<image>"], vision_feature_layer=-1
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _builtins() -> dict:
    """Built-in model name -> (cache version, builder writing the model and processor to a folder)."""
    from rvla_peft.policies.openvla import TINY_OPENVLA_NAME, TINY_OPENVLA_VERSION, build_tiny_openvla
    from rvla_peft.policies.pi0 import TINY_PI0_NAME, TINY_PI0_VERSION, build_tiny_pi0

    return {
        TINY_NAME: (_VERSION, build_tiny_llava),
        TINY_OPENVLA_NAME: (TINY_OPENVLA_VERSION, build_tiny_openvla),
        TINY_PI0_NAME: (TINY_PI0_VERSION, build_tiny_pi0),
    }


def resolve_builtin(name_or_path: str) -> str:
    """'builtin:tiny-llava' -> a cached folder (built once, written atomically); 'builtin:tiny-vla-maniskill' -> the
    packaged checkpoint's folder; anything else unchanged."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX) :]
    if name in PACKAGED:
        folder = ASSETS_DIR / name
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{name_or_path}: the packaged checkpoint {folder} is missing its weights")
        return str(folder)
    builtins = _builtins()
    if name not in builtins:
        available = ", ".join(BUILTIN_PREFIX + n for n in (*builtins, *PACKAGED))
        raise ValueError(f"unknown built-in model {name_or_path!r}; available: {available}")
    version, build = builtins[name]
    target = cache_dir() / f"{name}-{version}"
    if (target / "model.safetensors").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (several ranks may start together); the others wait, then find it built.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model.safetensors").exists():
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
            build(staging)
            if not (staging / "model.safetensors").exists():  # transformers writes on distributed rank 0 only
                shutil.rmtree(staging, ignore_errors=True)
                raise RuntimeError(
                    f"{name_or_path} must first be built on rank 0: load it inside accelerator.main_process_first()"
                )
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    return str(target)
