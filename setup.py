from setuptools import setup

setup(
    name="mango",
    version="0.1.0",
    description="MANGO, Muon, LAMB, LaProp and NovoGrad for PyTorch from one engine with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["mango", "mango.backends", "mango_kernels"],
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # triton: the GPU kernels, and on CPU the interpreter the kernel tests run under
        "triton": ["triton>=3.0"],
        # transformers / accelerate / lightning: the trainer tests (HF Trainer, Lightning) and the README's examples
        "test": ["pytest", "pytest-xdist", "triton>=3.0", "transformers>=4.46", "accelerate>=1.0", "lightning>=2.2"],
        # peers bench.step times beside mango (pure-python wheels that keep the installed torch);
        # emerging-optimizers (python >= 3.12) and gram-newton-schulz (CuTe-DSL, CUDA only) are
        # used where present and reported "n/a" with the reason where not
        "bench": ["matplotlib", "heavyball>=3.2", "muon-optimizer>=0.1"],
    },
)
