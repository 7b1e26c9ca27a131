"""A tiny random Llava (CLIP vision tower + Llama) built from a config, for tests and the CPU demo.

It is saved to a folder with its processor and then loaded through the same ``from_pretrained`` path as a Hub
checkpoint. Widths are multiples of 64 (bitsandbytes' 4-bit CPU kernels need that); text is tokenised per
character so that any instruction works offline, and the last 256 of the 512 ids are the action tokens.
"""

from __future__ import annotations

import copy
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rvla_peft.utils.constants import BUILTIN_PREFIX

TINY_NAME = "tiny-llava"
_VERSION = "v1"  # bump when the architecture below changes, so caches are rebuilt
TINY_OPENVLA_NAME = "tiny-openvla"
TINY_OPENVLA_VERSION = "v1"
TINY_PI0_NAME = "tiny-pi0"
TINY_PI0_VERSION = "v1"
# Pretrained checkpoints shipped inside the package: builtin:NAME is the folder rvla_peft/assets/NAME (no build,
# no cache), loaded with the real from_pretrained. tiny-vla-maniskill: behaviour-cloned by rvla_peft.pretrain.
PRETRAINED_NAME = "tiny-vla-maniskill"
PACKAGED = (PRETRAINED_NAME,)
# Adapters shipped the same way (builtin:NAME -> rvla_peft/assets/NAME, a PEFT adapter folder with its card):
# a LoRA of tiny-vla-maniskill post-trained under color_jitter@0.5 (its README.md says how).
COLOR_ADAPTER_NAME = "tiny-vla-maniskill-color"
PACKAGED_ADAPTERS = (COLOR_ADAPTER_NAME,)
# Adapters once shipped and withdrawn, with why: a name that worked before gets the reason, not "unknown".
RETIRED_ADAPTERS = {
    "tiny-vla-maniskill-shift": "no longer shipped: on fresh episodes (reset seeds 200000-200099) it was not above "
    "the base under shift@0.5 (+5.0 points, paired 95% interval [-1.9, +12.3]; bench/results/shipped_recheck)",
}
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


# --------------------------------------------------------------------------------------------------------------
# the tiny random OpenVLA


def openvla_char_tokenizer():
    """One token per character after Llama's specials, with a BOS token first as Llama's tokenizer does (the model
    inserts the image after it); every id it makes exists in openvla-7b's vocabulary as well."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def prismatic_processor(tokenizer, image_size: int):
    """OpenVLA's processor (fused DINOv2 + SigLIP inputs, resized naively to ``image_size``) over ``tokenizer``."""
    from rvla_peft.models.openvla import PrismaticImageProcessor, PrismaticProcessor
    from rvla_peft.models.openvla.processing import DINOSIGLIP_MEANS, DINOSIGLIP_STDS

    image_processor = PrismaticImageProcessor(
        use_fused_vision_backbone=True,
        image_resize_strategy="resize-naive",
        input_sizes=[[3, image_size, image_size]] * 2,
        interpolations=["bicubic", "bicubic"],
        means=DINOSIGLIP_MEANS,
        stds=DINOSIGLIP_STDS,
    )
    return PrismaticProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_openvla(
    directory: str | Path,
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 16,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 64,
    vision_layers: int = 3,
) -> Path:
    """Write a tiny random OpenVLA + processor to ``directory`` (deterministic for a seed).

    Text is tokenised per character (offline, any instruction) with a BOS token first, as Llama's tokenizer does:
    the model inserts the image after it. The embedding matrix has 512 rows, the last 64 of them padding as in
    openvla-7b, so the 256 action ids are 192..447. The sizes default to ``builtin:tiny-openvla``'s;
    ``bench/warmup_chain.py`` builds a wider one."""
    from rvla_peft.models.openvla import OpenVLAConfig, OpenVLAForActionPrediction

    tokenizer = openvla_char_tokenizer()
    vocab = tokenizer.get_vocab()
    tower = dict(img_size=image_size, patch_size=patch_size, embed_dim=vision_hidden_size, depth=vision_layers,
                 num_heads=4)  # fmt: skip
    config = OpenVLAConfig(
        vision_backbone_id="tiny-dinosiglip",
        llm_backbone_id="llama2-7b-pure",
        arch_specifier="no-align+fused-gelu-mlp",
        use_fused_vision_backbone=True,
        image_resize_strategy="resize-naive",
        image_sizes=[image_size, image_size],
        featurizer_configs=[
            # DINOv2-style: class + 4 register tokens, LayerScale, position embeddings on the patches only
            dict(tower, mlp_ratio=4.0, init_values=0.1, reg_tokens=4, no_embed_class=True),
            # SigLIP-style: no class token, attention-pool head
            dict(tower, mlp_ratio=3.0, class_token=False, global_pool="map"),
        ],
        text_config=dict(
            model_type="llama",
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=512,
            max_position_embeddings=512,
            pad_token_id=vocab["<pad>"],
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
        ),
        pad_token_id=vocab["<pad>"],
        pad_to_multiple_of=64,
        llm_max_length=512,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
        torch.manual_seed(seed)
        model = OpenVLAForActionPrediction(config)
    processor = prismatic_processor(tokenizer, image_size)
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------------------------
# the tiny random PI0


def pi0_char_tokenizer():
    """One token per character after Gemma-style specials (``<image>`` among them)."""
    return char_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], bos="<bos>", eos="<eos>")


def pi0_processor(tokenizer, image_size: int, patch_size: int, chunk_size: int):
    """transformers' ``PI0Processor`` with a PIL SigLIP image processor (its own image processor needs
    torchvision): one image token per patch."""
    from transformers import PI0Processor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch_size) ** 2
    return PI0Processor(image_processor=image_processor, tokenizer=tokenizer, chunk_size=chunk_size)


