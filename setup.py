"""Build script. The C++/CUDA extension ovss_fast._C is added by csrc/ (see README)."""

from setuptools import setup

setup()
