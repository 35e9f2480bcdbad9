"""Packaging for speechbrain-spg."""

from setuptools import find_packages, setup

#: The optional ONNX export and runtime (pip install speechbrain-spg[onnx]).
ONNX_EXTRA = ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3"]

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="speechbrain-spg",
    version="0.1.0",
    description=(
        "One-pass compression of speech foundation models with "
        "sparsity-aware self-pinching gates, as a SpeechBrain integration"
    ),
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["speechbrain_spg", "speechbrain_spg.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchaudio>=2.4",
        "speechbrain>=1.1.2,<1.2",
        "transformers>=5,<6",
        "hyperpyyaml>=1.2",
        "sentencepiece>=0.2",
        "jiwer>=3",
        "safetensors>=0.4",
        "soundfile>=0.12",
        "espeakng-loader>=0.2",
        "numpy>=1.24",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "tqdm>=4.60",
    ],
    extras_require={
        # python -m speechbrain_spg.export_onnx and transcribe --onnx
        # (onnxscript: the --dynamo exporter)
        "onnx": ONNX_EXTRA,
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            "ruff>=0.5",
            "tensorboard>=2.10",
            *ONNX_EXTRA,
        ],
    },
    license="Apache-2.0",
)
