"""megatron-save: SAVE reward-model self-improvement during critic-free RL, on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-save",
    version="0.1.0",
    description="Megatron-Core training stack for SAVE (arXiv 2605.30888): online reward-model "
    "improvement from the policy's own rollouts during GRPO / RLOO / GSPO.",
    packages=find_packages(include=["megatron_save", "megatron_save.*"]),
    python_requires=">=3.11",
    install_requires=[
        "megatron-core>=0.16",
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
        # The real-model tier and tools/fetch_smollm2.py: transformers loads SmolLM2's GGUF file with these.
        "real": ["gguf", "accelerate"],
        "dev": ["pytest>=8", "pytest-xdist>=3", "gguf", "accelerate"],
    },
)