def build_tiny_pi0(
    directory: str | Path,
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 16,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
) -> Path:
    """Write a tiny random PI0 + processor to ``directory`` (deterministic for a seed).

    PaliGemma (SigLIP + Gemma) and a Gemma action expert of the same depth and head layout (the expert attends to
    the VLM's keys layer by layer); a chunk of 8 actions in 4 denoising steps. The sizes default to
    ``builtin:tiny-pi0``'s (2 layers, widths 64); ``bench/warmup_chain.py`` builds a wider one. Text is tokenised
    per character (offline, any instruction); the processor is transformers' ``PI0Processor`` with a PIL SigLIP
    image processor (its own image processor needs torchvision)."""
    from transformers import PI0Config, PI0ForConditionalGeneration

    tokenizer = pi0_char_tokenizer()
    vocab = tokenizer.get_vocab()
    gemma = dict(
        model_type="gemma",
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=hidden_size // 4,
    )
    config = PI0Config(
        vlm_config=dict(
            model_type="paligemma",
            text_config=dict(gemma, vocab_size=512, pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"]),
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=vision_hidden_size,
                intermediate_size=2 * vision_hidden_size,
                num_hidden_layers=vision_layers,
                num_attention_heads=4,
                image_size=image_size,
                patch_size=patch_size,
                vision_use_head=False,
            ),
            projection_dim=hidden_size,
            image_token_id=vocab["<image>"],
        ),
        dit_config=gemma,
        chunk_size=8,
        num_inference_steps=4,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
        torch.manual_seed(seed)
        model = PI0ForConditionalGeneration(config)
    processor = pi0_processor(tokenizer, image_size, patch_size, config.chunk_size)
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------------------------
# random:NAME: a published architecture with random weights, built in memory (no checkpoint, no download)

RANDOM_PREFIX = "random:"


def _random_openvla_7b():
    from transformers import AutoConfig

    import rvla_peft.models.openvla  # noqa: F401  registers model_type "openvla"
    from rvla_peft.models.openvla.published import OPENVLA_7B_CONFIG

    config = AutoConfig.for_model(**copy.deepcopy(OPENVLA_7B_CONFIG))
    return config, prismatic_processor(openvla_char_tokenizer(), 224)


def _random_pi0():
    from transformers import PI0Config

    tokenizer = pi0_char_tokenizer()
    config = PI0Config()  # transformers' defaults are lerobot/pi0_base's
    vision = config.vlm_config.vision_config
    config.vlm_config.image_token_id = tokenizer.get_vocab()["<image>"]  # the processor's image token, not Gemma's
    processor = pi0_processor(tokenizer, vision.image_size, vision.patch_size, config.chunk_size)
    return config, processor


def _random_builtin(name: str):
    def architecture():
        from transformers import AutoConfig, AutoProcessor

        import rvla_peft.models.openvla  # noqa: F401  registers model_type "openvla"

        path = resolve_builtin(BUILTIN_PREFIX + name)
        return AutoConfig.from_pretrained(path), AutoProcessor.from_pretrained(path)

    return architecture


# name -> (config, processor). The 7B-class ones take the tiny models' character tokenizers (every id they make
# exists in the published vocabularies) and the published image sizes; the tiny ones their builtin's own.
RANDOM_ARCHITECTURES = {
    "openvla-7b": _random_openvla_7b,  # openvla/openvla-7b
    "openvla-7b-oft": _random_openvla_7b,  # the OFT checkpoints are openvla-7b fine-tuned: the same architecture
    "pi0": _random_pi0,  # lerobot/pi0_base
    TINY_NAME: _random_builtin(TINY_NAME),
    TINY_OPENVLA_NAME: _random_builtin(TINY_OPENVLA_NAME),
    TINY_PI0_NAME: _random_builtin(TINY_PI0_NAME),
}


def random_architecture(name_or_path: str):
    """'random:openvla-7b' -> (its config, a processor): what ``load_base`` builds with random weights in memory,
    for measurements on a GPU without downloading or writing a checkpoint (the acceptance command)."""
    name = name_or_path.removeprefix(RANDOM_PREFIX)
    if name not in RANDOM_ARCHITECTURES:
        available = ", ".join(RANDOM_PREFIX + n for n in RANDOM_ARCHITECTURES)
        raise ValueError(f"unknown random architecture {name_or_path!r}; available: {available}")
    return RANDOM_ARCHITECTURES[name]()


# --------------------------------------------------------------------------------------------------------------
# builtin:NAME


def _builtins() -> dict:
    """Built-in model name -> (cache version, builder writing the model and processor to a folder)."""
    return {
        TINY_NAME: (_VERSION, build_tiny_llava),
        TINY_OPENVLA_NAME: (TINY_OPENVLA_VERSION, build_tiny_openvla),
        TINY_PI0_NAME: (TINY_PI0_VERSION, build_tiny_pi0),
    }


def resolve_builtin_adapter(name: str) -> str:
    """'builtin:tiny-vla-maniskill-color' -> the packaged adapter's folder."""
    short = name[len(BUILTIN_PREFIX) :]
    if short in RETIRED_ADAPTERS:
        raise ValueError(f"{name}: {RETIRED_ADAPTERS[short]}; use builtin:{COLOR_ADAPTER_NAME} or train your own")
    if short not in PACKAGED_ADAPTERS:
        available = ", ".join(BUILTIN_PREFIX + n for n in PACKAGED_ADAPTERS)
        raise ValueError(f"unknown built-in adapter {name!r}; available: {available}")
    return str(ASSETS_DIR / short)


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
