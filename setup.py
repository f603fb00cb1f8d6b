"""Install with `pip install -e .` (add `[test]` for the test suite)."""

from setuptools import find_packages, setup

setup(
    name="lm",
    version="0.1.0",
    description="JAX/Flax recipe for language models: pretraining, scaling laws, SFT, reward models, PPO.",
    python_requires=">=3.10",
    packages=find_packages(
        include=["lm", "lm.*", "experiments", "experiments.*", "configs", "configs.*", "tools", "tools.*"]
    ),
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "tensorflow-datasets>=4.9.7",
        "importlib_resources",  # tfds imports it for registered datasets but does not declare it
        "array_record>=0.5",
        "sentencepiece>=0.2",
        "tokenizers>=0.23.3",  # HFTokenizer, write_hf_tokenizer
        "jinja2>=3.1.6",  # HF chat templates (3.1.6: the sandbox fixes transformers also requires)
        "safetensors>=0.8.0",  # reading HF checkpoints
        "ml-collections>=0.1.1",
        "absl-py",
        "numpy",
        "tqdm",
        "tensorboardX",
        "scipy",
        "matplotlib",
        "threadpoolctl",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "chex",
            "submitit",
            "hypothesis",
            "ruff==0.17.6",
            # tests/test_hf*.py: transformers builds the reference models and loads our exports
            "torch==2.13.0",  # as the bench extra
            "transformers>=5.25.0",
            "tokenizers>=0.23.3",
            "safetensors>=0.8.0",
            "peft>=0.22.0",
            "wandb>=0.31.0",  # tests/test_wandb.py, offline
        ],  # the sweep tests run the SLURM path locally
        "bench": ["torch==2.13.0"],
        "slurm": ["submitit"],
        "wandb": ["wandb>=0.31.0"],  # config.logging.wandb_project
    },
)
