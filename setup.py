"""Install the TPRD toolbox: ``pip install -e ".[dev,export]"`` (``export``: ONNX export and its check)."""
from setuptools import find_packages, setup

setup(
    name="tprd",
    version="0.1.0",
    description="Knowledge distillation for DETR detectors with teacher prediction refinement (TPRD)",
    python_requires=">=3.9",
    packages=find_packages(include=["tprd", "tprd.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "scipy",
        "pycocotools",
        "omegaconf>=2.1",
        "fvcore",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        # ninja: builds the opt-in C++ MSDA kernel (msda_backend="cpp") with the system C++ compiler
        # (faster-coco-eval: the test suite checks that both COCO engines give the same AP)
        "dev": ["pytest>=7", "ninja", "faster-coco-eval"],
        "cpp": ["ninja"],
        # tools/export_onnx.py (TorchScript-based torch.onnx exporter: no onnxscript needed)
        "export": ["onnx", "onnxruntime"],
        # the C++ COCOeval (tprd.evaluation.COCOEvaluator uses it when installed; pycocotools otherwise)
        "fast-eval": ["faster-coco-eval"],
    },
)
