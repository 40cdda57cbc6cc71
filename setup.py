"""overinterp_jax: find overinterpretation in image classifiers with JAX."""
from setuptools import find_packages, setup

setup(
    name="overinterp_jax",
    version="0.1.0",
    description=("Sufficient Input Subsets (SIS) and the overinterpretation "
                 "pipeline, accelerator-native in JAX/Flax."),
    packages=find_packages(include=["overinterp_jax", "overinterp_jax.*"]),
    # The shipped CIFAR-10 test slice and trained weights (MANIFEST.in adds them to sdists).
    package_data={"overinterp_jax.data": ["slices/*.tar.gz", "imagenet_classes.tsv"],
                  "overinterp_jax.models": ["weights/*.msgpack", "weights/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",  # tensorflow-datasets imports it without declaring it.
        "numpy>=1.26",
        "pillow>=10",  # JPEG/PNG decoding for image-folder datasets.
        "grain>=0.2.18",  # input pipeline: worker processes decoding and cropping batches.
        "tqdm>=4.66",  # progress bars on long loops.
        "matplotlib>=3.8",  # report figures.
        "safetensors>=0.4",  # pretrained weights in torchvision/timm layout, read with numpy.
    ],
    extras_require={
        # nbclient/nbformat/ipykernel: tests/test_notebook.py runs notebooks/quickstart.ipynb.
        "test": ["pytest>=8", "chex>=0.1.90", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29"],
        # Preparing TFDS data once (`tfds build ... --file_format=array_record`, docs/data.md):
        # the builders run on TensorFlow, and the `tfds` command imports apache-beam and
        # mlcroissant at start-up. Reading the prepared files needs none of them.
        "prepare": [
            "tensorflow-cpu>=2.21; sys_platform == 'linux' and platform_machine == 'x86_64'",
            "tensorflow>=2.21; sys_platform != 'linux' or platform_machine != 'x86_64'",
            "apache-beam>=2.78",
            "mlcroissant>=1.1.1",
        ],
        # Accelerators: JAX's own extras bring the matching jaxlib plugins.
        "cuda12": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
)
